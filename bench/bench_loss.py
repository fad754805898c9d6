"""
The loss's peak memory and time: train.py's old way (lm_head over every position, the logits cast to
fp32, F.cross_entropy) against model.lm_loss (chunks of tokens, gradients computed in the forward),
forward + backward from the final hidden states, each side in a process of its own.

    python bench/bench_loss.py                                         # CPU: vocab 128k, 2048 tokens, dim 512
    python bench/bench_loss.py --device=cuda --dim=4096 --batch=4      # the GPU case: Llama-3's head, 8192 tokens

Peak memory is what the loss adds above its inputs (hidden states, head weight, targets): on CPU the
peak RSS (VmHWM, reset after the inputs are built), on CUDA torch.cuda.max_memory_allocated. The head
is frozen (a LoRA run) unless --train_head. Both sides get the same inputs and must agree on the loss
and the hidden states' gradient before anything is timed.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rundir  # noqa: E402
from configurator import ConfigError, cli, parse_args  # noqa: E402
from measure import print_result, run_child  # noqa: E402

DEFAULTS = dict(
    vocab=128256,  # Llama-3's vocabulary
    seq=2048,
    batch=1,  # micro-batch; tokens = batch x seq
    dim=512,  # hidden size (4096 for Llama-3-8B: slow on a CPU, the memory ratio hardly depends on it)
    dtype="bfloat16",  # the hidden states' and head's dtype (train.py: bf16 base under autocast)
    device="cpu",
    train_head=False,  # method full: the head's gradient too
    repeats=3,
    out_json="out/bench/bench_loss.json",
    side="",  # internal: run one side in this process
)


def inputs(cfg):
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, cfg["dtype"])
    n = cfg["batch"] * cfg["seq"]
    h = (torch.randn(n, cfg["dim"], generator=g)).to(cfg["device"], dt).requires_grad_()
    w = (torch.randn(cfg["vocab"], cfg["dim"], generator=g) * cfg["dim"] ** -0.5).to(cfg["device"], dt)
    w.requires_grad_(cfg["train_head"])
    y = torch.randint(0, cfg["vocab"], (n,), generator=g).to(cfg["device"])
    y[: n // 4] = -100  # a prompt: no loss there
    return h, w, y


def loss_fn(side):
    if side == "full logits":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100, reduction="sum")
    from model import lm_loss
    return lm_loss


def peak(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import meter
    return meter.peak_rss_gib() * 2**30


def reset_peak(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to the current RSS
        f.write("5")
    return peak(device)


def run_side(cfg):
    h, w, y = inputs(cfg)
    fn, dev = loss_fn(cfg["side"]), cfg["device"]
    ac = torch.autocast(dev.split(":")[0], dtype=getattr(torch, cfg["dtype"]), enabled=cfg["dtype"] != "float32")
    base = reset_peak(dev)
    times = []
    for i in range(cfg["repeats"] + 1):  # the first is a warm-up
        h.grad = w.grad = None
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        with ac:
            loss = fn(h, w, y)
        loss.backward()
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if i == 0:
            mem = peak(dev) - base
    print_result({"side": cfg["side"], "peak_bytes": mem, "s": statistics.median(times[1:]), "loss": loss.item(),
                  "grad_h": h.grad.float().norm().item()})


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    if cfg["side"]:
        return run_side(cfg)
    res = {}
    for side in ("full logits", "lm_loss"):
        args = [f"--{k}={v}" for k, v in cfg.items() if k != "side"] + [f"--side={side}"]
        res[side] = run_child(__file__, args, side)
    a, b = res["full logits"], res["lm_loss"]
    assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(a["loss"]), (a["loss"], b["loss"])
    assert abs(a["grad_h"] - b["grad_h"]) <= 1e-2 * abs(a["grad_h"]), (a["grad_h"], b["grad_h"])
    out = {"config": cfg, "torch": torch.__version__, "results": res, "memory_ratio": b["peak_bytes"] / a["peak_bytes"],
           "time_ratio": b["s"] / a["s"]}
    out["markdown"] = (f"vocab {cfg['vocab']}, {cfg['batch']} x {cfg['seq']} tokens, dim {cfg['dim']}, {cfg['dtype']}, "
                       f"{cfg['device']}: peak memory of the loss {a['peak_bytes'] / 2**30:.2f} GiB -> "
                       f"{b['peak_bytes'] / 2**30:.2f} GiB ({out['memory_ratio']:.3f}x), time {a['s']:.3f} s -> "
                       f"{b['s']:.3f} s ({out['time_ratio']:.3f}x)")
    print(out["markdown"])
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out_json"])), exist_ok=True)
    rundir.atomic_json(out, cfg["out_json"])
    return out


if __name__ == "__main__":
    cli(main, errors=(ConfigError,))
