"""
Step time and peak memory of each method against our LoRA, on bench_train.py's CPU shapes. Every
method is built as train.py builds it (train.wrap, train.make_optimizer, train.make_controller) and
stepped as train.py's loop steps it (the lr factor, the penalty, clip, AdamW, then the controller
with the gradients still in place), with the controller's between-step work averaged in over
whole blocks of steps (METHOD_OPTIONS makes each method act often, as a worst case).

    python bench/bench_methods.py                                        # the default methods, both shapes
    python bench/bench_methods.py --methods=lora,beamlora --shapes=small --repeats=3
    python bench/bench_methods.py --methods=lora,dora,beamlora+dora      # "+flag": a bool option of train.py
    python bench/bench_methods.py --methods=lora,dora,peft:lora,peft:dora   # with transformers + PEFT as a reference
    python bench/bench_methods.py --threads=1                            # when other jobs share the cores
    python bench/bench_methods.py --r=8 --methods=lora,lrlora+r_max=8,lrlora   # "+option=value" of train.py

LR-LoRA at LoRA's r_max (`lrlora+r_max=8`), next to LR-LoRA at LoRA's parameter budget (`lrlora` with
--r=8 is the budget, r_max = 16 by default).

Step times are medians over interleaved repeats in one process; the ratio to LoRA is the median
of the per-repeat ratios. Peak memory: each method trains mem_steps steps in a process of its own,
peak RSS above the RSS after the imports (bench_train.py's reading). Adapters are the same size
for every method (--r), except where a method's options say otherwise.
"""
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rundir  # noqa: E402
import train  # noqa: E402
from bench_train import SHAPES, make_batch, write_checkpoint  # noqa: E402
from configurator import ConfigError, cli, parse_args  # noqa: E402
from measure import peak_rss, print_result, reset_peak_rss, run_child_spec, timed  # noqa: E402

DEFAULTS = dict(
    methods="lora,beamlora,dora,pissa,milora,beamlora+dora",  # train.py --method names (+ a bool flag such as
    # +dora: --method=beamlora --dora); the first is the reference (LoRA)
    shapes="small,big",  # bench_train.py's CPU shapes
    targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    r=16,
    alpha=32.0,
    lr=1e-3,
    block=8,  # steps per timed sample (whole controller intervals: a multiple of the methods' intervals)
    repeats=3,  # timed samples per method (median), interleaved
    warmup=8,  # steps before timing (fills AdamW's moments and the controllers' first intervals)
    memory=True,  # peak memory, each method in a subprocess
    mem_steps=4,
    threads=0,  # torch threads; 0: torch's default
    out_json="out/bench/bench_methods.json",
    child="",  # internal: a subprocess's spec (JSON)
)
# per method: train.py options that make its between-step work happen often (every 4 steps here)
METHOD_OPTIONS = {
    "beamlora": dict(dt=4, p_init=0.95, end_step=10**6),
    "adalora": dict(tinit=0, tfinal=0, deltaT=4),  # the budget falls over 10^6 steps: importance every step
    "relora": dict(relora_steps=4, relora_warmup=2),
    "increlora": dict(incre_warmup=0, incre_interval=4, top_h=1, incre_rank_num=1),  # growing throughout
    "lrlora": dict(hard_step=10**6),  # sampled masks and the budget projection on every step: its costlier phase
}


def method_options(name):
    """'beamlora+dora' -> train.py's {method: beamlora, dora: True}; 'lrlora+r_max=8' -> {method: lrlora, r_max: 8}
    (typed as train.py's defaults); plus the method's METHOD_OPTIONS."""
    method, *flags = name.split("+")
    given = parse_args([f"--{f}" for f in flags], train.DEFAULTS)  # a bare flag is True, as on train.py's command line
    return dict(METHOD_OPTIONS.get(method, {}), method=method,
                **{k: given[k] for k in (f.partition("=")[0] for f in flags)})


class Run:
    """One method on a fresh copy of the base: train.py's model, optimizer and controller."""

    def __init__(self, method, spec, path):
        from model import Transformer
        self.method, self.t, self.hf = method, 0, method.startswith("peft:")
        if self.hf:  # a reference: transformers + PEFT on the same checkpoint, the same optimizer
            return self.peft_run(method, spec, path)
        self.cfg = dict(train.DEFAULTS, r=spec["r"], alpha=spec["alpha"], dropout=0.0, lr=spec["lr"],
                        targets=spec["targets"], device="cpu", dtype="float32", **method_options(method))
        torch.manual_seed(0)
        self.model = Transformer.from_pretrained(path)
        mods = train.wrap(self.model, self.cfg)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = train.make_optimizer(self.params, self.cfg)
        self.ctl = train.make_controller(mods, self.opt, self.cfg, total=10**6)
        self.penalty, self.lr_factor = self.ctl.penalty, self.ctl.lr_factor
        self.events = 0

    def peft_run(self, method, spec, path):
        import peft
        from transformers import LlamaForCausalLM
        torch.manual_seed(0)
        self.model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(path), peft.LoraConfig(
            r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=spec["targets"].split(","),
            use_dora=method == "peft:dora"))
        self.model.train()
        self.cfg = dict(train.DEFAULTS, lr=spec["lr"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = train.make_optimizer(self.params, self.cfg)
        self.ctl = train.beamlora.Controller()  # does nothing: both sides take the same calls
        self.penalty, self.lr_factor, self.events = self.ctl.penalty, self.ctl.lr_factor, 0

    def step(self, x, y, n_tgt):
        for g in self.opt.param_groups:
            g["lr"] = self.cfg["lr"] * self.lr_factor(self.t) * g.get("lr_scale", 1.0)  # as train.py
        logits = self.model(input_ids=x, use_cache=False).logits if self.hf else self.model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        pen = self.penalty()
        obj = loss / n_tgt + (pen if pen is not None else 0)
        obj.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.t += 1
        if self.ctl.step(self.t) is not None:
            self.events += 1
        self.opt.zero_grad(set_to_none=True)
        return loss.item() / n_tgt


def bench_shape(name, cfg, path):
    shape, methods = SHAPES[name], cfg["methods"].split(",")
    spec = dict(r=cfg["r"], alpha=cfg["alpha"], lr=cfg["lr"], targets=cfg["targets"])
    batch = make_batch(shape, "cpu")
    runs = [Run(m, spec, path) for m in methods]
    for run in runs:
        timed(run, cfg["warmup"], batch)
    samples = {m: [] for m in methods}
    events0 = {run.method: run.events for run in runs}
    for rep in range(cfg["repeats"]):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]  # rotate who goes first
        for run in order:
            samples[run.method].append(timed(run, cfg["block"], batch))
    ref = samples[methods[0]]
    row = {"shape": name, **shape["model"], "seq": shape["seq"], "batch": shape["batch"], "r": cfg["r"],
           "step_s": {m: statistics.median(v) for m, v in samples.items()},
           "over_ref": {m: statistics.median(a / b for a, b in zip(v, ref)) for m, v in samples.items()},
           "events_per_block": {r.method: (r.events - events0[r.method]) / cfg["repeats"] for r in runs},
           "n_train": {r.method: sum(p.numel() for p in r.params) for r in runs}, "samples": samples}
    del runs
    if cfg["memory"]:
        children = {m: dict(spec, method=m, path=path, shape=name, steps=cfg["mem_steps"], threads=cfg["threads"])
                    for m in methods}
        row["peak_rss"] = {m: run_child_spec(__file__, c, m)["peak_mem"] for m, c in children.items()}
        row["mem_over_ref"] = {m: v / row["peak_rss"][methods[0]] for m, v in row["peak_rss"].items()}
    print(f"{name}: " + ", ".join(f"{m} {1e3 * row['step_s'][m]:.1f} ms ({row['over_ref'][m]:.3f}x)" for m in methods),
          flush=True)
    return row


def child(spec):
    import model  # noqa: F401  (the same imports on every side: the baseline RSS is comparable)
    if spec["method"].startswith("peft:"):  # and the reference's own libraries before the baseline too
        import peft  # noqa: F401
        import transformers  # noqa: F401
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    reset_peak_rss()  # the imports' transient peak can exceed a small model's footprint
    base = peak_rss()
    run = Run(spec["method"], spec, spec["path"])
    timed(run, spec["steps"], make_batch(SHAPES[spec["shape"]], "cpu"))
    print_result({"method": spec["method"], "peak_mem": peak_rss() - base})


def table(rows, methods):
    lines = ["| shape | method | trained params | ms/step | step time / " + methods[0] + " | peak RSS MiB | memory / "
             + methods[0] + " |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        for m in methods:
            mem = (f"{x['peak_rss'][m] / 2**20:.0f} | {x['mem_over_ref'][m]:.2f}") if "peak_rss" in x else "- | -"
            lines.append(f"| {x['shape']} (hidden {x['hidden_size']}, {x['batch']} x {x['seq']} tokens) | {m} | "
                         f"{x['n_train'][m]:,} | {1e3 * x['step_s'][m]:.1f} | {x['over_ref'][m]:.3f} | {mem} |")
    return "\n".join(lines)


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    if cfg["child"]:
        with open(cfg["child"]) as f:
            return child(json.load(f))
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    methods = cfg["methods"].split(",")
    for m in methods:
        if m.startswith("peft:"):
            if m not in ("peft:lora", "peft:dora"):
                raise ConfigError(f"--methods: {m!r}: the PEFT references are peft:lora and peft:dora")
            continue
        if any("=" not in f and not isinstance(train.DEFAULTS.get(f), bool) for f in m.split("+")[1:]):
            raise ConfigError(f"--methods: {m!r}: what follows '+' must be a bool option of train.py (e.g. dora) "
                              f"or option=value (e.g. r_max=8)")
        train.check_config(dict(train.DEFAULTS, init_from="x", data=__file__, **method_options(m)))  # one line
    rows = []
    for name in cfg["shapes"].split(","):
        if name not in SHAPES:
            raise ConfigError(f"--shapes: unknown shape {name!r} ({', '.join(SHAPES)})")
        with tempfile.TemporaryDirectory() as path:
            write_checkpoint(path, SHAPES[name]["model"])
            rows.append(bench_shape(name, cfg, path))
    md = (f"training step (forward + backward + clip + AdamW + the method's controller), fp32, cpu, "
          f"{torch.get_num_threads()} threads, r={cfg['r']} on {cfg['targets']}, median of {cfg['repeats']} samples of "
          f"{cfg['block']} steps:\n\n" + table(rows, methods))
    print("\n" + md)
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out_json"])), exist_ok=True)
    rundir.atomic_json({"config": cfg, "torch": torch.__version__, "shapes": rows}, cfg["out_json"])
    print(f"\nwrote {cfg['out_json']}")
    return {"shapes": rows, "markdown": md}


if __name__ == "__main__":
    cli(main, errors=(ValueError,))  # ConfigError is a ValueError
