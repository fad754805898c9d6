"""
The paper's Table 3 in miniature, built to resolve differences: every method fine-tunes the same base
with the same seeds (seed s gives every method the same data order and the same initial A), is scored
on held-out problems, and is reported as its mean over seeds and its paired difference to LoRA with a
95% confidence interval (Student's t over the per-seed differences, n - 1 degrees of freedom).

    python bench/compare.py --quick                       # lora and beamlora, 2 seeds, 100 steps: minutes
    python bench/compare.py                               # the design below: lora, beamlora, its ablations
    python bench/compare.py --methods=table               # the full table: every method train.py has
    python bench/compare.py --methods=lora,dora,beamlora:scope=module:tau=0.03 --ranks=8,16
    python bench/compare.py --base=CKPT --data=train.jsonl --test=test.jsonl --steps=2000 --jobs=1

A method is a train.py --method name (a new method needs no change here), a variant from VARIANTS,
or either followed by :key=value options of train.py (type-checked); its label is what was typed.

The design (the defaults; docs in README.md, "The paper's comparison in miniature"): the demo's
task and base, which already does the arithmetic and the solution steps (so accuracy is not balanced
on whether a run happens to learn them: it was, before, and the seed-to-seed spread was 9-21
points), with 30% of its pretraining's worked problems in the response's form (--answer_form=0.3:
with none, the answer line's tokens were output rows the base never trained, they held 96% of an
adapter's held-out loss and a quarter of the runs collapsed on them or on copying a number);
r = 8, 500 steps of 16 problems, all 2000 held-out problems (a paired difference's binomial part
alone is then about 1 point), 5 seeds (t quantile 2.78; the full table of 16 methods is then
about 100 minutes on 2 cores). Each run is one process with one thread (so a run's numbers do not
depend on --jobs or on the machine's core count) and --jobs=2 runs two at once, which is what
2 cores do best; the base is pretrained with --base_threads=2 for the same reason.

Writes to out_dir: results.jsonl (one line per run: scores, times, the git commit, the torch
version, and a key of everything that made it; a rerun reuses a run only when its key matches),
table.md, summary.json (the numbers of the table), and one folder per run (spec.json, logs,
adapter, scores.jsonl for bench/figures.py).
"""
import ast
import functools
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, cli, parse_args  # noqa: E402

VARIANTS = {  # name -> train.py settings (the paper's ablations, docs/BEAMLORA.md section 5; ReLoRA's reset)
    "beamlora_no_expand": dict(method="beamlora", no_expand=True),  # Table 3 "w/o expansion"
    "beamlora_random_assess": dict(method="beamlora", random_assess=True),  # "w/o assessment"
    "beamlora_static_p": dict(method="beamlora", static_p=True),  # "w/o dynamic p"
    "beamlora_no_history": dict(method="beamlora", no_history=True),  # "w/o history" (not in the paper's table)
    "beamlora_keep_moments": dict(method="beamlora", inherit_moments="keep"),  # what the authors' code executes
    "relora_independent": dict(method="relora", relora_joint=False),  # the authors' reset (docs/RELORA.md section 2)
}
METHOD_OPTIONS = {  # method -> train.py settings it needs here; one line per method
    "full": dict(lr=1e-3),  # every weight trained: LoRA's 5e-3 would undo the base's pretraining (its peak was 3e-3)
}
BEAM_VARIANTS = [v for v in VARIANTS if v.startswith("beamlora_")]
ABLATIONS = "lora,beamlora," + ",".join(BEAM_VARIANTS)
TABLE = ("lora,full,dora,pissa,milora,adalora,relora,relora_independent,increlora,lrlora,"
         + ",".join(["beamlora"] + BEAM_VARIANTS))
QUICK = dict(methods="lora,beamlora", seeds=2, steps=100, eval_limit=200)  # --quick: only what is not given
DEFAULTS = dict(
    out_dir="out/compare",
    base="",  # an HF checkpoint dir; empty: the demo's base (built by demo.py's code if missing)
    answer_form=0.3,  # the demo's base only: the share of its pretraining's worked problems in the response's form
    base_threads=2,  # the demo's base only: torch threads it is pretrained with (part of its key)
    data="",  # training jsonl (metamathqa fields); empty: the demo's train.jsonl
    test="",  # held-out jsonl for accuracy (eval.py's gsm8k scorer) and loss; empty: the demo's test.jsonl
    methods=ABLATIONS,  # comma-separated; "table": TABLE, skipping methods train.py does not have (yet)
    baseline="lora",  # the method the paired differences are taken to
    ranks="8",
    seeds=5,  # seeds 0 .. seeds-1
    steps=500,
    lr=5e-3,
    batch_size=16,
    p_init=0.9,
    eval_limit=0,  # 0: every held-out problem
    eval_batch_size=100,
    max_new_tokens=96,
    score_log_interval=10,
    jobs=2,  # runs at once
    threads=1,  # torch threads per run; part of a run's key (other thread counts can round differently)
    quick=False,
    worker="",  # internal: a run's spec (JSON) for the child process
)
MAX_LEN = 256  # tokens per example (a demo problem with its solution: about 150)
RUN_FILES = ("events.jsonl", "scores.jsonl", "log.jsonl", "stdout.txt")


# ----------------------------------------------------------------------------------------------
# statistics: Student's t without scipy

def t_cdf(t, df, n=2000):
    """P(T <= t) for t >= 0: 1/2 + the integral of the density from 0 to t (Simpson's rule, n even)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    h = t / n
    s = f(0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


@functools.lru_cache(maxsize=None)
def t_quantile(q, df):
    """The t with P(T <= t) = q (q > 1/2), by bisection: 2.776 for q = 0.975 and 4 degrees of freedom."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def interval(xs):
    """-> (mean, half-width of the 95% t-interval of the mean); half-width None for fewer than 2 values."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    return m, t_quantile(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def summarize(rows, labels, ranks, baseline):
    """{r: {label: stats}}: per label the mean and t-interval of accuracy and loss over seeds, and of the
    per-seed differences to the baseline (seeds both have)."""
    out = {}
    for r in ranks:
        by = {m: {x["seed"]: x for x in rows if x["label"] == m and x["r"] == r} for m in labels}
        out[r] = {}
        for m in labels:
            if not by[m]:
                continue
            seeds = sorted(by[m])
            st = {"n": len(seeds), "seeds": seeds,
                  "train_s": statistics.fmean(by[m][s]["train_s"] for s in seeds),
                  "peak_mem_gib": max(by[m][s]["peak_mem_gib"] for s in seeds)}
            for key in ("accuracy", "val_loss"):
                st[key], st[key + "_hw"] = interval([by[m][s][key] for s in seeds])
                paired = [s for s in seeds if s in by.get(baseline, {})]
                if m != baseline and paired:
                    d, hw = interval([by[m][s][key] - by[baseline][s][key] for s in paired])
                    st["d_" + key], st["d_" + key + "_hw"], st["n_paired"] = d, hw, len(paired)
            out[r][m] = st
    return out


def table(summary, baseline, n_test):
    def cell(m, hw, scale, nd):  # "91.2 ± 0.8"
        return f"{scale * m:.{nd}f}" + ("" if hw is None else f" ± {scale * hw:.{nd}f}")

    def delta(st, key, scale, nd):  # "+0.3 [-0.5, +1.1]"
        if "d_" + key not in st:
            return "-"
        d, hw = scale * st["d_" + key], st["d_" + key + "_hw"]
        return f"{d:+.{nd}f}" + ("" if hw is None else f" [{d - scale * hw:+.{nd}f}, {d + scale * hw:+.{nd}f}]")

    lines = []
    for r, per in summary.items():
        lines += [f"r = {r}", "",
                  f"| method | seeds | accuracy % | Δ accuracy vs {baseline} (points) | held-out loss | "
                  f"Δ loss vs {baseline} | train time (s) | peak RSS (GiB) |", "|---|---|---|---|---|---|---|---|"]
        for m, st in per.items():
            lines.append(f"| {m} | {st['n']} | {cell(st['accuracy'], st['accuracy_hw'], 100, 1)} | "
                         f"{delta(st, 'accuracy', 100, 1)} | {cell(st['val_loss'], st['val_loss_hw'], 1, 4)} | "
                         f"{delta(st, 'val_loss', 1, 4)} | {st['train_s']:.0f} | {st['peak_mem_gib']:.2f} |")
        lines.append("")
    lines.append(f"accuracy on {n_test} held-out problems (eval.py's gsm8k scorer), held-out loss per response token; "
                 "mean over seeds ± the half-width of its 95% t-interval; Δ: mean of the per-seed differences "
                 f"to {baseline} (same seed, same data order and initial A) [95% t-interval over those differences, "
                 "t quantile with n - 1 degrees of freedom]; train time: mean, memory: max over the seeds")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# what a run is

def sha256_file(path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def sha256_tree(path):
    """Content hash of a file, or of a directory's files (names and bytes)."""
    if os.path.isfile(path):
        return sha256_file(path).hexdigest()
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if os.path.isfile(os.path.join(path, name)):
            h.update(name.encode())
            sha256_file(os.path.join(path, name), h)
    return h.hexdigest()


def code_hash(extra=("bench/compare.py",)):
    """The code a run executes: every top-level .py file and the `extra` ones (paths from the repo root), as their
    syntax trees without docstrings, so an edit of a comment or a docstring keeps every recorded run's key."""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(ROOT) if n.endswith(".py")) + list(extra):
        h.update(name.encode())
        h.update(code_text(os.path.join(ROOT, name)).encode())
    return h.hexdigest()


def code_text(path):
    """A Python file's syntax tree with its docstrings dropped (comments are not in it): what it does, not how it
    is explained. ast.dump's text can change with Python's version; that only makes a rerun miss, never match."""
    with open(path, "rb") as f:
        source = f.read()
    try:
        tree = ast.parse(source, path)
    except (SyntaxError, ValueError):  # not Python this interpreter parses: its bytes, then
        return source.hex()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def git_commit():
    """HEAD, with "-dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def method_settings(label, train_defaults):
    """'beamlora_no_expand:tau=0.03' -> train.py settings, type-checked by the configurator."""
    name, *opts = label.split(":")
    settings = dict(VARIANTS.get(name, {"method": name}))
    settings.update(METHOD_OPTIONS.get(settings["method"], {}))
    missing = [k for k in settings if k not in train_defaults]
    if missing:
        raise ConfigError(f"--methods: {label} needs train.py's --{', --'.join(missing)}, which it does not have")
    try:
        given = parse_args([f"--{o}" for o in opts], train_defaults)
    except ConfigError as e:
        raise ConfigError(f"--methods: {label}: {e}") from None
    settings.update({k: given[k] for k in (o.partition("=")[0] for o in opts)})
    return settings


def run_one(spec):
    """In the child process: train, then score the adapter on the held-out problems."""
    import torch
    torch.set_num_threads(spec["threads"])
    import eval as eval_lib
    import train
    t0 = time.time()
    res = train.train(spec["train"])
    t1 = time.time()
    out = spec["train"]["out_dir"]
    # what the method ships (its SHIPS): an adapter on the base; full fine-tuning its model/; ReLoRA merged/
    ships = train.method_hooks(spec["train"]).SHIPS
    weights = [f"--model={out}/{ships}"] if ships != "adapter" else \
        [f"--model={spec['train']['init_from']}", f"--adapter={out}/adapter"]
    summary = eval_lib.main(weights + ["--task=gsm8k",
                             f"--data={spec['test']}", f"--out={out}/eval", f"--limit={spec['eval_limit']}",
                             f"--batch_size={spec['eval_batch_size']}", f"--max_new_tokens={spec['max_new_tokens']}",
                             "--device=cpu"])
    n_ops = 0
    if os.path.isfile(os.path.join(out, "events.jsonl")):
        with open(os.path.join(out, "events.jsonl")) as f:
            n_ops = sum(1 for _ in f)
    return {"accuracy": summary["accuracy"], "correct": summary["correct"], "n": summary["n"],
            "val_loss": res["val_loss"], "train_s": res["wall_s"], "eval_s": time.time() - t1,
            "peak_mem_gib": res["peak_mem_gib"], "operations": n_ops, "total_s": time.time() - t0,
            "torch": torch.__version__}


def start(spec, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    for name in RUN_FILES:  # a fresh run's logs
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    with open(os.path.join(run_dir, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    log = open(os.path.join(run_dir, "stdout.txt"), "w")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={run_dir}/spec.json"],
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return proc, log


def quick_settings(cfg, argv, quick):
    """--quick: the quick settings, except those given on the command line."""
    given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    cfg.update({k: v for k, v in quick.items() if k not in given})


def read_results(path):
    """{key: row} of a driver's results.jsonl (none yet: {}); a line that is not a result is a ConfigError."""
    done = {}
    if os.path.isfile(path):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                    done[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{path}:{n}: not a result line (move the file away to start over)") from None
    return done


def finish(proc, log, run_dir):
    log.close()
    with open(os.path.join(run_dir, "stdout.txt")) as f:
        text = f.read()
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        last = [x for x in text.splitlines() if x.strip()][-1:] or ["?"]
        raise RuntimeError(f"{run_dir}: run failed ({last[0]}); its output is in {run_dir}/stdout.txt")
    return json.loads(lines[-1][len("RESULT "):])


def demo_task(cfg):
    """The demo's task with cfg's answer_form: base, train and test files (built by demo.py's code when missing or
    out of date). The data goes beside the results (the demo's own build keeps its settings); the base goes with the
    demo's, keyed by what made it, pretrained with base_threads threads so any machine builds the same one."""
    import demo
    import torch
    import train
    task = dict(demo.DEFAULTS, answer_form=cfg["answer_form"], data_dir=os.path.join(cfg["out_dir"], "data"))
    data_dir = demo.prepare_data(task)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["base_threads"])
    try:
        base = demo.build_base(data_dir, task, train.run)
    finally:
        torch.set_num_threads(threads)
    return base, os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "test.jsonl")


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    if cfg["worker"]:
        with open(cfg["worker"]) as f:
            print("RESULT " + json.dumps(run_one(json.load(f))), flush=True)
        return
    if cfg["quick"]:
        quick_settings(cfg, argv, QUICK)
    import torch
    import dataset
    import train
    labels = [m.strip() for m in cfg["methods"].split(",") if m.strip()]
    if labels == ["table"]:
        labels = [m for m in TABLE.split(",") if knows(train, m)]
        print("the full table: " + ", ".join(labels) + "; not in train.py (yet): " +
              (", ".join(m for m in TABLE.split(",") if m not in labels) or "none"))
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods: a method is listed twice: {cfg['methods']}")
    ranks = [int(r) for r in str(cfg["ranks"]).split(",")]
    if cfg["seeds"] < 1 or cfg["jobs"] < 1 or cfg["threads"] < 1:
        raise ConfigError("--seeds, --jobs and --threads must be >= 1")
    if not 0 <= cfg["answer_form"] <= 1:
        raise ConfigError(f"--answer_form={cfg['answer_form']}: a share, 0 to 1")
    settings = {m: method_settings(m, train.DEFAULTS) for m in labels}
    for m in labels:  # bad names and options fail here, before any base is built or run started
        check_method(train, m, settings[m], ranks)
    base, data, test = cfg["base"], cfg["data"], cfg["test"]
    if not base:
        base, demo_data, demo_test = demo_task(cfg)
        data, test = data or demo_data, test or demo_test
    for key, path in (("base", base), ("data", data), ("test", test)):
        if not path or not os.path.exists(path):
            raise ConfigError(f"--{key}={path}: not found")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    results_path = os.path.join(cfg["out_dir"], "results.jsonl")
    done = read_results(results_path)
    # what makes a run: its settings, the code, torch, and the bytes of the base and data
    identity = {"code": code_hash(), "torch": torch.__version__, "base": sha256_tree(base),
                "data": sha256_tree(data), "test": sha256_tree(test)}
    commit = git_commit()
    steps, todo, rows = cfg["steps"], [], []
    for seed in range(cfg["seeds"]):
        for r in ranks:
            for m in labels:
                run_dir = os.path.join(cfg["out_dir"], f"{m.replace(':', '_').replace('=', '')}_r{r}_s{seed}")
                train_cfg = dict(train.DEFAULTS, out_dir=run_dir, init_from=base, data=data, val_data=test,
                                 data_format="metamathqa", max_len=MAX_LEN, r=r, alpha=2.0 * r, dropout=0.0,
                                 dt=max(2, steps // 8 // 2 * 2), p_init=cfg["p_init"], max_steps=steps,
                                 batch_size=cfg["batch_size"], micro_batch_size=cfg["batch_size"], lr=cfg["lr"],
                                 warmup_ratio=0.05, dtype="float32", device="cpu", seed=seed,
                                 log_interval=max(1, steps // 4), score_log_interval=cfg["score_log_interval"],
                                 overwrite=True)  # a run not in results.jsonl starts over
                train_cfg.update(settings[m])
                train.check_config(train_cfg)
                spec = {"label": m, "r": r, "seed": seed, "train": train_cfg, "test": test, "threads": cfg["threads"],
                        "eval_limit": cfg["eval_limit"], "eval_batch_size": cfg["eval_batch_size"],
                        "max_new_tokens": cfg["max_new_tokens"]}
                what = dict(spec, train={k: v for k, v in train_cfg.items() if k != "out_dir"}, **identity)
                key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
                if key in done:
                    rows.append(done[key])
                else:
                    todo.append((spec, run_dir, key))
    t0, running = time.time(), []
    if todo:
        print(f"{len(todo)} runs to do ({len(rows)} reused), {cfg['jobs']} at a time", flush=True)
        from tokenizer import Tokenizer
        tok = Tokenizer(base)
        for path in (data, test):  # tokenized once, here: the runs read the cache rather than all write it at once
            dataset.tokenize_file(path, tok,
                                  {"data_format": "metamathqa", "max_len": MAX_LEN, "out_dir": cfg["out_dir"]})
    while todo or running:
        while todo and len(running) < cfg["jobs"]:
            spec, run_dir, key = todo.pop(0)
            print(f"{spec['label']}, r={spec['r']}, seed {spec['seed']}: {steps} steps ...", flush=True)
            running.append(start(spec, run_dir) + (spec, run_dir, key))
        time.sleep(0.2)
        for item in [x for x in running if x[0].poll() is not None]:
            running.remove(item)
            proc, log, spec, run_dir, key = item
            try:
                res = finish(proc, log, run_dir)
            except RuntimeError:
                for other in running:  # stop the others: their results would be kept, but this run's are missing
                    other[0].kill()
                raise
            row = {"label": spec["label"], "r": spec["r"], "seed": spec["seed"], **res, "commit": commit, "key": key,
                   "method": spec["train"]["method"], "steps": steps}
            print(f"  {spec['label']}, r={spec['r']}, seed {spec['seed']}: accuracy {100 * row['accuracy']:.1f}%, "
                  f"held-out loss {row['val_loss']:.4f}, {row['operations']} operations, {row['total_s']:.0f}s",
                  flush=True)
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    summary = summarize(rows, labels, ranks, cfg["baseline"])
    n_test = max((x["n"] for x in rows), default=0)
    md = table(summary, cfg["baseline"], n_test)
    commits, torches = sorted({x["commit"] for x in rows}), sorted({x["torch"] for x in rows})
    md += (f"\n\n{len(rows)} runs, {sum(x['total_s'] for x in rows) / 60:.0f} min of run time in all "
           f"(this invocation: {(time.time() - t0) / 60:.0f} min wall, --jobs={cfg['jobs']}); "
           f"commit {', '.join(commits)}; torch {', '.join(torches)}")
    with open(os.path.join(cfg["out_dir"], "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(cfg["out_dir"], "summary.json"), "w") as f:
        json.dump({"baseline": cfg["baseline"], "n_test": n_test, "commits": commits, "torch": torches,
                   "ranks": {str(r): v for r, v in summary.items()}}, f, indent=1)
    print(md)
    return summary


def check_method(train, label, settings, ranks=()):
    """train.py's own checks of a method's settings, at each rank it will run at (a variant's option may depend on
    r: adalora:init_r=8 is fine at r = 8, not at train.py's default 64)."""
    for r in ranks or [train.DEFAULTS["r"]]:
        try:  # on a stand-in for the paths
            train.check_config(dict(train.DEFAULTS, **{"r": r, **settings}, init_from="-",
                                    data=os.path.abspath(__file__)))
        except ConfigError as e:
            raise ConfigError(f"--methods: {label}: {e}") from None


def knows(train, label):
    """Does train.py have what this method needs (as of the code here)?"""
    try:
        check_method(train, label, method_settings(label, train.DEFAULTS))
    except ConfigError:
        return False
    return True


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, RuntimeError))
