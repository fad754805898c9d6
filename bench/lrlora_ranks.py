"""
LR-LoRA's learned ranks in one figure (matplotlib needed here only): per layer depth, attention (q, k, v, o)
against MLP (gate, up, down), and over training, for the demo model or any run of train.py --method=lrlora.

    python bench/lrlora_ranks.py                       # fine-tune bench/compare.py's base with LR-LoRA, then draw
    python bench/lrlora_ranks.py --r=16 --seed=2       # another budget or fine-tuning seed (the same base)
    python bench/lrlora_ranks.py --run=out/my_lrlora   # draw a run of your own (trained with --score_log_interval=N)

The fine-tune is bench/compare.py's lrlora run (its data and base, demo.py's lr and batch, alpha = 2r; --steps, 500)
with --method=lrlora and the rank masks logged every score_log_interval steps (scores.jsonl: a module's rank is its
number of mask values > 0.5).
Writes out_dir/lrlora_ranks.png and a copy of the run's ranks.json.
"""
import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, cli, parse_args  # noqa: E402
from lrlora import ATTN  # noqa: E402

ORDER = ATTN + ("gate_proj", "up_proj", "down_proj")
DEFAULTS = dict(run="", out_dir="bench/results", work_dir="out/lrlora_ranks", r=8, seed=0,  # seed: the fine-tune's
                steps=500, score_log_interval=10)  # steps: the figure's (the demo fine-tunes for 1000)


def demo_run(cfg):
    """Fine-tune bench/compare.py's base with LR-LoRA as its lrlora run does; returns the run's directory."""
    import compare
    import demo
    import train
    d = demo.DEFAULTS
    # bench/compare.py's task and base (reused from out/demo/base/<key> when its key matches)
    base, data, test = compare.demo_task(dict(compare.DEFAULTS, out_dir=cfg["work_dir"]))
    run = os.path.join(cfg["work_dir"], f"lrlora_r{cfg['r']}_s{cfg['seed']}")
    shutil.rmtree(run, ignore_errors=True)
    train.train(dict(train.DEFAULTS, out_dir=run, init_from=base, data=data, val_data=test,
                     data_format="metamathqa", max_len=256,
                     method="lrlora", r=cfg["r"], alpha=2.0 * cfg["r"], dropout=0.0, max_steps=cfg["steps"],
                     batch_size=d["batch_size"], micro_batch_size=d["batch_size"], lr=d["finetune_lr"],
                     warmup_ratio=0.05, dtype="float32", device="cpu", seed=cfg["seed"],
                     log_interval=max(1, cfg["steps"] // 20), score_log_interval=cfg["score_log_interval"]))
    return run


def read_run(run):
    """-> ranks.json, [(step, {module: rank})] over training, the run's config."""
    paths = {k: os.path.join(run, k) for k in ("ranks.json", "scores.jsonl", "ckpt.pt")}
    for k in ("ranks.json", "scores.jsonl"):
        if not os.path.isfile(paths[k]):
            raise ConfigError(f"{paths[k]}: not found "
                              "(a run of train.py --method=lrlora --score_log_interval=N writes it)")
    with open(paths["ranks.json"]) as f:
        final = json.load(f)
    history = []
    with open(paths["scores.jsonl"]) as f:
        for line in f:
            row = json.loads(line)
            history.append((row["step"], {n: sum(s > 0.5 for s in m["score"]) for n, m in row["modules"].items()}))
    return final, history


def split(name):
    """'model.layers.3.mlp.up_proj' -> (3, 'up_proj')"""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]), parts[-1]


def draw(final, history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ranks = final["ranks"]
    kinds = [k for k in ORDER if any(split(n)[1] == k for n in ranks)]
    layers = sorted({split(n)[0] for n in ranks})
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.25]})
    blues, oranges = plt.get_cmap("Blues"), plt.get_cmap("Oranges")
    for j, kind in enumerate(kinds):
        attn = kind in ATTN
        color = blues(0.45 + 0.15 * j) if attn else oranges(0.5 + 0.2 * (j - 4))
        ys = [ranks.get(n) for L in layers for n in ranks if split(n) == (L, kind)]
        a1.plot(layers, ys, marker="o", color=color, linestyle="-" if attn else "--", label=kind.replace("_proj", ""))
    a1.axhline(final["budget_rank"], color="gray", linewidth=0.8, linestyle=":")
    a1.set_xlabel("layer")
    a1.set_xticks(layers)
    a1.set_ylabel("learned rank")
    a1.set_ylim(-0.5, final["r_max"] + 0.5)
    a1.set_title("final ranks by depth (dotted: the budget r)", fontsize=9)
    a1.legend(fontsize=7, ncol=2)

    steps = [s for s, _ in history]
    costs = final.get("costs")
    for label, pick, color in (("attention (mean)", lambda n: split(n)[1] in ATTN, blues(0.8)),
                               ("MLP (mean)", lambda n: split(n)[1] not in ATTN, oranges(0.8))):
        names = [n for n in ranks if pick(n)]
        if names:
            a2.plot(steps, [sum(k[n] for n in names) / len(names) for _, k in history], color=color, label=label)
    if costs:
        a2.plot(steps, [sum(costs[n] * k[n] for n in k) / sum(costs.values()) for _, k in history], color="black",
                label="all, weighted by parameters")
    a2.axhline(final["budget_rank"], color="gray", linewidth=0.8, linestyle=":")
    if final.get("hard_step"):
        a2.axvline(final["hard_step"], color="gray", linewidth=0.8, linestyle="--")
    a2.set_xlabel("step")
    a2.set_ylabel("learned rank")
    a2.set_title("over training (dashed: ranks frozen, mask hard)", fontsize=9)
    a2.legend(fontsize=7)

    names = sorted(ranks, key=lambda n: (split(n)[0], ORDER.index(split(n)[1])))
    grid = [[k[n] for _, k in history] for n in names]
    im = a3.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=final["r_max"],
                   extent=(steps[0], steps[-1], len(names) - 0.5, -0.5))
    a3.set_yticks(range(len(names)))
    a3.set_yticklabels([f"{split(n)[0]}.{split(n)[1].replace('_proj', '')}" for n in names], fontsize=5)
    a3.set_xlabel("step")
    a3.set_title("every module over training", fontsize=9)
    fig.colorbar(im, ax=a3, label="learned rank")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    run = cfg["run"] or demo_run(cfg)
    final, history = read_run(run)
    if not history:
        raise ConfigError(f"{run}/scores.jsonl: empty")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    path = os.path.join(cfg["out_dir"], "lrlora_ranks.png")
    k = final["ranks"]
    title = (f"LR-LoRA learned ranks ({run}): budget r = {final['budget_rank']}, r_max = {final['r_max']}, "
             f"{final['params']:,} of {final['budget_params']:,} budget parameters")
    draw(final, history, path, title)
    shutil.copy(os.path.join(run, "ranks.json"), os.path.join(cfg["out_dir"], "lrlora_ranks.json"))
    attn = [v for n, v in k.items() if split(n)[1] in ATTN]
    mlp = [v for n, v in k.items() if split(n)[1] not in ATTN]
    print(f"wrote {path}: mean rank attention {sum(attn) / max(1, len(attn)):.2f}, "
          f"MLP {sum(mlp) / max(1, len(mlp)):.2f}, "
          f"min {min(k.values())}, max {max(k.values())}")
    return final


if __name__ == "__main__":
    cli(main)
