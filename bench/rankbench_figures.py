"""
The papers' figures from bench/rankbench.py's recorded runs (matplotlib is needed here only).

    python bench/rankbench_figures.py                          # out/rankbench/results.jsonl -> bench/results/
    python bench/rankbench_figures.py --results=bench/results/rankbench_results.jsonl

rankbench_rank.png (BeamLoRA Figure 5): accuracy against rank for LoRA, BeamLoRA and LR-LoRA, and each one's
paired difference to LoRA at that rank. rankbench_dt.png (Figure 6): BeamLoRA at --rank against the number of
prune/expand operations its dt gave (labels beamlora:dt=N), LoRA's interval as a band. rankbench_pinit.png
(Figure 7): the same against p_init (labels beamlora:p_init=X). rankbench_lrlora.png: LR-LoRA's learned ranks
at --rank, attention (q, k, v, o) against MLP (gate, up, down) at each depth, over the seeds' runs. Every point
is the mean over seeds with its 95% t-interval; a difference is the mean of the per-seed differences
(compare.py's statistics). The numbers drawn go to rankbench_figures.json beside them.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from configurator import ConfigError, cli, parse_args  # noqa: E402

DEFAULTS = dict(
    results="out/rankbench/results.jsonl",  # bench/rankbench.py's records
    out_dir="bench/results",  # where the PNGs and their numbers go
    split="test",  # the records of this split only
    rank=8,  # the rank of the dt and p_init sweeps
    ranked="lora,beamlora,lrlora",  # the rank sweep's methods (the first is the baseline)
    p_init=0.9,  # the runs' --p_init: where plain beamlora sits in the p_init sweep
    runs_dir="out/rankbench/test",  # the runs' folders: LR-LoRA's learned ranks are read from their ranks.json
)


def read(path, split):
    if not os.path.isfile(path):
        raise ConfigError(f"--results={path}: no such file (run bench/rankbench.py first)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{n}: not a JSON line")
    return [x for x in rows if x.get("split") == split]


def by_seed(rows, label, r):
    return {x["seed"]: x for x in rows if x["label"] == label and x["r"] == r}


def point(runs, base=None):
    """mean and half-width over seeds of accuracy, or of the per-seed difference to base's runs."""
    from compare import interval
    seeds = sorted(set(runs) & set(base)) if base is not None else sorted(runs)
    if not seeds:
        return None
    xs = [runs[s]["accuracy"] - (base[s]["accuracy"] if base is not None else 0.0) for s in seeds]
    m, hw = interval(xs)
    return {"mean": 100 * m, "hw": 100 * hw if hw is not None else None, "n": len(seeds)}


def rank_sweep(rows, methods):
    ranks = sorted({x["r"] for x in rows if x["label"] in methods and x["r"] is not None})
    out = {}
    for m in methods:
        out[m] = {}
        for r in ranks:
            runs = by_seed(rows, m, r)
            if runs:
                out[m][r] = {"accuracy": point(runs), "vs_" + methods[0]: point(runs, by_seed(rows, methods[0], r))}
    return out


def sweep(rows, key, r, value):
    """beamlora:key=X runs at rank r, and plain beamlora's at its default -> {value(label, runs): point}."""
    out = {}
    for label in sorted({x["label"] for x in rows if x["label"].startswith(f"beamlora:{key}=")} | {"beamlora"}):
        runs = by_seed(rows, label, r)
        if runs:
            x = value(label, runs)
            out[x] = {"label": label, "accuracy": point(runs), "vs_lora": point(runs, by_seed(rows, "lora", r))}
    return dict(sorted(out.items()))


def lrlora_ranks(runs_dir, r):
    """LR-LoRA's final ranks at budget r, one run a seed -> {"layers": {depth: {"attention", "mlp"}: point},
    "attention", "mlp", "attention-mlp": point} (mean rank over the modules, then over seeds)."""
    import glob
    import re
    from compare import interval
    per_seed = {}
    for path in sorted(glob.glob(os.path.join(runs_dir, f"lrlora_r{r}_s*_*", "ranks.json"))):
        seed = int(re.search(r"_s(\d+)_", os.path.basename(os.path.dirname(path))).group(1))
        with open(path) as f:
            per_seed[seed] = json.load(f)["ranks"]
    if not per_seed:
        return {}

    def pt(xs):
        m, hw = interval(xs)
        return {"mean": m, "hw": hw, "n": len(xs)}

    def mean_rank(ranks, depth=None, attn=True):
        v = [k for name, k in ranks.items() if (depth is None or f".layers.{depth}." in name)
             and (".self_attn." in name) == attn]
        return sum(v) / len(v)
    depths = sorted({int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in next(iter(per_seed.values()))})
    seeds = sorted(per_seed)
    out = {"seeds": seeds, "layers": {}}
    for d in depths:
        out["layers"][d] = {kind: pt([mean_rank(per_seed[s], d, kind == "attention") for s in seeds])
                            for kind in ("attention", "mlp")}
    out["attention"] = pt([mean_rank(per_seed[s]) for s in seeds])
    out["mlp"] = pt([mean_rank(per_seed[s], attn=False) for s in seeds])
    out["attention-mlp"] = pt([mean_rank(per_seed[s]) - mean_rank(per_seed[s], attn=False) for s in seeds])
    return out


def draw_lrlora(data, r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    depths = list(data["layers"])
    for kind, dx in (("attention", -0.05), ("mlp", 0.05)):
        pts = [data["layers"][d][kind] for d in depths]
        ax.errorbar([int(d) + dx for d in depths], [p["mean"] for p in pts], yerr=[p["hw"] or 0.0 for p in pts],
                    capsize=3, marker="o", label=kind)
    ax.axhline(r, color="gray", lw=0.8, label=f"budget r = {r}")
    ax.set_xticks([int(d) for d in depths])
    ax.set_xlabel("layer")
    ax.set_ylabel("learned rank (mean over the modules)")
    ax.set_title(f"LR-LoRA's ranks, {len(data['seeds'])} seeds (95% t-interval)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def errorbar(ax, xs, pts, **kw):
    ys = [p["mean"] for p in pts]
    ax.errorbar(xs, ys, yerr=[p["hw"] or 0.0 for p in pts], capsize=3, marker="o", **kw)


def draw_rank(data, methods, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(methods):  # one colour a method in both panels
        rs = sorted(data[m])
        errorbar(a, rs, [data[m][r]["accuracy"] for r in rs], label=m, color=f"C{i}")
        if m != methods[0]:
            errorbar(b, rs, [data[m][r]["vs_" + methods[0]] for r in rs], label=f"{m} - {methods[0]}", color=f"C{i}")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.legend()
    a.set_ylabel("test accuracy (%)")
    b.set_ylabel(f"paired difference to {methods[0]} (points)")
    b.axhline(0, color="gray", lw=0.8)
    fig.suptitle("rankbench: accuracy against rank (mean over seeds, 95% t-interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_sweep(data, lora, xlabel, title, path, log2=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = list(data)
    errorbar(ax, xs, [data[x]["accuracy"] for x in xs], label="BeamLoRA")
    if lora:
        lo, hi = lora["mean"] - (lora["hw"] or 0.0), lora["mean"] + (lora["hw"] or 0.0)
        ax.axhspan(lo, hi, color="gray", alpha=0.3, label="LoRA (95% interval)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    cfg = parse_args(argv, DEFAULTS, __file__)
    rows = read(cfg["results"], cfg["split"])
    methods = [m.strip() for m in cfg["ranked"].split(",") if m.strip()]
    r = cfg["rank"]
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ranks = rank_sweep(rows, methods)
    ops = sweep(rows, "dt", r, lambda label, runs: round(sum(x["operations"] for x in runs.values()) / len(runs)))
    pinit = sweep(rows, "p_init", r, lambda label, runs: float(label.split("=")[1]) if "=" in label else cfg["p_init"])
    lora = point(by_seed(rows, "lora", r)) if by_seed(rows, "lora", r) else None
    ranks_lr = lrlora_ranks(cfg["runs_dir"], r)
    out = os.path.join(cfg["out_dir"], "rankbench_")
    if ranks_lr:
        draw_lrlora(ranks_lr, r, out + "lrlora.png")
    if any(ranks[m] for m in methods):
        draw_rank(ranks, methods, out + "rank.png")
    if len(ops) > 1:
        draw_sweep(ops, lora, "prune/expand operations in the run (dt)", f"BeamLoRA, r = {r}: dt", out + "dt.png")
    if len(pinit) > 1:
        draw_sweep(pinit, lora, "p_init", f"BeamLoRA, r = {r}: p_init", out + "pinit.png")
    with open(out + "figures.json", "w") as f:
        json.dump({"rank": ranks, "dt": ops, "p_init": pinit, "lora": lora, "lrlora_ranks": ranks_lr,
                   "split": cfg["split"]}, f, indent=1)
    print(f"{out}figures.json: {sum(len(v) for v in ranks.values())} rank points, {len(ops)} dt, {len(pinit)} p_init")


if __name__ == "__main__":
    cli(main, errors=(ConfigError, OSError))
