"""
Greedy decoding throughput: generate.py's three ways (decode=cache, static, compiled) against transformers'
generate on the same random weights (shared, not copied), batch 16, left-padded prompts of mixed lengths.

    python bench/bench_decode.py                           # CUDA, bf16, a 1B Llama shape (TinyLlama's: GQA 32/4)
    python bench/bench_decode.py --shape=7b --batch=16     # Llama-2-7B's shape (MHA)
    python bench/bench_decode.py --tiny --device=cpu --backend=aot_eager    # the same code paths, in seconds

Every side generates exactly new_tokens tokens per row (no stop ids), so all do the same work. Times are
medians over interleaved repeats after one warm-up call per side (for "compiled" that call holds the compile
and the CUDA-graph recording: reported apart as compile_s).

Tokens: in bf16 the logits themselves are bf16 (8 bits of mantissa: 1.0 apart at 128-256), and with random
weights over a 32k vocabulary the two best logits are exactly tied, or one ulp apart, every few dozen
row-steps, so any change in the order of a sum (another attention kernel, a fused norm) flips some argmax
and the rows go separate ways from there. The bf16 rows' agreement is reported, and then the tokens again in
fp32 (check_tokens per row, each side once), where identical tokens are the test of the arithmetic.
"""
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rundir  # noqa: E402
from configurator import ConfigError, parse_args  # noqa: E402
from generate import decode_step, generate  # noqa: E402

DEFAULTS = dict(
    shape="1b",  # SHAPES below
    tiny=False,  # shape tiny
    device="",  # default: cuda if available, else cpu
    dtype="bfloat16",
    batch=16,
    new_tokens=256,
    prompt_min=32,  # prompt lengths, uniform in [prompt_min, prompt_max]
    prompt_max=192,
    repeats=3,
    modes="cache,static,compiled",  # ours; transformers' generate always runs
    backend="inductor",  # torch.compile backend for "compiled" (aot_eager: the trace alone, for a quick CPU check)
    check_dtype="float32",  # then the tokens again in this dtype, each side once (0 check_tokens: no check)
    check_tokens=32,
    check_modes="cache,static",  # "compiled" here costs a second compile
    out_json="out/bench/bench_decode.json",
)
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def build(shape, device, dtype):
    """transformers' LlamaForCausalLM with peaked random weights, and ours holding the very same tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from model import ModelArgs, Transformer, rope_inv_freq
    conf = LlamaConfig(**shape, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(conf, dtype=dtype).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if p.shape[0] == shape["vocab_size"] else p.shape[1] ** -0.5)
    config = conf.to_dict()
    args = ModelArgs.from_config(config)
    with torch.device("meta"):
        ours = Transformer(args, config)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)  # the same names: no mapping, no copy
    ours.inv_freq = rope_inv_freq(args).to(device)
    return hf.eval(), ours.eval()


def make_prompts(cfg, vocab):
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(cfg["prompt_min"], cfg["prompt_max"] + 1, (cfg["batch"],), generator=g).tolist()
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def hf_generate(hf, prompts, n, device):
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, L:].tolist()


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def agreement(a, b):
    """Fraction of rows whose tokens are identical, and the first position where any row differs (None: none)."""
    rows = sum(x == y for x, y in zip(a, b)) / len(b)
    first = min((next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
                 for x, y in zip(a, b) if x != y), default=None)
    return rows, first


def run_sides(hf, ours, prompts, n, modes, repeats, device):
    """-> {side: (first call s, [timed s], tokens, same tokens every call)}, repeats interleaved."""
    sides = {"transformers": lambda: hf_generate(hf, prompts, n, device)}
    for m in modes:
        sides[f"ours {m}"] = lambda m=m: generate(ours, prompts, n, stop_ids=[], decode=m)
    res = {}
    for side, fn in sides.items():  # warm-up: allocations, cuBLAS handles, the compile and graph recording
        t, out = timed(fn, device)
        res[side] = (t, [], out, True)
        print(f"{side}: first call {t:.2f} s", flush=True)
    order = list(sides)
    for rep in range(repeats):
        for side in order[rep % len(order):] + order[:rep % len(order)]:  # rotate who goes first
            t, out = timed(sides[side], device)
            first, ts, tokens, same = res[side]
            res[side] = (first, ts + [t], tokens, same and out == tokens)
    return res


def markdown(result, cfg, name):
    md = [f"greedy decoding, {name} shape ({result['params'] / 1e9:.2f}B params), {cfg['dtype']}, {result['device']}, "
          f"batch {cfg['batch']}, prompts {cfg['prompt_min']}-{cfg['prompt_max']} tokens, {cfg['new_tokens']} new "
          f"tokens, median of {cfg['repeats']}:", "",
          "| side | wall s | tokens/s | / transformers (aim <= 0.5) | rows identical to transformers | first call s |",
          "|---|---|---|---|---|---|"]
    for side, x in result["sides"].items():
        md.append(f"| {side} | {x['s']:.3f} | {x['tokens_per_s']:,.0f} | {x['over_transformers']:.3f} | "
                  f"{x['rows_identical_to_transformers']:.2f} | {x['first_call_s']:.1f} |")
    if result["check"]:
        md += ["", f"tokens in {cfg['check_dtype']} ({cfg['check_tokens']} new tokens; exact ties are rare there): "
               + ", ".join(f"{side} {x['rows_identical_to_transformers']:.2f}" for side, x in result["check"].items()
                           if side != "transformers") + " of the rows identical to transformers'"]
    return "\n".join(md)


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    name = "tiny" if cfg["tiny"] else cfg["shape"]
    if name not in SHAPES:
        raise ConfigError(f"--shape={cfg['shape']}: expected one of {', '.join(SHAPES)}")
    modes, check_modes = ([m for m in cfg[k].split(",") if m] for k in ("modes", "check_modes"))
    if any(m not in ("cache", "static", "compiled") for m in modes + check_modes):
        raise ConfigError(f"--modes={cfg['modes']} --check_modes={cfg['check_modes']}: "
                          "expected cache, static, compiled")
    device = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    import transformers
    transformers.logging.set_verbosity_error()
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out_json"])), exist_ok=True)
    shape = SHAPES[name]
    prompts = make_prompts(cfg, shape["vocab_size"])
    result = {"config": cfg, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "shape": shape,
              "prompt_lengths": [len(p) for p in prompts], "sides": {}, "check": {}}
    for part, dtype, n, ms, repeats in (("timed", cfg["dtype"], cfg["new_tokens"], modes, cfg["repeats"]),
                                        ("check", cfg["check_dtype"], cfg["check_tokens"], check_modes, 0)):
        if part == "check" and not cfg["check_tokens"]:
            continue
        hf, ours = build(shape, device, getattr(torch, dtype))
        if cfg["backend"] != "inductor":  # generate.py compiles with inductor (CUDA graphs on CUDA); another one here
            ours.compiled_step = torch.compile(decode_step, backend=cfg["backend"], fullgraph=True, dynamic=False)
        result["params"] = sum(p.numel() for p in ours.parameters())
        res = run_sides(hf, ours, prompts, n, ms, repeats, device)
        del hf, ours
        ref = res["transformers"][2]
        for side, (first, ts, tokens, same) in res.items():
            rows, diff = agreement(tokens, ref)
            row = {"rows_identical_to_transformers": rows, "first_difference": diff, "first_call_s": first}
            if "ours cache" in res and side in ("ours static", "ours compiled"):
                row["rows_identical_to_ours_cache"] = agreement(tokens, res["ours cache"][2])[0]
            if ts:
                s = statistics.median(ts)
                row.update(s=s, all_s=ts, tokens_per_s=cfg["batch"] * n / s, same_tokens_every_call=same,
                           over_transformers=statistics.median(a / b for a, b in zip(ts, res["transformers"][1])))
                if side == "ours compiled":
                    row["compile_s"] = first - s  # the first call less a timed one
            result["sides" if part == "timed" else "check"][side] = row
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        result["markdown"] = markdown(result, cfg, name)
        rundir.atomic_json(result, cfg["out_json"])  # the timings survive a kill during the check
    print("\n" + result["markdown"])
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
