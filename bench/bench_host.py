"""
The training loop's host work per step against the dataset's size: the same tiny model, batch and
examples (all of one length, so every batch is the same work) on a small and a MetaMathQA-sized
data file, end to end through train.py. A step's time is read from log.jsonl (tokens / tok_s), the
first rows (warm-up) dropped; the difference between the two sizes is what the host work per step
costs for the larger dataset (choosing the batch, counting its target tokens, collating).

    python bench/bench_host.py                       # 2,000 vs 400,000 examples
    python bench/bench_host.py --large=100000 --steps=40

The end-to-end difference is a small number read off two large ones, so on a busy machine it is noise; the
host work is therefore also timed directly, in this process, with the loop's own functions: the epoch's batch
plan (dataset.epoch_batches, once per epoch, its cost shared by the epoch's steps) and, per step, picking the
batch, counting its target tokens and collating it (the median of many steps), for both sizes.

Writes out/bench/bench_host.json. Tokenising the large file takes a minute the first time (cached
next to it, as train.py caches any data file).
"""
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rundir  # noqa: E402
import dataset  # noqa: E402
import train  # noqa: E402
from configurator import cli, parse_args  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DEFAULTS = dict(
    small=2000,  # examples in the small data file
    large=400000,  # and in the large one (MetaMathQA has 395k)
    steps=60,  # training steps per run
    log_interval=5,
    skip=2,  # log rows dropped as warm-up
    batch_size=8,
    repeats=2,  # runs per size, interleaved
    work_dir="out/bench/host",
    out_json="out/bench/bench_host.json",
)


def tokenizer(work):
    spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    return os.path.join(prep.prepare(os.path.join(work, "tok"), seed=1, n_train=64, n_test=8, n_pretrain=400,
                                     vocab_size=420), "tokenizer.model")


def data_file(work, n):
    path = os.path.join(work, f"data_{n}.jsonl")
    if not os.path.isfile(path):
        row = json.dumps({"query": "Tom has 3 apples and buys 4 more. How many now?",
                          "response": "3+4=7. The answer is: 7"})
        with open(path + ".tmp", "w") as f:
            f.write((row + "\n") * n)
        os.replace(path + ".tmp", path)
    return path


GC = {"ms": 0.0, "full": 0}  # the cyclic garbage collector's time and full (generation 2) collections


def gc_timer(phase, info, t0=[0.0]):
    if phase == "start":
        t0[0] = time.perf_counter()
    else:
        GC["ms"] += 1e3 * (time.perf_counter() - t0[0])
        GC["full"] += info["generation"] == 2


def step_ms(work, tok, data, cfg, tag):
    out = os.path.join(work, f"run_{tag}")
    model_cfg = os.path.join(work, "model.json")
    with open(model_cfg, "w") as f:
        json.dump(dict(model_type="llama", vocab_size=Tokenizer(tok).n_words, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256), f)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    GC.update(ms=0.0, full=0)
    gc.callbacks.append(gc_timer)
    try:
        train.train(dict(train.DEFAULTS, out_dir=out, model_config=model_cfg, tokenizer=tok, data=data,
                         method="lora", r=4, alpha=8.0, dropout=0.0, max_len=256, max_steps=cfg["steps"],
                         batch_size=cfg["batch_size"], micro_batch_size=cfg["batch_size"],
                         log_interval=cfg["log_interval"], dtype="float32", device="cpu", seed=1))
    finally:
        gc.callbacks.remove(gc_timer)
        gc.unfreeze()  # train.py froze what was alive: the next run starts as a fresh process would
    print(f"{tag}: the cyclic GC ran {GC['ms']:.0f} ms in all, {GC['full']} full collection(s)")
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f][cfg["skip"]:]
    n_tok = dataset.tokenize_file(data, Tokenizer(tok), dict(train.DEFAULTS, max_len=256, out_dir=out))[0]
    tokens_per_step = cfg["batch_size"] * len(n_tok[0])
    return statistics.median(1e3 * tokens_per_step / r["tok_s"] for r in rows), dict(GC)


def host_ms(examples, cfg):
    """The loop's host work per step, timed directly: (plan ms per step, pick + count + collate ms per step)."""
    lengths = [len(e[0]) for e in examples]
    n_targets = [len(e[1]) - e[1].count(-100) - (e[1][0] != -100) for e in examples]  # as train.py counts them
    t0 = time.perf_counter()
    plan = dataset.epoch_batches(lengths, 1, 1, cfg["batch_size"])
    plan_ms = 1e3 * (time.perf_counter() - t0) / len(plan)  # computed once per epoch: its share of a step
    times = []
    for i in range(min(len(plan), 2000)):
        t0 = time.perf_counter()
        batch = plan[i]
        sum(n_targets[j] for j in batch)
        dataset.collate(examples, batch, "cpu")
        times.append(1e3 * (time.perf_counter() - t0))
    return plan_ms, statistics.median(times)


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    work = cfg["work_dir"]
    os.makedirs(work, exist_ok=True)
    tok = tokenizer(work)
    files = {n: data_file(work, n) for n in (cfg["small"], cfg["large"])}
    ms, gcs = {n: [] for n in files}, {n: [] for n in files}
    for rep in range(cfg["repeats"]):
        for n in (files if rep % 2 == 0 else reversed(list(files))):
            t, g = step_ms(work, tok, files[n], cfg, n)
            ms[n].append(t)
            gcs[n].append(g)
    small, large = (statistics.median(ms[n]) for n in (cfg["small"], cfg["large"]))
    direct = {}
    for n, path in files.items():
        examples = dataset.tokenize_file(path, Tokenizer(tok), dict(train.DEFAULTS, max_len=256, out_dir=work))
        plan, step = host_ms(examples, cfg)
        direct[n] = {"plan_ms_per_step": plan, "step_host_ms": step, "total_ms": plan + step}
        print(f"host work, timed directly, {n:,} examples: {plan + step:.3f} ms per step "
              f"(the epoch's plan {plan:.3f} ms of it, batch + target count + collate {step:.3f} ms)")
    added = direct[cfg["large"]]["total_ms"] - direct[cfg["small"]]["total_ms"]
    result = {"config": cfg, "step_ms": ms, "small_ms": small, "large_ms": large, "added_ms": large - small,
              "direct": direct, "direct_added_ms": added, "gc": gcs}
    print(f"host work timed directly: the larger dataset adds {added:+.3f} ms per step (aim: at most 5)")
    print(f"step time: {cfg['small']:,} examples {small:.2f} ms, {cfg['large']:,} examples {large:.2f} ms: "
          f"the larger dataset adds {large - small:+.2f} ms per step (aim: at most 5)")
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out_json"])), exist_ok=True)
    rundir.atomic_json(result, cfg["out_json"])
    return result


if __name__ == "__main__":
    cli(main)
