"""
Training step time and peak memory: our model + LoRA against transformers' LlamaForCausalLM + PEFT
LoRA on the same shapes, weights, adapters, batch and optimizer as train.py (AdamW in two groups,
grad clip 1.0, loss summed over target tokens / their count), and BeamLoRA against our LoRA with the
controller's snapshots and prune/expand operations averaged into the step time.

    python bench/bench_train.py                               # CPU, fp32: the small and big shapes
    python bench/bench_train.py --shapes=small --repeats=3    # a quick look
    python bench/bench_train.py --threads=1                   # when other jobs share the cores
    python bench/bench_train.py --shapes=small --profile      # where a step's time goes, ours and HF+PEFT
    python bench/bench_train.py --gpu_recipe                  # Llama-2-7B shape on CUDA (see below)
    python bench/bench_train.py --gpu_recipe --device=cpu --tiny    # that code path at a tiny size

CPU: a tiny random Llama checkpoint written by transformers' save_pretrained, loaded by both. The
losses of the first two steps must agree (ours vs HF+PEFT, A and B copied over) before anything is
timed. Step times are medians over interleaved repeats in one process; ratios are medians of the
per-repeat ratios. Peak memory: each configuration trains a few steps in a process of its own, peak
RSS above the RSS after the imports.

--gpu_recipe: Llama-2-7B's shape (hidden 4096, 32 layers, intermediate 11008, 32 heads, vocab 32000)
with random weights, r = 64 on all seven linears, frozen base in bf16 with bf16 autocast (adapters
fp32, fused AdamW), sequence 2048, micro batch 1, activation checkpointing. Each configuration runs in
its own process: tokens/s, MFU (per token 6 N_trained + 4 N_frozen, embeddings not counted, plus
attention's 12 L d T as nanoGPT counts it; recomputation not counted) against the GPU's own peak from
train.py's table, or --peak_flops, and torch.cuda.max_memory_allocated after the model is built
(weights included). The two sides draw different random weights (same init scheme; losses are compared
on the CPU shapes). LR-LoRA joins once train.py has --method=lrlora. A process of ~30 s per
configuration; needs ~25 GB of GPU memory.

Ours is built as train.py builds it (train.wrap, make_optimizer, make_controller) and stepped as its
loop steps, with its loss (model(x, targets=y): summed, chunked, no full logits held); transformers +
PEFT computes the logits and F.cross_entropy, as the Trainer does.
"""
import json
import os
import statistics
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import beamlora  # noqa: E402
import rundir  # noqa: E402
from configurator import ConfigError, cli, parse_args  # noqa: E402
from measure import peak_rss, print_result, reset_peak_rss, run_child_spec, timed  # noqa: E402

DEFAULTS = dict(
    shapes="small,big",  # CPU shapes (SHAPES below)
    targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    r=16,
    alpha=32.0,
    lr=1e-3,
    repeats=5,  # timed samples per configuration (median), interleaved
    warmup=2,  # steps before timing; the first two are the loss check
    min_time=1.0,  # seconds per timed sample: fast steps run several times per sample
    beam_steps=8,  # steps per BeamLoRA-vs-LoRA sample (a multiple of dt)
    beam_repeats=3,
    dt=4,  # controller interval for the benchmark: a snapshot and an operation every 4 steps
    profile=False,  # also profile ours and HF+PEFT (torch.profiler): self time per op kind, ms per step
    memory=True,  # peak memory, each configuration in a subprocess
    mem_steps=4,
    threads=0,  # torch threads; 0: torch's default. 1 when other jobs share the cores (oversubscribed
    # OpenMP threads wait for each other and small ops get 10-40x slower)
    gpu_recipe=False,
    device="",  # default: cpu, or cuda for --gpu_recipe
    tiny=False,  # --gpu_recipe at a tiny shape (tests the code path, on CPU too)
    gpu_r=64,
    gpu_steps=12,  # timed steps per configuration (a multiple of dt: whole beam intervals)
    gpu_warmup=3,
    peak_flops=0.0,  # one GPU's peak FLOP/s for MFU; 0: meter.device_peak_flops (by name), none if unknown
    out_json="",  # default: out/bench/bench_train.json (bench_train_gpu.json for --gpu_recipe)
    child="",  # internal: a subprocess's spec (JSON)
)
SHAPES = {  # model config, and the batch: `batch` sequences of `seq` tokens
    "small": dict(model=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=4096), seq=128, batch=4),
    "big": dict(model=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                           num_key_value_heads=16, vocab_size=32000), seq=256, batch=4),
    "llama2-7b": dict(model=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000), seq=2048, batch=1),
    "tiny": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=256), seq=32, batch=2),
}
CONFIGS = ("ours LoRA", "HF+PEFT LoRA", "ours BeamLoRA")


# ----------------------------------------------------------------------------------------------
# the three configurations, each built and stepped as train.py does

def write_checkpoint(path, model_cfg):
    """A random fp32 Llama written by transformers (what both sides load)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**model_cfg, max_position_embeddings=4096)).save_pretrained(path)


def random_base(which, model_cfg, device, dtype):
    """A random base built directly on the device in `dtype` (a 7B in bf16 is never held in fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    conf = LlamaConfig(**model_cfg, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        if which == "hf":
            return LlamaForCausalLM._from_config(conf, dtype=dtype)
        from model import Transformer, rope_inv_freq
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # allocate in bf16 (from_config alone would allocate fp32, then cast)
        try:
            m = Transformer.from_config(conf.to_dict(), device=device, dtype=dtype)
        finally:
            torch.set_default_dtype(old)
        m.inv_freq = rope_inv_freq(m.args).to(device)  # fp32, as from_pretrained leaves it (from_config casts it)
        return m


METHODS = {"ours LoRA": dict(method="lora"), "ours BeamLoRA": dict(method="beamlora", p_init=0.95, end_step=10**6),
           "ours LR-LoRA": dict(method="lrlora", hard_step=10**6)}  # a long run's p; LR-LoRA's soft-mask phase


class Run:
    """One configuration: ours built as train.py builds it (train.wrap, make_optimizer, make_controller) and
    stepped as its loop steps (the summed loss model(x, targets=y), lr_factor / lr_scale, penalty), or
    transformers + PEFT LoRA with the same optimizer."""

    def __init__(self, name, spec, path):
        import train
        self.name, self.device, self.t, self.ops = name, spec["device"], 0, 0
        dtype = getattr(torch, spec["dtype"])
        targets = spec["targets"].split(",")
        self.hf = name.startswith("HF")
        self.cfg = dict(train.DEFAULTS, targets=spec["targets"], r=spec["r"], alpha=spec["alpha"], dropout=0.0,
                        lr=spec["lr"], dt=spec["dt"], weight_decay=0.0, **METHODS.get(name, {}))
        if self.hf:
            import peft
            from transformers import LlamaForCausalLM
            m = LlamaForCausalLM.from_pretrained(path, dtype=dtype) if path else \
                random_base("hf", spec["model"], self.device, dtype)
            m = m.to(self.device)
            if spec["grad_ckpt"]:  # every layer, as ours; transformers < 5.2x names it gradient_checkpointing_enable
                enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
                enable({"use_reentrant": False})
            m = peft.get_peft_model(m, peft.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                                       target_modules=targets, bias="none", task_type="CAUSAL_LM"))
        else:
            from model import Transformer
            m = Transformer.from_pretrained(path, device=self.device, dtype=dtype) if path else \
                random_base("ours", spec["model"], self.device, dtype)
            mods = train.wrap(m, self.cfg)
            m.gradient_checkpointing = spec["grad_ckpt"]
        m.train()
        self.model = m
        self.params = [p for p in m.parameters() if p.requires_grad]
        self.n_train = sum(p.numel() for p in self.params)
        self.n_frozen = sum(p.numel() for n, p in m.named_parameters()
                            if not p.requires_grad and "embed_tokens" not in n)
        cuda = self.device.startswith("cuda")
        self.opt = train.make_optimizer(self.params, self.cfg, fused=cuda)
        self.ctx = torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=dtype != torch.float32)
        # PEFT's side: the controller that does nothing, so both sides take the same calls
        self.ctl = beamlora.Controller() if self.hf else train.make_controller(mods, self.opt, self.cfg, total=10**6)
        self.penalty, self.lr_factor = self.ctl.penalty, self.ctl.lr_factor

    def adapters(self):
        """{our module name: (A, B)} of this model's LoRA layers."""
        if self.hf:
            return {n.removeprefix("base_model.model."): (mod.lora_A["default"].weight, mod.lora_B["default"].weight)
                    for n, mod in self.model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}
        return {n: (mod.lora_A, mod.lora_B) for n, mod in beamlora.lora_modules(self.model).items()}

    def step(self, x, y, n_tgt):
        for g in self.opt.param_groups:  # as train.py's loop (constant lr here)
            g["lr"] = self.cfg["lr"] * self.lr_factor(self.t) * g.get("lr_scale", 1.0)
        with self.ctx:
            if self.hf:
                logits = self.model(input_ids=x, use_cache=False).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
            else:
                loss = self.model(x, targets=y)  # train.py's loss: summed, chunk by chunk, no full logits held
        pen = self.penalty()
        obj = loss / n_tgt + (pen if pen is not None else 0)
        obj.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.t += 1
        if self.ctl.step(self.t) is not None:  # before zero_grad, as train.py
            self.ops += 1
        self.opt.zero_grad(set_to_none=True)
        return loss.item() / n_tgt


def make_batch(shape, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, shape["model"]["vocab_size"], (shape["batch"], shape["seq"]), generator=g)
    y = torch.full_like(x, -100)
    y[:, :-1] = x[:, 1:]  # next token; train.py's collate
    return x.to(device), y.to(device), int((y != -100).sum())


def same_adapters(runs):
    """B random (so the adapters matter), then every run gets the first run's A and B."""
    src = runs[0].adapters()
    torch.manual_seed(2)
    with torch.no_grad():
        for A, B in src.values():
            B.normal_(std=0.02)
        for run in runs[1:]:
            dst = run.adapters()
            assert set(dst) == set(src), f"{run.name}: adapted modules differ"
            for n, (A, B) in dst.items():
                A.copy_(src[n][0])
                B.copy_(src[n][1])


def peak_mem(device, base):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return peak_rss() - base


# ----------------------------------------------------------------------------------------------
# CPU: the configurations side by side in one process (timed: measure.py)

def bench_shape(name, cfg, path):
    shape = SHAPES[name]
    spec = dict(model=shape["model"], device=cfg["device"], dtype="float32", targets=cfg["targets"], r=cfg["r"],
                alpha=cfg["alpha"], lr=cfg["lr"], dt=cfg["dt"], grad_ckpt=False)
    runs = [Run(n, spec, path) for n in CONFIGS]
    same_adapters(runs)
    batch = make_batch(shape, cfg["device"])
    # loss check: step 0 equal for all three (BeamLoRA's s = 1 at first); step 1 ours vs HF+PEFT
    # (the gradients, clipping and AdamW agree too). The steps double as the warmup.
    losses = {r.name: [r.step(*batch) for _ in range(max(2, cfg["warmup"]))] for r in runs}
    ref = losses["HF+PEFT LoRA"]
    for n, tol in (("ours LoRA", (1e-5, 1e-4)), ("ours BeamLoRA", (1e-5, None))):
        for i, rel in enumerate(tol):
            if rel is not None:
                assert abs(losses[n][i] - ref[i]) <= rel * abs(ref[i]), \
                    f"{name}: step {i} loss {n} {losses[n][i]:.6f} vs HF+PEFT {ref[i]:.6f}"
    ours, hf, beam = runs
    t1 = timed(ours, 1, batch)
    inner = max(1, round(cfg["min_time"] / t1))
    step_s = {ours.name: [], hf.name: []}
    for rep in range(cfg["repeats"]):
        for run in ((ours, hf) if rep % 2 == 0 else (hf, ours)):
            step_s[run.name].append(timed(run, inner, batch))
    # BeamLoRA vs LoRA: whole controller intervals, so each sample holds the same snapshots and operations
    n = max(cfg["dt"], cfg["beam_steps"] // cfg["dt"] * cfg["dt"])
    for run in (ours, beam):  # align both to an interval boundary, and warm the controller up
        timed(run, n - run.t % n + n, batch)
    ops0 = beam.ops
    block_s = {ours.name: [], beam.name: []}
    for rep in range(cfg["beam_repeats"]):
        for run in ((beam, ours) if rep % 2 == 0 else (ours, beam)):
            block_s[run.name].append(timed(run, n, batch))
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(a, b))  # noqa: E731
    row = {"shape": name, **shape["model"], "seq": shape["seq"], "batch": shape["batch"], "r": cfg["r"],
           "n_train": ours.n_train, "n_frozen": ours.n_frozen, "losses": losses, "steps_per_sample": inner,
           "step_s": {k: statistics.median(v) for k, v in step_s.items()},
           "ours_over_hf": ratio(step_s[ours.name], step_s[hf.name]),
           "beam_block_steps": n, "beam_ops_per_block": (beam.ops - ops0) / cfg["beam_repeats"],
           "beam_step_s": statistics.median(block_s[beam.name]), "lora_step_s": statistics.median(block_s[ours.name]),
           "beam_over_lora": ratio(block_s[beam.name], block_s[ours.name]),
           "all_step_s": step_s, "all_block_s": block_s}
    print(f"{name}: ours {1e3 * row['step_s'][ours.name]:.1f} ms/step, HF+PEFT {1e3 * row['step_s'][hf.name]:.1f} ms, "
          f"ratio {row['ours_over_hf']:.3f}; BeamLoRA/LoRA {row['beam_over_lora']:.3f} "
          f"({row['beam_ops_per_block']:.0f} operation(s) per {n} steps)", flush=True)
    if cfg["profile"]:
        row["profile"] = {run.name: profile(run, inner, batch) for run in (ours, hf)}
        print(profile_table(row["profile"]), flush=True)
    del runs, ours, hf, beam
    if cfg["memory"]:
        row["peak_rss"] = {}
        for c in CONFIGS:
            res = run_child_spec(__file__, dict(spec, which=c, path=path, shape=shape, steps=cfg["mem_steps"],
                                                warmup=0, dt=2, threads=cfg["threads"]), c)
            row["peak_rss"][c] = res["peak_mem"]
        row["mem_ours_over_hf"] = row["peak_rss"]["ours LoRA"] / row["peak_rss"]["HF+PEFT LoRA"]
    return row


KINDS = (  # op name patterns -> the kind of work (first match wins)
    ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "_scaled_dot_product", "baddbmm")),
    ("softmax / cross-entropy", ("softmax", "log_softmax", "nll_loss", "cross_entropy", "_softmax_backward")),
    ("optimizer (AdamW, clip)", ("_foreach", "adam", "_fused", "norm", "clamp", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("elementwise (mul, add, silu, rope, rmsnorm)", ("mul", "add", "silu", "sigmoid", "neg", "cat", "pow", "rsqrt",
                                                     "mean", "div", "sub", "exp", "sum", "where", "masked")),
    ("copies and views", ("copy_", "to", "contiguous", "clone", "view", "reshape", "transpose", "permute", "expand",
                          "slice", "select", "unsqueeze", "t", "empty", "zero_", "fill_", "zeros", "ones", "stack")),
)


def kind_of(op):
    name = op.removeprefix("aten::").lower()
    for kind, pats in KINDS:
        if any(name == p or name.startswith(p + "_") or name.endswith("_" + p) or p in name.split("_") for p in pats):
            return kind
    return "other"


def profile(run, steps, batch):
    """Self CPU time per aten op over `steps` steps, by kind: {kind: ms per step}, plus the top ops."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        timed(run, steps, batch)
    by_op = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            by_op[e.key] = by_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / steps
    kinds = {}
    for op, ms in by_op.items():
        kinds[kind_of(op)] = kinds.get(kind_of(op), 0.0) + ms
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    return {"kinds_ms": kinds, "top_ms": dict(top), "aten_ms": sum(by_op.values())}


def profile_table(prof):
    names = list(prof)
    kinds = sorted({k for p in prof.values() for k in p["kinds_ms"]},
                   key=lambda k: -prof[names[0]]["kinds_ms"].get(k, 0))
    lines = [f"| self time per step, ms (share) | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for k in kinds + ["all aten ops"]:
        cells = []
        for n in names:
            total = prof[n]["aten_ms"]
            ms = total if k == "all aten ops" else prof[n]["kinds_ms"].get(k, 0.0)
            cells.append(f"{ms:.2f} ({100 * ms / total:.0f}%)")
        lines.append(f"| {k} | {' | '.join(cells)} |")
    return "\n".join(lines)


def cpu_table(rows):
    lines = ["| shape | tokens/step | ours LoRA ms/step | HF+PEFT ms/step | ours / HF+PEFT (aim small <= 0.8, "
             "big <= 0.95) | BeamLoRA / LoRA, ops averaged in (aim <= 1.05) | peak RSS ours / HF+PEFT (MiB) |",
             "|" + "---|" * 7]
    for x in rows:
        mem = "-"
        if "peak_rss" in x:
            p = x["peak_rss"]
            mem = (f"{p['ours LoRA'] / 2**20:.0f} / {p['HF+PEFT LoRA'] / 2**20:.0f} = {x['mem_ours_over_hf']:.2f} "
                   f"(BeamLoRA {p['ours BeamLoRA'] / 2**20:.0f})")
        lines.append(f"| {x['shape']}: hidden {x['hidden_size']}, {x['num_hidden_layers']} layers, vocab "
                     f"{x['vocab_size']}, r={x['r']} | {x['batch']} x {x['seq']} | "
                     f"{1e3 * x['step_s']['ours LoRA']:.1f} | "
                     f"{1e3 * x['step_s']['HF+PEFT LoRA']:.1f} | {x['ours_over_hf']:.3f} | {x['beam_over_lora']:.3f} "
                     f"({x['beam_ops_per_block']:.0f} op / {x['beam_block_steps']} steps) | {mem} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# a configuration in a process of its own: peak memory; for the GPU recipe also tokens/s and MFU

def child(spec):
    warnings.filterwarnings("ignore", category=FutureWarning)
    import peft  # noqa: F401  (everything both sides import, so the baseline is the same)
    import transformers  # noqa: F401
    import model  # noqa: F401
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["device"].startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    reset_peak_rss()  # the imports' transient peak can exceed a small model's footprint
    base = peak_rss()
    run = Run(spec["which"], spec, spec["path"])
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # training's peak (weights included), not the build's
    batch = make_batch(spec["shape"], spec["device"])
    losses = [run.step(*batch) for _ in range(spec["warmup"])]
    ops0 = run.ops
    step_s = timed(run, spec["steps"], batch)
    tok_s = batch[0].numel() / step_s
    import meter
    peak = spec.get("peak_flops") or meter.device_peak_flops(spec["device"], spec["dtype"])  # None: no MFU
    m = spec["model"]  # attention's matmuls (q k^T, then by v), forward + backward, causal mask not discounted:
    attn = 12 * m["num_hidden_layers"] * m["hidden_size"] * spec["shape"]["seq"]  # nanoGPT's / PaLM's 12 L d T
    flops = 6 * run.n_train + 4 * run.n_frozen + attn  # frozen: forward + input grads; trained: + weight grads
    print_result({
        "which": spec["which"], "peak_mem": peak_mem(spec["device"], base), "step_s": step_s, "tok_s": tok_s,
        "mfu": tok_s * flops / peak if peak else None, "peak_flops": peak, "flops_per_token": flops,
        "attn_flops_per_token": attn,
        "n_train": run.n_train, "n_frozen": run.n_frozen, "ops": run.ops - ops0, "warmup_losses": losses})


# ----------------------------------------------------------------------------------------------
# the GPU recipe

def pct(mfu):
    return f"{100 * mfu:.1f}%" if mfu is not None else "n/a (no peak known for this device)"


def gpu_recipe(cfg, out_json):
    import train
    shape = SHAPES["tiny" if cfg["tiny"] else "llama2-7b"]
    r = min(cfg["gpu_r"], shape["model"]["hidden_size"] // 4) if cfg["tiny"] else cfg["gpu_r"]
    steps = max(cfg["dt"], cfg["gpu_steps"] // cfg["dt"] * cfg["dt"])
    spec = dict(model=shape["model"], shape=shape, device=cfg["device"], dtype="bfloat16", targets=cfg["targets"],
                r=r, alpha=2.0 * r, lr=cfg["lr"], dt=cfg["dt"], grad_ckpt=True, path="", steps=steps,
                warmup=cfg["gpu_warmup"], threads=cfg["threads"], peak_flops=cfg["peak_flops"])
    configs = CONFIGS + (("ours LR-LoRA",) if "lrlora" in train.METHODS else ())
    res, out = {}, {"shape": shape, "r": r, "steps": steps, "results": {}, "errors": {}}
    for c in configs:  # one failing configuration is recorded, the others still run
        try:
            res[c] = run_child_spec(__file__, dict(spec, which=c), c)
        except RuntimeError as e:
            out["errors"][c] = str(e)[-3000:]
            print(f"{c}: failed\n{e}", flush=True)
            continue
        x = out["results"][c] = res[c]
        print(f"{c}: {x['tok_s']:,.0f} tokens/s, MFU {pct(x['mfu'])}, peak {x['peak_mem'] / 2**30:.2f} GiB, "
              f"{x['ops']} operation(s) in {steps} steps", flush=True)
        rundir.atomic_json({"partial": True, "gpu_recipe": out}, out_json)  # what is done survives a kill
    m = shape["model"]
    md = (f"{'tiny' if cfg['tiny'] else 'Llama-2-7B'} shape (hidden {m['hidden_size']}, "
          f"{m['num_hidden_layers']} layers), "
          f"random weights, r={r} on {cfg['targets']}, bf16 base + autocast, seq {shape['seq']} x micro batch "
          f"{shape['batch']}, activation checkpointing, {cfg['device']}; {steps} timed steps after "
          f"{cfg['gpu_warmup']}; "
          "MFU counts 6 N_trained + 4 N_frozen + 12 L d T per token, against the GPU's peak:\n\n"
          "| configuration | tokens/s | MFU | peak memory GiB |\n|---|---|---|---|\n"
          + "\n".join(f"| {c} | {x['tok_s']:,.0f} | {pct(x['mfu'])} | {x['peak_mem'] / 2**30:.2f} |"
                      for c, x in res.items()))
    o, h = res.get("ours LoRA"), res.get("HF+PEFT LoRA")
    if o and h:
        out["ours_over_hf_tok_s"], out["ours_over_hf_mem"] = o["tok_s"] / h["tok_s"], o["peak_mem"] / h["peak_mem"]
        md += (f"\n\nours / HF+PEFT: tokens/s {out['ours_over_hf_tok_s']:.3f} (aim >= 1.10), peak memory "
               f"{out['ours_over_hf_mem']:.3f}")
    for c in configs[2:]:  # BeamLoRA / LoRA, LR-LoRA / LoRA: step time with the method's operations averaged in
        if o and c in res:
            key = c.removeprefix("ours ") + " / LoRA"
            out[key] = res[c]["step_s"] / o["step_s"]
            md += f"; {key} step time {out[key]:.3f} ({res[c]['ops']} operations averaged in)"
    return out, md


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    if cfg["child"]:
        with open(cfg["child"]) as f:
            return child(json.load(f))
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cfg["device"] = cfg["device"] or ("cuda" if cfg["gpu_recipe"] else "cpu")
    out_json = cfg["out_json"] or os.path.join("out", "bench",
                                               "bench_train_gpu.json" if cfg["gpu_recipe"] else "bench_train.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls transformers' deprecated names
    result = {"config": cfg, "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads()}
    if cfg["gpu_recipe"]:
        result["device"] = torch.cuda.get_device_name() if cfg["device"].startswith("cuda") else "cpu"
        result["gpu_recipe"], md = gpu_recipe(cfg, out_json)
    else:
        rows = []
        for name in cfg["shapes"].split(","):
            with tempfile.TemporaryDirectory() as path:
                write_checkpoint(path, SHAPES[name]["model"])
                rows.append(bench_shape(name, cfg, path))
        result["shapes"] = rows
        md = (f"training step (forward + backward + clip + AdamW), fp32, {cfg['device']}, {torch.get_num_threads()} "
              f"threads, all seven linears, median of {cfg['repeats']} (BeamLoRA: {cfg['beam_repeats']}), "
              f"BeamLoRA dt={cfg['dt']}:\n\n" + cpu_table(rows))
        for row in rows:
            if "profile" in row:
                md += f"\n\nprofile, {row['shape']} shape (torch.profiler, self CPU time of aten ops):\n\n" + \
                      profile_table(row["profile"])
    print("\n" + md)
    result["markdown"] = md
    rundir.atomic_json(result, out_json)
    print(f"\nwrote {out_json}")
    return result


if __name__ == "__main__":
    cli(main, errors=(ConfigError,))
