"""
beamlora.py's costs. (a) One layer's forward + backward, three ways on the same shapes and weights:
our BeamLoRA layer, our plain LoRA layer and PEFT's LoRA layer (fp32, frozen base, dropout 0).
(b) One BeamLoRA snapshot and one prune/expand over a Llama-2-7B-shaped set of adapters (32 layers x
q,k,v,o,gate,up,down, r = 64) with populated AdamW moments; the base weights are never allocated.

    python bench/bench_beamlora.py                            # both parts, CPU defaults (~2 minutes)
    python bench/bench_beamlora.py --tokens_big=2048          # the 7B-like layer at 2048 tokens
    python bench/bench_beamlora.py --part=layer --repeats=3   # a quick look at (a) only
    python bench/bench_beamlora.py --part=operate --layers=4  # (b) on 4 of the 32 layers

Outputs match before anything is timed (ours vs PEFT with the same A and B). Every timing is the
median over `repeats` interleaved repeats after a warmup; ratios are the median of the per-repeat
ratios, so the pairs being compared ran side by side. Prints a markdown table, writes out_json.
"""
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import beamlora  # noqa: E402
import rundir  # noqa: E402
from configurator import ConfigError, cli, parse_args  # noqa: E402

DEFAULTS = dict(
    part="layer,operate",  # which parts to run
    device="cpu",
    threads=0,  # torch threads; 0: torch's default (one per core). 1 when other jobs share the cores:
    # oversubscribed OpenMP threads wait for each other, and small ops get 10-40x slower
    repeats=7,  # timed repeats (median), interleaved between the implementations
    warmup=2,
    min_time=0.2,  # seconds per timed sample: fast layers run several times per sample
    tokens_big=512,  # tokens through the 4096 x 4096 layer (2048 = one 7B sequence; ~4x slower)
    tokens_small=64,
    layers=32,  # (b): decoder layers of the 7B-shaped adapter set
    r_7b=64,
    op_repeats=3,
    out_json="out/bench/bench_beamlora.json",
)
# (a): (name, in_features, out_features, r, batch, tokens key)
LAYER_SHAPES = [("7B q_proj", 4096, 4096, 64, 1, "tokens_big"), ("small", 256, 256, 8, 1, "tokens_small")]
# (b): Llama-2-7B's linears, (in_features, out_features)
LINEARS_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
              "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_once(fn, inner, device):
    sync(device)
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t) / inner


def interleaved(fns, cfg):
    """{name: fn} -> {name: [seconds per call, one per repeat]}, the order alternating each repeat."""
    for fn in fns.values():
        for _ in range(cfg["warmup"]):
            fn()
    inner = {n: max(1, math.ceil(cfg["min_time"] / time_once(fn, 1, cfg["device"]))) for n, fn in fns.items()}
    times = {n: [] for n in fns}
    names = list(fns)
    for rep in range(cfg["repeats"]):
        for n in (names if rep % 2 == 0 else names[::-1]):
            times[n].append(time_once(fns[n], inner[n], cfg["device"]))
    return times


def paired_ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# (a) one layer, forward + backward

def make_layers(d_in, d_out, r, device):
    import peft
    alpha = 2.0 * r

    def base():
        torch.manual_seed(1)  # the same W0 in all three
        return nn.Linear(d_in, d_out, bias=False, device=device)

    beam = beamlora.add_scores({"m": beamlora.LoRALinear(base(), r, alpha)}, tau=0.05)["m"]
    lora = beamlora.LoRALinear(base(), r, alpha)
    holder = nn.Sequential()
    holder.add_module("lin", base())
    peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["lin"]))
    ref = holder.lin  # peft.tuners.lora.Linear, timed by itself (not through PeftModel's wrapper)
    with torch.no_grad():
        lora.lora_B.normal_(std=0.02)  # a trained-looking B, so the update shows in the output
        for A, B in ((beam.lora_A, beam.lora_B), (ref.lora_A["default"].weight, ref.lora_B["default"].weight)):
            A.copy_(lora.lora_A)
            B.copy_(lora.lora_B)
    return {"BeamLoRA": beam, "our LoRA": lora, "PEFT LoRA": ref}


def fwd_bwd(layer, x, gy):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        layer(x).backward(gy)
        x.grad = None
        for p in params:
            p.grad = None
    return step


def check_same(layers, x, gy):
    """Ours vs PEFT: outputs and gradients (x, A, B) with the same weights; BeamLoRA with s = 1 and
    then with random scores against PEFT holding diag(s) A."""
    def run(layer, A, B):
        x.grad = A.grad = B.grad = None
        y = layer(x)
        y.backward(gy)
        return [y.detach(), x.grad, A.grad, B.grad]

    def close(got, want, what):
        for g, w, part in zip(got, want, ("output", "grad x", "grad A", "grad B")):
            err, scale = (g - w).abs().max().item(), w.abs().max().item()
            assert err <= 1e-4 * max(scale, 1e-3), f"{what}: {part} differs from PEFT by {err:.2e} (scale {scale:.2e})"

    beam, lora, ref = layers["BeamLoRA"], layers["our LoRA"], layers["PEFT LoRA"]
    pA, pB = ref.lora_A["default"].weight, ref.lora_B["default"].weight
    want = run(ref, pA, pB)
    close(run(lora, lora.lora_A, lora.lora_B), want, "our LoRA")
    close(run(beam, beam.lora_A, beam.lora_B), want, "BeamLoRA, s = 1")
    with torch.no_grad():
        beam.gate.g.normal_(std=0.05)
        saved = pA.detach().clone()
        pA.copy_(beam.folded_A())
    y_peft = ref(x).detach()
    y_beam = beam(x).detach()
    err = (y_beam - y_peft).abs().max().item()
    assert err <= 1e-4 * y_peft.abs().max().item(), f"BeamLoRA with scores vs PEFT with diag(s) A: {err:.2e}"
    with torch.no_grad():
        beam.gate.g.zero_()
        pA.copy_(saved)
    x.grad = None
    for m in layers.values():
        m.zero_grad(set_to_none=True)


def bench_layers(cfg):
    rows = []
    for name, d_in, d_out, r, batch, tokens_key in LAYER_SHAPES:
        T = cfg[tokens_key]
        layers = make_layers(d_in, d_out, r, cfg["device"])
        g = torch.Generator(device=cfg["device"]).manual_seed(2)
        x = torch.randn(batch, T, d_in, device=cfg["device"], generator=g).requires_grad_()  # a mid-network input
        gy = torch.randn(batch, T, d_out, device=cfg["device"], generator=g)
        check_same(layers, x, gy)
        times = interleaved({n: fwd_bwd(m, x, gy) for n, m in layers.items()}, cfg)
        row = {"shape": name, "in": d_in, "out": d_out, "r": r, "tokens": batch * T,
               "ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
               "beam_over_lora": paired_ratio(times["BeamLoRA"], times["our LoRA"]),
               "lora_over_peft": paired_ratio(times["our LoRA"], times["PEFT LoRA"]), "times_s": times}
        rows.append(row)
        print(f"{name}: BeamLoRA {row['ms']['BeamLoRA']:.3f} ms, our LoRA {row['ms']['our LoRA']:.3f} ms, "
              f"PEFT {row['ms']['PEFT LoRA']:.3f} ms", flush=True)
        del layers, x, gy
    return rows


def layer_table(rows):
    lines = ["| layer | in x out | r | tokens | BeamLoRA ms | our LoRA ms | PEFT LoRA ms | "
             "BeamLoRA / our LoRA (aim <= 1.03) | our LoRA / PEFT (aim <= 1.0) |", "|" + "---|" * 9]
    for x in rows:
        lines.append(f"| {x['shape']} | {x['in']} x {x['out']} | {x['r']} | {x['tokens']} | "
                     f"{x['ms']['BeamLoRA']:.3f} | "
                     f"{x['ms']['our LoRA']:.3f} | {x['ms']['PEFT LoRA']:.3f} | {x['beam_over_lora']:.3f} | "
                     f"{x['lora_over_peft']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# (b) snapshot and prune/expand over 7B-shaped adapters

def adapter_set(cfg):
    """{name: LoRALinear} of the 7B shapes. The base weight is a zero-stride view of one scalar: the
    right shape for LoRALinear, 4 bytes of memory (the controller never reads it)."""
    torch.manual_seed(0)
    mods = {}
    for i in range(cfg["layers"]):
        for lin, (d_in, d_out) in LINEARS_7B.items():
            base = nn.Linear(d_in, d_out, bias=False, device="meta")
            base.weight = nn.Parameter(torch.zeros((), device=cfg["device"]).expand(d_out, d_in), requires_grad=False)
            parent = "self_attn" if lin.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            mods[f"model.layers.{i}.{parent}.{lin}"] = beamlora.LoRALinear(base, cfg["r_7b"], 2.0 * cfg["r_7b"])
    return beamlora.add_scores(mods, tau=0.05)


def bench_operate(cfg):
    mods = adapter_set(cfg)
    params = [p for m in mods.values() for p in (m.lora_A, m.lora_B, m.gate.g)]
    n_params = sum(p.numel() for p in params)
    # train.py's optimizer; one step on random gradients fills exp_avg / exp_avg_sq
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-4, fused=cfg["device"].startswith("cuda"))
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # spread-out scores: s = r softmax(g / tau) with g / tau ~ N(0, 1)
        for m in mods.values():
            m.gate.g.normal_(std=m.gate.tau)
            m.lora_B.normal_(std=0.01)
    scores = [m.gate.g.detach().clone() for m in mods.values()]
    total, dt = 1200, 100  # a 7B run's schedule (train.py: dt = total // 12); t = dt is the first operation
    ctl = beamlora.BeamController(mods, opt, dt=dt, p_init=0.95, end_step=2 * total // 3, total_steps=total)
    snap_s, op_s, pruned = [], [], 0
    for rep in range(1 + cfg["op_repeats"]):  # the first is a warmup
        ctl.snapshot = None  # free the previous one first: one snapshot in memory, as in training
        sync(cfg["device"])
        t = time.perf_counter()
        ctl.snapshot = ctl.take_snapshot()
        sync(cfg["device"])
        t1 = time.perf_counter()
        event = ctl.operate(dt)
        sync(cfg["device"])
        t2 = time.perf_counter()
        with torch.no_grad():  # the same scores each repeat, so each operation prunes the same ranks
            for m, s in zip(mods.values(), scores):
                m.gate.g.copy_(s)
        if rep:
            snap_s.append(t1 - t)
            op_s.append(t2 - t1)
        pruned = sum(len(x["pruned"]) for x in event["modules"].values())
        print(f"repeat {rep}: snapshot {t1 - t:.3f} s, prune/expand {t2 - t1:.3f} s ({pruned} ranks)", flush=True)
    return {"layers": cfg["layers"], "modules": len(mods), "r": cfg["r_7b"], "adapter_params": n_params,
            "snapshot_s": statistics.median(snap_s), "operate_s": statistics.median(op_s), "p": event["p"],
            "ranks_pruned": pruned, "ranks_total": cfg["r_7b"] * len(mods), "snapshot_all_s": snap_s,
            "operate_all_s": op_s}


def operate_table(x):
    return ("| adapters | params | snapshot s | prune/expand s | ranks re-initialised |\n|---|---|---|---|---|\n"
            f"| {x['layers']} layers x 7 modules, r={x['r']} | {x['adapter_params'] / 1e6:.1f}M | "
            f"{x['snapshot_s']:.3f} | "
            f"{x['operate_s']:.3f} | {x['ranks_pruned']} of {x['ranks_total']} (p={x['p']:.4f}) |")


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    parts = cfg["part"].split(",")
    result = {"config": cfg, "torch": torch.__version__, "threads": torch.get_num_threads()}
    md = []
    if "layer" in parts:
        result["layer"] = bench_layers(cfg)
        md.append(f"forward + backward of one layer, fp32, {cfg['device']}, {torch.get_num_threads()} threads, "
                  f"median of {cfg['repeats']}:\n\n" + layer_table(result["layer"]))
    if "operate" in parts:
        result["operate"] = bench_operate(cfg)
        md.append(f"BeamLoRA controller over 7B-shaped adapters, {cfg['device']}, median of {cfg['op_repeats']}:\n\n"
                  + operate_table(result["operate"]))
    print("\n\n".join(md))
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out_json"])), exist_ok=True)
    rundir.atomic_json(result, cfg["out_json"])
    print(f"\nwrote {cfg['out_json']}")
    return result


if __name__ == "__main__":
    cli(main, errors=(ConfigError,))
