"""
What the log line says about speed: tokens per second, MFU (model FLOPs utilisation against the GPU's datasheet
peak) and peak memory, for train.py and the benchmarks in bench/.

    Meter              a run's throughput, MFU, memory and ETA: each log row
    device_peak_flops  one GPU's dense peak for a dtype, by its name (GPU_PEAK_FLOPS); None on the CPU
    peak_rss_gib       this process's own peak resident memory (the CPU's "memory")
"""
import re
import sys
import time

import torch


class Meter:
    """Throughput, MFU, memory and ETA for the log line. tokens: counted since the last row."""

    def __init__(self, cfg, n_train, n_frozen, world, total, start_step):
        self.cfg, self.world, self.total, self.start_step = cfg, world, total, start_step
        self.flops_per_token = 6 * n_train + 4 * n_frozen  # frozen matmuls: forward + input grads; trained: + weights
        self.peak = cfg["peak_flops"] or device_peak_flops(cfg["device"], cfg["dtype"])  # None: no MFU (CPU, ...)
        self.losses, self.tokens = [], 0
        self.t_start = self.t_log = time.time()

    def log(self, step, pending, lr, extra):
        """Prints and returns one row: the mean loss of the steps since the last row, the method's own fields
        (BeamLoRA: p), speed and memory."""
        cfg, dtime = self.cfg, time.time() - self.t_log
        tok_s = self.tokens * self.world / dtime
        mfu = tok_s * self.flops_per_token / (self.peak * self.world) if self.peak else None  # null in log.jsonl
        mem = peak_memory_gib("cuda" if cfg["device"].startswith("cuda") else "cpu")
        eta = (time.time() - self.t_start) / (step - self.start_step) * (self.total - step)
        row = {"step": step, "loss": sum(pending) / len(pending), "lr": lr, **extra, "tok_s": tok_s, "mfu": mfu,
               "mem_gib": mem}
        extra_txt = "".join(f"{k} {v:.4g} | " if isinstance(v, float) else f"{k} {v} | " for k, v in extra.items())
        print(f"step {step}/{self.total} | loss {row['loss']:.4f} | lr {lr:.2e} | {extra_txt}{tok_s:,.0f} tok/s | "
              + (f"mfu {100 * mfu:.2f}% | " if self.peak else "") + f"mem {mem:.2f} GiB | eta {eta / 60:.1f} min")
        self.t_log, self.tokens = time.time(), 0
        return row


def peak_memory_gib(dev_type):
    return torch.cuda.max_memory_allocated() / 2**30 if dev_type == "cuda" else peak_rss_gib()


def peak_rss_gib():
    # VmHWM is this process's own peak; ru_maxrss survives exec, so a child started by a large
    # parent (bench/compare.py) would report the parent's peak
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB elsewhere


# MFU's denominator: one GPU's dense (no 2:4 sparsity) tensor-core peak in TFLOP/s, bfloat16 | float16 | float32.
# float32 runs use TF32 matmuls (allow_tf32 in train()), so their peak is TF32's where the GPU has it; fp16 is
# with fp32 accumulation, as PyTorch runs it (GeForce cards do twice that with fp16 accumulation). The first
# pattern found in torch.cuda.get_device_name() wins, so variants come before the plain name. Sources: NVIDIA's
# datasheets for H100 (SXM, PCIe, NVL), H200 (SXM, NVL), A100, L40S, L40, L4, A10, A40, V100 and T4, and the
# Ampere GA102 (RTX 3090, RTX A6000) and Ada AD102 (RTX 4090) architecture whitepapers; sparse figures halved.
GPU_PEAK_FLOPS = [
    (r"H100.*NVL", 835.5, 835.5, 417.5),
    (r"H100.*PCIe", 756.5, 756.5, 378.0),
    (r"H100", 989.5, 989.5, 494.5),  # SXM5: "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", 835.5, 835.5, 417.5),
    (r"\bH200", 989.5, 989.5, 494.5),  # SXM
    (r"A100", 312.0, 312.0, 156.0),  # SXM4 and PCIe, 40 and 80 GB
    (r"L40S", 362.0, 362.0, 183.0),
    (r"\bL40\b", 181.0, 181.0, 90.5),
    (r"\bL4\b", 121.0, 121.0, 60.0),
    (r"\bA10\b", 125.0, 125.0, 62.5),  # not AWS's A10G, a different part
    (r"\bA40\b", 149.7, 149.7, 74.8),
    (r"RTX A6000", 154.8, 154.8, 77.4),
    (r"RTX 4090(?! D)", 165.2, 165.2, 82.6),
    (r"RTX 3090(?! Ti)", 71.0, 71.0, 35.6),
    (r"V100.*SXM", None, 125.0, 15.7),  # no bf16, no TF32: fp32 on the CUDA cores
    (r"V100.*PCIE", None, 112.0, 14.0),
    (r"\bT4\b", None, 65.0, 8.1),
]


def device_peak_flops(device, dtype):
    """One device's peak FLOP/s for `dtype`; None on the CPU, on an unlisted GPU or a dtype it has no peak for."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    row = next((row for row in GPU_PEAK_FLOPS if re.search(row[0], name)), None)
    tflops = row and row[1 + ("bfloat16", "float16", "float32").index(dtype)]
    return tflops * 1e12 if tflops else None
