"""
What checkpoints by default cost a run: train.py's loop timed side by side, in interleaved rounds in one process,
with no periodic checkpoint ("none"), the default ("default": save_interval_min = 30), the time-based rule at its
floor ("floor": save_interval_min ~ 0, so a checkpoint as soon as 1 / cluster.SAVE_COST = 100 times the last one's
write time has passed: the most that rule ever saves) and a checkpoint after every step ("every step": the floor
off, what an interval without it would cost on a fast model). Per arm: the median seconds per step, its ratio to
"none" (the median of the rounds' ratios: on a shared machine these move by several percent from round to round),
and the time spent inside checkpoint writes as a share of the loop: timed around the writes themselves, which is
what a checkpoint adds to the step time (it computes nothing and slows nothing else), free of that noise.

A short bench never reaches 30 minutes, so the default's cost over a long run is printed as what it is: one
checkpoint's write time per 30 minutes, for this model's checkpoint and, at the write speed measured here, for a
Llama-2-7B r = 64 LoRA's on all seven linears (160M trained parameters with their AdamW moments, ~1.9 GB). The
floor bounds it at 1% whatever the disk: that is the "floor" arm, measured.

    python bench/bench_checkpoint.py                      # ~4 minutes on 2 shared CPU cores
    python bench/bench_checkpoint.py --rounds=5 --steps=40 --out_json=bench/results/checkpoint_cost.json

The loop is train.train itself (in this process, one thread), on a random Llama of the shape below with LoRA on
all seven linears; out_dir on the disk of --work (the temp dir by default), where a run would write.
"""
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)

DEFAULTS = dict(
    hidden=128,  # the random model: hidden size
    layers=4,  # its layers
    r=32,  # LoRA rank on all seven linears
    steps=30,  # optimizer steps per arm per round
    rounds=3,  # interleaved rounds (medians over them)
    threads=1,  # torch threads
    work="",  # where the runs' out_dirs go ("": a temporary directory)
    out_json="",  # also write the result here
)
ARMS = {"none": dict(save_interval_min=0.0), "default": dict(save_interval_min=30.0),
        "floor": dict(save_interval_min=1e-9), "every step": dict(save_interval_min=1e-9, save_cost=math.inf)}
LLAMA7B_R64_BYTES = 3 * 4 * 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # params + 2 moments, fp32


def build(work, cfg):
    import importlib.util

    import torch

    from model import Transformer
    from tokenizer import Tokenizer
    spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        data = prep.prepare(os.path.join(work, "data"), seed=1, n_train=256, n_test=8, n_pretrain=400,
                            vocab_size=420)
    n_vocab = Tokenizer(os.path.join(data, "tokenizer.model")).n_words
    model_cfg = dict(model_type="llama", vocab_size=n_vocab, hidden_size=cfg["hidden"],
                     intermediate_size=int(cfg["hidden"] * 8 / 3) // 16 * 16, num_hidden_layers=cfg["layers"],
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1,
                     eos_token_id=2)
    torch.manual_seed(0)
    m = Transformer.from_config(model_cfg)
    base = os.path.join(work, "base")
    m.save_pretrained(base)
    shutil.copy(os.path.join(data, "tokenizer.model"), base)
    return base, data


def timed_run(train, rundir, cfg):
    """train.train(cfg) with its loop and its checkpoint writes timed -> (seconds per step, seconds in the in-loop
    checkpoints, their count, the checkpoint's bytes)."""
    import cluster
    t, saves = {}, []
    real_agreed, real_arm, real_save, real_sync = (cluster.Preemption.agreed, cluster.Preemption.arm, train.atomic_save,
                                                   rundir.sync_records)

    def arm(self):
        t["start"] = time.perf_counter()
        return real_arm(self)

    def agreed(self, *args):
        t["end"] = time.perf_counter()  # once per step, before that step's checkpoint
        return real_agreed(self, *args)

    def sync_records(out_dir):
        t["save"] = time.perf_counter()
        return real_sync(out_dir)

    def atomic_save(obj, path, tmp=None):
        real_save(obj, path, tmp)
        if obj["step"] < cfg["max_steps"]:  # not the final one, which every arm writes
            saves.append(time.perf_counter() - t["save"])

    cluster.Preemption.arm, cluster.Preemption.agreed, train.atomic_save, rundir.sync_records = (
        arm, agreed, atomic_save, sync_records)
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            train.train(cfg)
    finally:
        cluster.Preemption.arm, cluster.Preemption.agreed, train.atomic_save, rundir.sync_records = (
            real_arm, real_agreed, real_save, real_sync)
    loop = t["end"] - t["start"]
    return loop / (cfg["max_steps"] - 1), sum(saves), len(saves), os.path.getsize(
        os.path.join(cfg["out_dir"], "ckpt.pt"))


def main(argv):
    from configurator import ConfigError, parse_args
    cfg = parse_args(argv, DEFAULTS, __file__)
    if cfg["steps"] < 4 or cfg["rounds"] < 1 or cfg["hidden"] % 4 or cfg["layers"] < 1 or cfg["r"] < 1:
        raise ConfigError("--steps >= 4, --rounds >= 1, --hidden a multiple of 4, --layers and --r >= 1")
    import torch

    import cluster
    import rundir
    import train
    torch.set_num_threads(cfg["threads"])
    work = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=cfg["work"] or None)
    try:
        base, data = build(work, cfg)
        res = {arm: [] for arm in ARMS}
        for rnd in range(cfg["rounds"]):
            for arm, opts in ARMS.items():
                run = dict(train.DEFAULTS, init_from=base, data=os.path.join(data, "train.jsonl"),
                           out_dir=os.path.join(work, "run"), overwrite=True, method="lora", r=cfg["r"],
                           alpha=2.0 * cfg["r"], batch_size=8, micro_batch_size=4, max_steps=cfg["steps"],
                           max_len=256, lr=1e-3, dtype="float32", device="cpu", log_interval=10,
                           save_interval_min=opts["save_interval_min"])
                cost, cluster.SAVE_COST = cluster.SAVE_COST, opts.get("save_cost", cluster.SAVE_COST)
                try:
                    res[arm].append(timed_run(train, rundir, run))
                finally:
                    cluster.SAVE_COST = cost
                step_s, in_saves, n, size = res[arm][-1]
                print(f"round {rnd + 1}, {arm:<10}: {1e3 * step_s:7.2f} ms/step, {n:3d} checkpoints in the loop, "
                      f"{in_saves:.3f} s in them", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for arm, rs in res.items():
        step_s = statistics.median(r[0] for r in rs)
        ratio = statistics.median(r[0] / none[0] for r, none in zip(rs, res["none"]))
        share = statistics.median(r[1] / (r[0] * (cfg["steps"] - 1)) for r in rs)
        n = sum(r[2] for r in rs)
        rows[arm] = {"ms_per_step": 1e3 * step_s, "ratio_to_none": ratio, "checkpoints": n,
                     "share_in_checkpoints": share,
                     "s_per_checkpoint": sum(r[1] for r in rs) / n if n else None}
    size = res["none"][0][3]
    per_ckpt = rows["every step"]["s_per_checkpoint"]
    speed = size / per_ckpt
    default = {"checkpoint_bytes": size, "s_per_checkpoint": per_ckpt, "write_MB_per_s": speed / 1e6,
               "ratio_at_30_min": 1 + per_ckpt / 1800,
               "llama7b_r64_bytes": LLAMA7B_R64_BYTES,
               "llama7b_r64_ratio_at_30_min": 1 + LLAMA7B_R64_BYTES / speed / 1800}
    print(f"\n{'arm':<12}{'ms/step':>9}{'x none':>9}{'ckpts':>7}{'in ckpts':>10}")
    for arm, r in rows.items():
        print(f"{arm:<12}{r['ms_per_step']:9.2f}{r['ratio_to_none']:9.4f}{r['checkpoints']:7d}"
              f"{100 * r['share_in_checkpoints']:9.2f}%")
    print(f"\ndefault, over a long run: one {size / 1e6:.1f} MB checkpoint ({per_ckpt:.3f} s, {speed / 1e6:.0f} MB/s "
          f"with fsync) per 30 minutes = step time x {default['ratio_at_30_min']:.6f}; a Llama-2-7B r=64 LoRA's "
          f"{LLAMA7B_R64_BYTES / 1e9:.2f} GB at that speed: x {default['llama7b_r64_ratio_at_30_min']:.5f}; at the "
          f"floor (any disk, any model) at most x {1 + cluster.SAVE_COST:.2f}: measured here "
          f"x {rows['floor']['ratio_to_none']:.4f} ({100 * rows['floor']['share_in_checkpoints']:.2f}% of the loop "
          "in checkpoints)")
    out = {"config": cfg, "arms": rows, "default": default, "torch": torch.__version__}
    if cfg["out_json"]:
        rundir.atomic_json(out, cfg["out_json"])
    return out


if __name__ == "__main__":
    from configurator import cli
    cli(main)
