"""
The GPU check: one prepared script for a GPU machine (one H100 or H200; PyTorch, transformers, peft and pytest
installed; no network) that fits in 8 minutes and writes one JSON of results, plus a markdown summary.

    python bench/gpu_check.py                              # -> out/gpu_check/gpu_check.json, .md, one log per section
    python bench/gpu_check.py --out_dir=$OUT --budget=420  # elsewhere, or in less time
    python bench/gpu_check.py --tiny --device=cpu          # the same code paths at tiny sizes (tests/test_gpu_check.py)

Sections, each a process of its own under a time limit: a hang or a crash is recorded (status timeout / failed,
the log's tail kept) and the next section runs; the JSON is rewritten after each section, so a kill keeps what
was done. Time left over by a section goes to the ones after it; none runs past --budget in all.
    env      the device's name and memory, torch / CUDA / transformers / peft versions, the git commit
    loss     bench/bench_loss.py, vocab 128k, micro-batch 4 x 2048 tokens, dim 4096: peak memory and time of
             model.lm_loss against the full fp32 logits (aims: <= 1/4 the memory, time <= 1.02x)
    train    bench/bench_train.py --gpu_recipe: Llama-2-7B shape, r 64, bf16: tokens/s, MFU, peak memory of ours
             (LoRA, BeamLoRA, LR-LoRA once train.py has it) and transformers + PEFT (aims: MFU >= 40%, ours / HF
             tokens/s >= 1.10)
    tests    pytest on tests/test_cuda.py: pass / fail / skip per test, with each failure's last line
    decode   bench/bench_decode.py: a 1B Llama shape, batch 16, bf16: ours (cache, static, compiled) against
             transformers' generate, and the tokens in fp32 (aim: compiled <= 0.5x transformers' wall time)
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, parse_args  # noqa: E402

DEFAULTS = dict(
    out_dir="out/gpu_check",
    budget=460.0,  # seconds for all sections together (8 minutes less a margin for the start and the copy back)
    sections="env,loss,train,tests,decode",
    tiny=False,  # tiny shapes: the code paths in seconds
    device="cuda",
    test_timeout=150,  # seconds per test, where pytest-timeout is installed
    section="",  # internal: run one section's work in this process
)
SHARE = {"env": 0.05, "loss": 0.10, "train": 0.27, "tests": 0.33, "decode": 0.25}  # each one's share of the budget


def commands(cfg, out):
    """{section: (argv, the JSON it writes or None)}"""
    py, tiny, dev = sys.executable, cfg["tiny"], cfg["device"]
    bench = lambda name: os.path.join(ROOT, "bench", name)  # noqa: E731
    loss = ["--vocab=512", "--seq=64", "--batch=2", "--dim=32", "--repeats=1"] if tiny else \
        ["--vocab=128256", "--seq=2048", "--batch=4", "--dim=4096"]
    train = ["--tiny", "--gpu_steps=4", "--gpu_warmup=1"] if tiny else []
    decode = ["--tiny", "--backend=aot_eager", "--batch=4", "--new_tokens=8", "--repeats=1", "--prompt_min=4",
              "--prompt_max=12", "--check_tokens=4"] if tiny else ["--new_tokens=128"]
    tests = [f"--timeout={cfg['test_timeout']}"] if has_module("pytest_timeout") else []
    return {
        "env": ([py, os.path.abspath(__file__), "--section=env", f"--device={dev}"], None),
        "loss": ([py, bench("bench_loss.py"), f"--device={dev}", *loss, f"--out_json={out}/loss.json"], "loss.json"),
        "train": ([py, bench("bench_train.py"), "--gpu_recipe", f"--device={dev}", *train,
                   f"--out_json={out}/train.json"], "train.json"),
        "tests": ([py, "-m", "pytest", os.path.join(ROOT, "tests", "test_cuda.py"), "-v", "-p", "no:cacheprovider",
                   "-o", "console_output_style=classic", f"--junitxml={out}/tests.xml", *tests], None),
        "decode": ([py, bench("bench_decode.py"), f"--device={dev}", *decode, f"--out_json={out}/decode.json"],
                   "decode.json"),
    }


def has_module(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


def env_section(cfg):
    """Printed as one JSON line: what ran where."""
    import importlib.metadata

    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device": cfg["device"]}
    for mod in ("transformers", "peft", "pytest"):  # from the installed metadata: no slow imports
        try:
            info[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            info[mod] = None
    if cfg["device"].startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available())
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
        info["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    print("ENV " + json.dumps(info))


def run_section(argv, log_path, limit, extra_env=None):
    """Runs argv in its own process group, output to log_path; kills the group at `limit` s. -> (status, rc, s)"""
    t = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, limit))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):  # the whole group: children too
                try:
                    os.killpg(proc.pid, sig)
                    rc = proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            status, rc = "timeout", proc.poll()
    return status, rc, round(time.time() - t, 1)


def tail(path, n=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def test_results(out):
    """{test id: {"outcome", "s"?, "message"?}}: from the JUnit file when pytest finished, else from its -v lines."""
    results = {}
    xml = os.path.join(out, "tests.xml")
    if os.path.isfile(xml):
        try:
            for case in ET.parse(xml).getroot().iter("testcase"):
                name = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
                outcome, message = "passed", None
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        message = (el.get("message") or el.text or "").strip().splitlines()[-1:] or None
                        message = message[0][:500] if message else None
                results[name] = {"outcome": outcome, "s": float(case.get("time") or 0), "message": message}
            return results
        except ET.ParseError:
            pass
    log = tail(os.path.join(out, "tests.log"), 10**6)
    for m in re.finditer(r"^\S*?(test_\w+\.py::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", log, re.M):
        results[m.group(1)] = {"outcome": m.group(2).lower()}
    started = re.findall(r"^\S*?(test_\w+\.py::\S+) *$", log, re.M)  # a test that never reported: the one that hung
    for name in started:
        results.setdefault(name, {"outcome": "timeout"})
    return results


def summarize(report):
    """The markdown summary of what is in the report so far."""
    env = report.get("env", {})
    lines = [f"# GPU check: {env.get('device_name') or env.get('device', '?')}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
             f"commit {(env.get('commit') or '?')[:10]}{' (dirty)' if env.get('dirty') else ''}", "",
             "| section | status | seconds | limit |", "|---|---|---|---|"]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s['s']} | {s['limit']} |")
    tests = report.get("tests", {})
    if tests:
        counts = {}
        for r in tests.values():
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        lines += ["", "## CUDA tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), "",
                  "| test | outcome | s | message |", "|---|---|---|---|"]
        for name, r in tests.items():
            msg = (r.get("message") or "").replace("|", "/")[:200]
            lines.append(f"| {name} | {r['outcome']} | {r.get('s', '')} | {msg} |")
    for key, title in (("loss", "Loss"), ("train", "Training"), ("decode", "Decoding")):
        md = (report.get(key) or {}).get("markdown")
        if md:
            lines += ["", f"## {title}", "", md]
    if report.get("aims"):
        lines += ["", "## Aims", "", "| aim | value | holds |", "|---|---|---|"]
        lines += [f"| {a} | {v['value']} | {v['holds']} |" for a, v in report["aims"].items()]
    return "\n".join(lines) + "\n"


def aims(report):
    """The issue's aims, from the figures measured (None where a figure is missing)."""
    out = {}

    def add(name, value, holds):
        out[name] = {"value": None if value is None else round(value, 4), "holds": None if value is None else holds}
    loss = report.get("loss") or {}
    add("loss peak memory lm_loss / full logits <= 0.25", loss.get("memory_ratio"),
        loss.get("memory_ratio") is not None and loss["memory_ratio"] <= 0.25)
    add("loss time lm_loss / full logits <= 1.02", loss.get("time_ratio"),
        loss.get("time_ratio") is not None and loss["time_ratio"] <= 1.02)
    gr = (report.get("train") or {}).get("gpu_recipe") or {}
    mfu = ((gr.get("results") or {}).get("ours LoRA") or {}).get("mfu")
    add("train MFU ours LoRA >= 0.40", mfu, mfu is not None and mfu >= 0.40)
    r = gr.get("ours_over_hf_tok_s")
    add("train tokens/s ours / HF+PEFT >= 1.10", r, r is not None and r >= 1.10)
    sides = (report.get("decode") or {}).get("sides") or {}
    for m in ("cache", "static", "compiled"):
        x = (sides.get(f"ours {m}") or {}).get("over_transformers")
        add(f"decode wall time ours {m} / transformers <= 0.5", x, x is not None and x <= 0.5)
    check = (report.get("decode") or {}).get("check") or {}
    same = [x.get("rows_identical_to_transformers") for s, x in check.items() if s != "transformers"]
    add("decode tokens identical to transformers' (fp32 check, all sides)", min(same) if same else None,
        bool(same) and min(same) == 1.0)
    return out


def write(report, out):
    from rundir import atomic_json
    report["aims"] = aims(report)
    atomic_json(report, os.path.join(out, "gpu_check.json"))
    md = summarize(report)
    tmp = os.path.join(out, "gpu_check.md.tmp")
    with open(tmp, "w") as f:
        f.write(md)
    os.replace(tmp, os.path.join(out, "gpu_check.md"))
    return md


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    if cfg["section"] == "env":
        return env_section(cfg)
    names = [s for s in cfg["sections"].split(",") if s]
    if not names or any(s not in SHARE for s in names):
        raise ConfigError(f"--sections={cfg['sections']}: expected a list of {', '.join(SHARE)}")
    out = os.path.abspath(cfg["out_dir"])
    os.makedirs(out, exist_ok=True)
    for name in names:  # no stale results from an earlier run
        for f in (f"{name}.json", f"{name}.log", "tests.xml" if name == "tests" else None):
            if f and os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    cmds = commands(cfg, out)
    report = {"config": cfg, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    total = sum(SHARE[n] for n in names)
    deadline = time.time() + cfg["budget"]
    for i, name in enumerate(names):
        later = sum(SHARE[n] for n in names[i + 1:]) / total * cfg["budget"]  # kept for the sections after this one
        limit = round(max(5.0, deadline - time.time() - later), 1)
        argv_, json_name = cmds[name]
        log = os.path.join(out, f"{name}.log")
        print(f"== {name} (limit {limit:.0f} s): {' '.join(argv_[1:])}", flush=True)
        # decode: inductor says in the log if it skipped CUDA graphs ("skipping cudagraphs due to ...")
        status, rc, secs = run_section(argv_, log, limit, {"TORCH_LOGS": "perf_hints"} if name == "decode" else None)
        report["sections"][name] = {"status": status, "rc": rc, "s": secs, "limit": limit, "log": log}
        if status != "ok":
            report["sections"][name]["log_tail"] = tail(log)
        if name == "env":
            line = [x for x in tail(log, 10**5).splitlines() if x.startswith("ENV ")]
            report["env"] = json.loads(line[-1][4:]) if line else {}
        elif name == "tests":
            report["tests"] = test_results(out)
        if json_name and os.path.isfile(os.path.join(out, json_name)):
            with open(os.path.join(out, json_name)) as f:
                report[name] = json.load(f)  # a timed-out bench_train leaves its finished configurations here
        print(f"   {status} in {secs} s", flush=True)
        write(report, out)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    md = write(report, out)
    print("\n" + md)
    print(f"wrote {os.path.join(out, 'gpu_check.json')} and gpu_check.md")
    return report


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
