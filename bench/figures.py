"""
The paper's figures from our own runs (matplotlib is needed here only: pip install matplotlib).

    python bench/figures.py                  # the r=8, seed 0 lora and beamlora runs of bench/compare.py
    python bench/figures.py --runs=out/compare/lora_r16_s1,out/compare/beamlora_r16_s1 --eval_limit=100

rank_importance.png (paper Figure 2): importance of the ranks over training, read from each run's
scores.jsonl: for every module the ranks sorted by importance and normalised to a mean of 1, the
deciles averaged over modules. LoRA's importance is the Frobenius norm of each rank's update
||b_i a_i||; BeamLoRA's is its score s_i. A flat band means every rank matters about equally.

pruning.png (paper Figures 1 and 4): in every module the least important ranks are removed (10%,
20%, ... by the run's final importance), and the adapter is scored on the held-out problems
(accuracy, eval.py's gsm8k scorer, and loss). Numbers also in pruning.json.
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import cli, parse_args  # noqa: E402

DEFAULTS = dict(runs="out/compare/lora_r8_s0,out/compare/beamlora_r8_s0", out_dir="out/figures",
                fractions="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", eval_limit=100, max_new_tokens=96)


def read_scores(run):
    with open(os.path.join(run, "scores.jsonl")) as f:
        return [json.loads(line) for line in f]


def importance_key(run):
    with open(os.path.join(run, "spec.json")) as f:
        return "score" if json.load(f)["train"]["method"] == "beamlora" else "norm"


def deciles_over_steps(rows, key):
    """-> steps, (steps, 9) tensor: deciles of the per-module normalised importance, mean over modules."""
    steps, out = [], []
    for row in rows:
        per_module = []
        for m in row["modules"].values():
            v = torch.tensor(m[key], dtype=torch.float64)
            v = v / v.mean().clamp_min(1e-30)
            per_module.append(torch.quantile(v, torch.linspace(0.1, 0.9, 9, dtype=torch.float64)))
        steps.append(row["step"])
        out.append(torch.stack(per_module).mean(0))
    return steps, torch.stack(out)


def final_importance(run, key):
    """{module: (r,) importance} at the end of the run: scores from ckpt.pt, norms from the adapter."""
    import peft_io
    from model import load_safetensors
    if key == "score":
        ck = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(run, "spec.json")) as f:
            tau = json.load(f)["train"]["tau"]
        return {n[:-len(".gate.g")]: torch.softmax(g / tau, 0) for n, g in ck["params"].items()
                if n.endswith(".gate.g")}
    ad = load_safetensors(os.path.join(run, "adapter", "adapter_model.safetensors"))
    out = {}
    for k, a in ad.items():
        if k.endswith(".lora_A.weight"):
            name = k[len("base_model.model."):-len(".lora_A.weight")]
            b = ad[peft_io.peft_key(name, "lora_B")]
            out[name] = b.float().norm(dim=0) * a.float().norm(dim=1)  # ||b_i a_i||_F = ||b_i|| ||a_i||
    return out


def pruned_adapter(run, importance, fraction, dst):
    """A copy of run/adapter with the floor(fraction * r) least important ranks of every module removed."""
    from model import load_safetensors, save_safetensors
    import shutil
    ad = dict(load_safetensors(os.path.join(run, "adapter", "adapter_model.safetensors")))
    for name, imp in importance.items():
        k = int(fraction * len(imp))
        if k:
            drop = torch.argsort(imp, stable=True)[:k]
            key = f"base_model.model.{name}.lora_A.weight"
            a = ad[key].clone()
            a[drop] = 0  # rank i contributes b_i a_i x: a zero row removes it
            ad[key] = a
    os.makedirs(dst, exist_ok=True)
    save_safetensors(ad, os.path.join(dst, "adapter_model.safetensors"))
    shutil.copy(os.path.join(run, "adapter", "adapter_config.json"), dst)
    return dst


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import eval as eval_lib
    runs = [r for r in cfg["runs"].split(",") if r]
    os.makedirs(cfg["out_dir"], exist_ok=True)
    labels = {run: ("BeamLoRA" if importance_key(run) == "score" else "LoRA") + f" ({os.path.basename(run)})"
              for run in runs}

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        steps, dec = deciles_over_steps(read_scores(run), importance_key(run))
        cmap = plt.get_cmap("viridis")
        for i in range(9):
            ax.plot(steps, dec[:, i], color=cmap(i / 8), label=f"{10 * (i + 1)}%")
        ax.set_title(labels[run], fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("rank importance / module mean (deciles)")
    axes[0][-1].legend(fontsize=7, title="decile", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg["out_dir"], "rank_importance.png"), dpi=120)

    fractions = [float(x) for x in cfg["fractions"].split(",")]
    curves = {}
    for run in runs:
        with open(os.path.join(run, "spec.json")) as f:
            spec = json.load(f)
        base, test = spec["train"]["init_from"], spec["test"]
        imp = final_importance(run, importance_key(run))
        curves[labels[run]] = []
        for frac in fractions:
            ad = pruned_adapter(run, imp, frac,
                                os.path.join(cfg["out_dir"], "pruned", os.path.basename(run), f"{frac:.2f}"))
            common = [f"--model={base}", f"--adapter={ad}", f"--data={test}", "--device=cpu", f"--out={ad}/eval"]
            acc = eval_lib.main(common + ["--task=gsm8k", f"--limit={cfg['eval_limit']}", "--batch_size=50",
                                          f"--max_new_tokens={cfg['max_new_tokens']}"])
            ppl = eval_lib.main(common + ["--task=ppl", "--batch_size=50"])
            curves[labels[run]].append({"fraction": frac, "accuracy": acc["accuracy"], "loss": ppl["loss"]})
            print(f"{labels[run]}: {100 * frac:.0f}% pruned: accuracy {100 * acc['accuracy']:.1f}%, "
                  f"loss {ppl['loss']:.4f}")
    with open(os.path.join(cfg["out_dir"], "pruning.json"), "w") as f:
        json.dump(curves, f, indent=1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, pts in curves.items():
        xs = [100 * p["fraction"] for p in pts]
        a1.plot(xs, [100 * p["accuracy"] for p in pts], marker="o", label=name)
        a2.plot(xs, [p["loss"] for p in pts], marker="o", label=name)
    a1.set_ylabel("held-out accuracy (%)")
    a2.set_ylabel("held-out loss")
    for ax in (a1, a2):
        ax.set_xlabel("ranks pruned per module, least important first (%)")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg["out_dir"], "pruning.png"), dpi=120)
    print(f"wrote {cfg['out_dir']}/rank_importance.png, pruning.png, pruning.json")
    return curves


if __name__ == "__main__":
    cli(main)
