"""
The paper's Table 3 in miniature: LoRA, BeamLoRA and BeamLoRA's four ablations (docs BEAMLORA.md
section 5) at two ranks over several seeds, fine-tuned from the same base and scored on held-out
problems: mean and standard deviation of accuracy and loss, wall time and peak memory of each.

    python bench/compare.py                                   # the demo task (demo.py's base and data)
    python bench/compare.py --seeds=1 --ranks=8 --steps=60    # a quick look
    python bench/compare.py --base=CKPT --data=train.jsonl --test=test.jsonl --steps=2000 --ranks=32,64

Every run trains and evaluates in a process of its own (so peak memory is its own). Results go to
out_dir/results.jsonl, one line per run; a rerun skips the runs already there. The table goes to
out_dir/table.md. The runs keep their scores.jsonl for bench/figures.py.
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, parse_args  # noqa: E402

METHODS = {  # name -> train.py settings
    "LoRA": dict(method="lora"),
    "BeamLoRA": dict(method="beamlora"),
    "w/o expansion": dict(method="beamlora", no_expand=True),
    "w/o assessment": dict(method="beamlora", random_assess=True),
    "w/o dynamic p": dict(method="beamlora", static_p=True),
    "w/o history": dict(method="beamlora", no_history=True),
}
DEFAULTS = dict(
    out_dir="out/compare",
    base="",  # an HF checkpoint dir; empty: the demo's base (built by demo.py if missing)
    data="",  # training jsonl (metamathqa fields); empty: the demo's train.jsonl
    test="",  # held-out jsonl for accuracy (eval.py gsm8k scorer) and loss; empty: the demo's test.jsonl
    methods=",".join(METHODS),
    ranks="8,16",
    seeds=3,
    steps=500,
    lr=5e-3,
    batch_size=16,
    p_init=0.9,
    eval_limit=0,
    max_new_tokens=96,
    score_log_interval=10,
    worker="",  # internal: a run's settings (JSON) for the child process
)


def run_one(spec):
    """In the child process: train, then score the adapter on the held-out problems."""
    import eval as eval_lib
    import train
    t0 = time.time()
    res = train.train(spec["train"])
    summary = eval_lib.main([f"--model={spec['train']['init_from']}", f"--adapter={spec['train']['out_dir']}/adapter",
                             "--task=gsm8k", f"--data={spec['test']}", f"--out={spec['train']['out_dir']}/eval",
                             f"--limit={spec['eval_limit']}", "--batch_size=50",
                             f"--max_new_tokens={spec['max_new_tokens']}", "--device=cpu"])
    n_ops = 0
    events = os.path.join(spec["train"]["out_dir"], "events.jsonl")
    if os.path.isfile(events):
        with open(events) as f:
            n_ops = sum(1 for _ in f)
    return {"method": spec["method"], "r": spec["r"], "seed": spec["seed"], "accuracy": summary["accuracy"],
            "val_loss": res["val_loss"], "train_s": res["wall_s"], "peak_mem_gib": res["peak_mem_gib"],
            "operations": n_ops, "total_s": time.time() - t0}


def table(rows, methods, ranks):
    def ms(xs, scale=1.0, fmt="{:.1f}"):
        xs = [scale * x for x in xs]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return (fmt + " ± " + fmt).format(statistics.mean(xs), sd)
    head = "| method | " + " | ".join(f"r={r} accuracy % | r={r} held-out loss" for r in ranks) + \
           " | train time (s) | peak RSS (GiB) |"
    lines = [head, "|" + "---|" * (2 * len(ranks) + 3)]
    for m in methods:
        cells, times, mems = [], [], []
        for r in ranks:
            sel = [x for x in rows if x["method"] == m and x["r"] == r]
            if not sel:
                cells += ["-", "-"]
                continue
            cells += [ms([x["accuracy"] for x in sel], 100), ms([x["val_loss"] for x in sel], 1, "{:.4f}")]
            times += [x["train_s"] for x in sel]
            mems += [x["peak_mem_gib"] for x in sel]
        tail = [f"{statistics.mean(times):.0f}" if times else "-", f"{max(mems):.2f}" if mems else "-"]
        lines.append(f"| {m} | " + " | ".join(cells + tail) + " |")
    n = max((sum(1 for x in rows if x["method"] == m and x["r"] == r) for m in methods for r in ranks), default=0)
    lines.append(f"\nmean ± standard deviation over {n} seed(s); train time and memory: mean and max over all runs")
    return "\n".join(lines)


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    if cfg["worker"]:
        with open(cfg["worker"]) as f:
            print("RESULT " + json.dumps(run_one(json.load(f))))
        return
    methods = [m.strip() for m in cfg["methods"].split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {', '.join(bad)}; known: {', '.join(METHODS)}")
    ranks = [int(r) for r in str(cfg["ranks"]).split(",")]
    base, data, test = cfg["base"], cfg["data"], cfg["test"]
    if not base:  # the demo task: the same base and data as `python train.py`
        import demo
        dcfg = dict(demo.DEFAULTS)
        data_dir = demo.load_prepare().prepare(dcfg["data_dir"], seed=dcfg["seed"], n_train=dcfg["n_train"],
                                               n_test=dcfg["n_test"], n_pretrain=dcfg["n_pretrain"],
                                               vocab_size=dcfg["vocab_size"])
        import train
        base = demo.build_base(data_dir, dcfg, train.run)
        data, test = data or os.path.join(data_dir, "train.jsonl"), test or os.path.join(data_dir, "test.jsonl")
    for key, path in (("base", base), ("data", data), ("test", test)):
        if not os.path.exists(path):
            raise ConfigError(f"--{key}={path}: not found")
    import train
    os.makedirs(cfg["out_dir"], exist_ok=True)
    results_path = os.path.join(cfg["out_dir"], "results.jsonl")
    done = []
    if os.path.isfile(results_path):
        with open(results_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    steps = cfg["steps"]
    for seed in range(cfg["seeds"]):
        for r in ranks:
            for m in methods:
                if any(x["method"] == m and x["r"] == r and x["seed"] == seed for x in done):
                    continue
                run_dir = os.path.join(cfg["out_dir"], f"{m.replace('/', '').replace(' ', '_')}_r{r}_s{seed}")
                train_cfg = dict(train.DEFAULTS, out_dir=run_dir, init_from=base, data=data, val_data=test,
                                 data_format="metamathqa", max_len=256, r=r, alpha=2.0 * r, dropout=0.0,
                                 dt=max(2, steps // 8 // 2 * 2), p_init=cfg["p_init"], max_steps=steps,
                                 batch_size=cfg["batch_size"], micro_batch_size=cfg["batch_size"], lr=cfg["lr"],
                                 warmup_ratio=0.05, dtype="float32", device="cpu", seed=1000 + seed,
                                 log_interval=max(1, steps // 4), score_log_interval=cfg["score_log_interval"],
                                 overwrite=True, **METHODS[m])  # a run not in results.jsonl starts over
                spec = {"method": m, "r": r, "seed": seed, "train": train_cfg, "test": test,
                        "eval_limit": cfg["eval_limit"], "max_new_tokens": cfg["max_new_tokens"]}
                os.makedirs(run_dir, exist_ok=True)
                with open(os.path.join(run_dir, "spec.json"), "w") as f:
                    json.dump(spec, f)
                print(f"{m}, r={r}, seed {seed}: training {steps} steps ...", flush=True)
                proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                                       f"--worker={os.path.join(run_dir, 'spec.json')}"],
                                      capture_output=True, text=True, cwd=ROOT)
                with open(os.path.join(run_dir, "stdout.txt"), "w") as f:
                    f.write(proc.stdout + proc.stderr)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"{run_dir}: run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                row = json.loads(lines[-1][len("RESULT "):])
                print(f"  accuracy {100 * row['accuracy']:.1f}%, held-out loss {row['val_loss']:.4f}, "
                      f"{row['operations']} operations, {row['train_s']:.0f}s", flush=True)
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
    md = table([x for x in done if x["seed"] < cfg["seeds"]], methods, ranks)
    with open(os.path.join(cfg["out_dir"], "table.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return md


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
