"""
A miniature where rank matters: fine-tunes that must learn 384 new prices, stalls the base has only seen at
random prices (data/rankbench/generate.py: every stall and every price one token, 900 values a fact; rewriting
the base's own prices, --unseen=False, is the other option), so that how many facts an adapter can take in
within the budget, and so its rank, decides the score. The demo's task
(bench/compare.py) is at its ceiling (LoRA 98.3%) and cannot show a gain; this one can. docs/RANKBENCH.md has
the design, the runs and what did not discriminate.

    python bench/rankbench.py --quick                          # lora at r = 2 and 32, 2 seeds: 7.6 minutes
    python bench/rankbench.py                                  # base, lora r = 2, 8, 32, full; 3 seeds
    python bench/rankbench.py --methods=table --ranks=8 --seeds=5              # every method and variant
    python bench/rankbench.py --methods=lora,beamlora,lrlora --ranks=2,4,8,16,32 --seeds=3
    python bench/rankbench.py --methods=beamlora:dt=48,beamlora:p_init=0.95 --ranks=8 --seeds=3
    python bench/rankbench.py --methods=lora --ranks=8 --seeds=1 --split=val --lr=1e-2   # choosing settings
    python bench/rankbench_figures.py                          # the rank, dt and p_init figures from the records

The base: a LLaMA pretrained from scratch on the generator's corpus (the price problems at the old prices, and
at random prices for other stalls) by demo.py's own build_base, cached in out_dir/base/<key>/ and keyed as the
demo's (settings, code, data bytes, torch, threads). Each run (method x rank x seed) is one process with
--threads torch threads (one: a run's numbers do not depend on how many run at once), fine-tunes the base
and is scored by eval.py's gsm8k scorer on the held-out problems of --split, beside `recall`, the share of
the asked prices the model's solution states right (the table it holds, apart from copying it to the answer). Method
"base" scores the base alone; "full" and the other methods take compare.py's names, variants and options
(method:key=value). A rank-free method (base, full) runs once per seed whatever --ranks says.

Seed s gives every method the same data order and initial A; a contrast "A-B" (cells named label_r<r>, or
label for a rank-free method) is the mean of the per-seed differences with its 95% t-interval (compare.py's
statistics). Each finished run is appended at once to out_dir/results.jsonl with the git commit and a key of
everything that made it (settings, code, torch, the bytes of base and data); a rerun reuses a run only when
its key matches. The table goes to out_dir/table.md, its numbers to out_dir/summary.json.
"""
import hashlib
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
out_dir = "out/rankbench"  # the data, the base (base/<key>/), one folder per run, results.jsonl, table.md
# the task (data/rankbench/generate.py)
data_seed = 0  # the table, the problems
n_stalls = 512  # stalls in the price table: the prices the base learns
n_new = 384  # how many prices the fine-tune teaches (0: all n_stalls)
unseen = True  # the taught stalls are outside the base's table (new facts); False: n_new of its own (edits)
rounds = 25  # every price is in this many training problems (on average, with spread)
spread = 0.0  # > 0: a price's training problems from rounds*(1-spread) to rounds*(1+spread): frequent and rare facts
even_eval = False  # val and test ask every taught price equally often (else at random)
n_val = 500  # validation problems: settings are chosen on these (--split=val), never on test
n_test = 1000  # held-out problems
n_pretrain = 40000  # pieces of pretraining text
# the base: demo.py's LLaMA shape and pretraining, on this task's corpus
base_seed = 0  # the base's pretraining seed (every run fine-tunes the same base)
dim = 128  # hidden size
n_layers = 4  # transformer blocks
n_heads = 4  # attention heads
pretrain_steps = 2000  # steps of 8 blocks of 256 tokens
pretrain_lr = 3e-3  # peak learning rate of the pretraining
base_threads = 1  # torch threads of the pretraining (part of the base's key)
base = ""  # an HF checkpoint dir to fine-tune instead (one built here before the code that trains it changed)
# the runs
methods = "base,lora,full"  # comma-separated: base (no fine-tune), train.py methods, compare.py's variants
ranks = "2,8,32"  # LoRA ranks (alpha = 2r)
seeds = 3  # seeds 0 .. seeds-1
steps = 600  # optimizer steps of batch_size problems
batch_size = 16  # problems per step
lr = 4e-3  # peak learning rate of every LoRA-family method, chosen for LoRA on val (docs/RANKBENCH.md)
p_init = 0.9  # BeamLoRA's initial top-p (as compare.py)
split = "test"  # which held-out problems score the runs: test, or val while choosing settings
eval_limit = 0  # the first this many problems of the split; 0: all
eval_batch_size = 100  # problems decoded at once
max_new_tokens = 40  # a solution is about 20 tokens
contrasts = "lora_r32-lora_r2,lora_r8-lora_r2,lora_r32-lora_r8,*-lora_r8"  # paired differences (*: every cell)
threads = 1  # torch threads per run (part of a run's key)
jobs = 2  # runs at once (one thread each: what 2 cores do best)
quick = False  # lora at r = 2 and 32, 2 seeds, 300 test problems, a base on 2 threads (what is not given)
worker = ""  # internal: a run's spec (JSON) for the child process
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
del DEFAULTS["ROOT"]
# -----------------------------------------------------------------------------
QUICK = dict(methods="lora", ranks="2,32", seeds=2, eval_limit=300, contrasts="lora_r32-lora_r2",
             base_threads=2)  # its own base, pretrained on 2 threads: 4.6 min instead of 8 (a base of its own key)
RANK_FREE = ("base", "full")
MAX_LEN = 96  # tokens per example (a problem with its solution: about 64)
TASK_KEYS = ("n_stalls", "n_new", "unseen", "rounds", "spread", "even_eval", "n_val", "n_test", "n_pretrain")
CODE = ["bench/rankbench.py", "bench/compare.py", "data/rankbench/generate.py", "data/demo/prepare.py"]


def generator():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rankbench_generate",
                                                  os.path.join(ROOT, "data", "rankbench", "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def code_hash():
    """The code a run executes: every top-level .py file, this script and the generators (docstrings aside)."""
    import compare
    return compare.code_hash(CODE)


def task(cfg):
    """-> (data dir, base model dir): the generated data and the pretrained base, each built once for its key."""
    import demo
    import torch
    import train
    data = generator().prepare(out_dir=os.path.join(cfg["out_dir"], "data"), seed=cfg["data_seed"],
                               **{k: cfg[k] for k in TASK_KEYS})
    base_cfg = dict(out_dir=cfg["out_dir"], dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                    pretrain_steps=cfg["pretrain_steps"], pretrain_lr=cfg["pretrain_lr"], seed=cfg["base_seed"])
    if cfg["base"]:  # its bytes are in every run's key
        if not os.path.isfile(os.path.join(cfg["base"], "model.safetensors")):
            raise ConfigError(f"--base={cfg['base']}: no model.safetensors there")
        return data, cfg["base"]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["base_threads"])
    try:
        base = demo.build_base(data, base_cfg, train.run)
    finally:
        torch.set_num_threads(threads)
    return data, base


def run_one(spec):
    """In the child process: fine-tune (unless the method is base), then score on the split's problems."""
    import torch
    torch.set_num_threads(spec["threads"])
    import eval as eval_lib
    t0, c0 = time.time(), time.process_time()
    res, out = {}, spec["run_dir"]
    method = spec["train"]["method"] if spec["train"] else "base"
    if spec["train"]:
        import train
        res = train.train(spec["train"])
    t1 = time.time()
    weights = {"base": [f"--model={spec['base']}"], "full": [f"--model={out}/model"],
               "relora": [f"--model={out}/merged"]}.get(method, [f"--model={spec['base']}", f"--adapter={out}/adapter"])
    summary = eval_lib.main(weights + ["--task=gsm8k", f"--data={spec['test']}", f"--out={out}/eval",
                                       f"--limit={spec['eval_limit']}", f"--batch_size={spec['eval_batch_size']}",
                                       f"--max_new_tokens={spec['max_new_tokens']}", "--device=cpu"])
    gen = generator()
    table, old = gen.read_table(spec["data_dir"]), gen.read_table(spec["data_dir"], "old_price")
    with open(os.path.join(out, "eval", "gsm8k_samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    with open(spec["test"]) as f:
        questions = [json.loads(line)["question"] for line in f][:len(samples)]
    rec = [gen.recall(s["output"], q, table) for s, q in zip(samples, questions)]
    rec_old = [gen.recall(s["output"], q, old) for s, q in zip(samples, questions)]
    ops = 0  # BeamLoRA's prune/expand operations (paper Figure 6 counts them)
    if os.path.isfile(os.path.join(out, "events.jsonl")):
        with open(os.path.join(out, "events.jsonl")) as f:
            ops = sum(json.loads(line).get("kind") == "prune_expand" for line in f)
    return {"accuracy": summary["accuracy"], "correct": summary["correct"], "n": summary["n"],
            "invalid_rate": summary["invalid_rate"], "recall": sum(rec) / len(rec),
            "recall_old": sum(rec_old) / len(rec_old), "operations": ops,
            "val_loss": res.get("val_loss"), "train_s": res.get("wall_s", 0.0), "eval_s": time.time() - t1,
            "peak_mem_gib": res.get("peak_mem_gib"), "total_s": time.time() - t0,
            "cpu_s": time.process_time() - c0, "torch": torch.__version__}


def start(spec):
    """The run's child process (this script with --worker), its output to run_dir/stdout.txt."""
    run_dir = spec["run_dir"]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "spec.json"), "w") as f:
        json.dump(spec, f, indent=1)
    log = open(os.path.join(run_dir, "stdout.txt"), "w")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--worker={run_dir}/spec.json"],
                            stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    return proc, log


def cell(label, r):
    return label if r is None else f"{label}_r{r}"


def expand(con, cells):
    """"*-lora_r8": every other cell against lora_r8; any other contrast as it is."""
    a, _, b = con.partition("-")
    return [f"{c}-{b}" for c in cells if c != b] if a == "*" else [con]


def summarize(rows, contrasts):
    """-> ({cell: stats over seeds}, {contrast: paired stats}); compare.py's t-intervals."""
    from compare import interval
    by = {}
    for x in rows:
        by.setdefault(cell(x["label"], x["r"]), {})[x["seed"]] = x
    cells = {}
    for c, runs in by.items():
        seeds = sorted(runs)
        st = {"n": len(seeds), "seeds": seeds}
        for key in ("total_s", "train_s", "cpu_s"):  # means over the seeds
            st[key] = sum(runs[s].get(key, 0.0) for s in seeds) / len(seeds)
        for key in ("accuracy", "recall"):
            st[key], st[key + "_hw"] = interval([runs[s][key] for s in seeds])
        cells[c] = st
    diffs = {}
    for con in [c for con in contrasts for c in expand(con, by)]:
        a, _, b = con.partition("-")
        if a not in by or b not in by:
            continue
        seeds = sorted(set(by[a]) & set(by[b]))
        if not seeds:
            continue
        st = {"n": len(seeds), "seeds": seeds}
        for key in ("accuracy", "recall"):
            st[key], st[key + "_hw"] = interval([by[a][s][key] - by[b][s][key] for s in seeds])
        diffs[con] = st
    return cells, diffs


def fmt(m, hw, delta=False):
    if hw is None:
        return f"{100 * m:+.1f}" if delta else f"{100 * m:.1f}"
    if delta:
        return f"{100 * m:+.1f} [{100 * (m - hw):+.1f}, {100 * (m + hw):+.1f}]"
    return f"{100 * m:.1f} ± {100 * hw:.1f}"


def table(cells, diffs, n_test, split):
    lines = ["| run | seeds | accuracy % | recall % | wall time (s): fine-tune + scoring | CPU time (s) |",
             "|---|---|---|---|---|---|"]
    for c, st in cells.items():
        lines.append(f"| {c} | {st['n']} | {fmt(st['accuracy'], st['accuracy_hw'])} | "
                     f"{fmt(st['recall'], st['recall_hw'])} | "
                     f"{st['train_s']:.0f} + {st['total_s'] - st['train_s']:.0f} | {st['cpu_s']:.0f} |")
    lines += ["", "| contrast | seeds | Δ accuracy (points) | Δ recall (points) |", "|---|---|---|---|"]
    for con, st in diffs.items():
        lines.append(f"| {con} | {st['n']} | {fmt(st['accuracy'], st['accuracy_hw'], True)} | "
                     f"{fmt(st['recall'], st['recall_hw'], True)} |")
    lines.append(f"\naccuracy: eval.py's gsm8k scorer on {n_test} {split} problems; recall: the share of the asked "
                 "prices the solution states right; mean over seeds ± the half-width of its 95% t-interval; Δ: mean "
                 "of the per-seed differences [95% t-interval, n - 1 degrees of freedom]")
    return "\n".join(lines)


def main(argv):
    cfg = parse_args(argv, DEFAULTS, __file__)
    if cfg["worker"]:
        with open(cfg["worker"]) as f:
            print("RESULT " + json.dumps(run_one(json.load(f))), flush=True)
        return
    if cfg["quick"]:
        import compare
        compare.quick_settings(cfg, argv, QUICK)
    if cfg["split"] not in ("test", "val"):
        raise ConfigError(f"--split={cfg['split']}: test or val")
    if cfg["seeds"] < 1 or cfg["jobs"] < 1 or cfg["threads"] < 1:
        raise ConfigError("--seeds, --jobs and --threads must be >= 1")
    import compare
    import torch
    import train
    labels = [m.strip() for m in cfg["methods"].split(",") if m.strip()]
    if labels == ["table"]:  # compare.py's full table: every method and variant, and the base
        labels = ["base"] + [m for m in compare.TABLE.split(",") if compare.VARIANTS.get(m, {}).get("method", m)
                             in train.METHODS]
    ranks = [int(r) for r in str(cfg["ranks"]).split(",")]
    settings = {m: compare.method_settings(m, train.DEFAULTS) for m in labels if m != "base"}
    for m in settings:
        compare.check_method(train, m, settings[m], ranks)
    contrasts = [c.strip() for c in cfg["contrasts"].split(",") if c.strip()]
    data, base = task(cfg)
    train_path, test = os.path.join(data, "train.jsonl"), os.path.join(data, f"{cfg['split']}.jsonl")
    results_path = os.path.join(cfg["out_dir"], "results.jsonl")
    done = compare.read_results(results_path)
    identity = {"code": code_hash(), "torch": torch.__version__, "base": compare.sha256_tree(base),
                "data": compare.sha256_tree(train_path), "test": compare.sha256_tree(test)}
    commit, steps = compare.git_commit(), cfg["steps"]
    todo, rows = [], []
    for seed in range(cfg["seeds"]):
        for m in labels:
            rank_free = m == "base" or settings[m]["method"] in RANK_FREE
            for r in [None] if rank_free else ranks:
                name = f"{cell(m, r).replace(':', '_').replace('=', '')}_s{seed}"
                run_dir = os.path.join(cfg["out_dir"], cfg["split"], name)  # + the key, below: one folder per run
                train_cfg = {}
                if m != "base":
                    train_cfg = dict(train.DEFAULTS, out_dir=run_dir, init_from=base, data=train_path,
                                     val_data=os.path.join(data, "val.jsonl"), data_format="metamathqa",
                                     max_len=MAX_LEN, r=r or 8, alpha=2.0 * (r or 8), dropout=0.0,
                                     dt=max(2, steps // 8 // 2 * 2), p_init=cfg["p_init"], max_steps=steps,
                                     batch_size=cfg["batch_size"], micro_batch_size=cfg["batch_size"], lr=cfg["lr"],
                                     warmup_ratio=0.05, dtype="float32", device="cpu", seed=seed,
                                     log_interval=max(1, steps // 4), overwrite=True,
                                     score_log_interval=max(1, steps // 20))  # ranks over training (LR-LoRA's)
                    train_cfg.update(settings[m])
                    train.check_config(train_cfg)
                spec = {"label": m, "r": r, "seed": 0 if m == "base" else seed, "train": train_cfg, "test": test,
                        "threads": cfg["threads"], "eval_limit": cfg["eval_limit"],
                        "eval_batch_size": cfg["eval_batch_size"], "max_new_tokens": cfg["max_new_tokens"]}
                what = dict(spec, train={k: v for k, v in train_cfg.items() if k != "out_dir"}, **identity)
                key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
                run_dir = f"{run_dir}_{key[:8]}"
                if train_cfg:
                    train_cfg["out_dir"] = run_dir
                spec.update(run_dir=run_dir, base=base, data_dir=data)
                if m == "base" and seed > 0:  # the base alone is the same every seed: its seed-0 run, paired
                    todo.append(("copy", key, seed))
                elif key in done:
                    rows.append(done[key])
                else:
                    todo.append((spec, key, seed))
    copies = [t for t in todo if t[0] == "copy"]
    todo = [t for t in todo if t[0] != "copy"]
    if todo:
        print(f"{len(todo)} runs to do ({len(rows)} reused), {cfg['jobs']} at a time", flush=True)
        from tokenizer import Tokenizer
        import dataset
        tok = Tokenizer(base)
        for path in (train_path, os.path.join(data, "val.jsonl")):  # tokenized once, here, not by every run at once
            dataset.tokenize_file(path, tok, {"data_format": "metamathqa", "max_len": MAX_LEN,
                                              "out_dir": cfg["out_dir"]})
    t0, running = time.time(), []
    while todo or running:
        while todo and len(running) < cfg["jobs"]:
            spec, key, _ = todo.pop(0)
            print(f"{cell(spec['label'], spec['r'])}, seed {spec['seed']} ...", flush=True)
            running.append(start(spec) + (spec, key))
        time.sleep(0.2)
        for item in [x for x in running if x[0].poll() is not None]:
            running.remove(item)
            proc, log, spec, key = item
            try:
                res = compare.finish(proc, log, spec["run_dir"])
            except RuntimeError:
                for other in running:
                    other[0].kill()
                raise
            row = {"label": spec["label"], "r": spec["r"], "seed": spec["seed"], **res, "commit": commit, "key": key,
                   "steps": steps if spec["train"] else 0, "split": cfg["split"],
                   "lr": spec["train"].get("lr"), "method": spec["train"].get("method", "base")}
            print(f"  {cell(spec['label'], spec['r'])}, seed {spec['seed']}: accuracy {100 * row['accuracy']:.1f}%, "
                  f"recall {100 * row['recall']:.1f}%, {row['train_s']:.0f}s fine-tune, {row['total_s']:.0f}s in all "
                  f"({row['cpu_s']:.0f}s CPU)",
                  flush=True)
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    for _, key, seed in copies:  # the base's one run, stood in for every seed (it has no seed)
        rows += [dict(x, seed=seed) for x in rows if x["label"] == "base" and x["seed"] == 0][:1]
    cells, diffs = summarize(rows, contrasts)
    n_test = max((x["n"] for x in rows), default=0)
    md = table(cells, diffs, n_test, cfg["split"])
    md += (f"\n\n{len(rows)} rows, commit {', '.join(sorted({x['commit'] for x in rows}))}; torch "
           f"{', '.join(sorted({x['torch'] for x in rows}))}; this invocation {(time.time() - t0) / 60:.1f} min")
    with open(os.path.join(cfg["out_dir"], f"table_{cfg['split']}.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(cfg["out_dir"], f"summary_{cfg['split']}.json"), "w") as f:
        json.dump({"cells": cells, "contrasts": diffs, "n_test": n_test}, f, indent=1)
    print(md)
    return cells, diffs


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, RuntimeError))
