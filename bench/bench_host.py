"""
The training loop's host work per step against the dataset's size: the same tiny model, batch and
examples (all of one length, so every batch is the same work) on a small and a MetaMathQA-sized
data file, end to end through train.py. A step's time is read from log.jsonl (tokens / tok_s), the
first rows (warm-up) dropped; the difference between the two sizes is what the host work per step
costs for the larger dataset (choosing the batch, counting its target tokens, collating).

    python bench/bench_host.py                       # 2,000 vs 400,000 examples
    python bench/bench_host.py --large=100000 --steps=40

Writes out/bench/bench_host.json. Tokenising the large file takes a minute the first time (cached
next to it, as train.py caches any data file).
"""
import importlib.util
import json
import os
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import beamlora  # noqa: E402
import train  # noqa: E402
from configurator import ConfigError, parse_args  # noqa: E402
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
        row = json.dumps({"query": "Tom has 3 apples and buys 4 more. How many now?", "response": "3+4=7. The answer is: 7"})
        with open(path + ".tmp", "w") as f:
            f.write((row + "\n") * n)
        os.replace(path + ".tmp", path)
    return path


def step_ms(work, tok, data, cfg, tag):
    out = os.path.join(work, f"run_{tag}")
    model_cfg = os.path.join(work, "model.json")
    with open(model_cfg, "w") as f:
        json.dump(dict(model_type="llama", vocab_size=Tokenizer(tok).n_words, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256), f)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    train.train(dict(train.DEFAULTS, out_dir=out, model_config=model_cfg, tokenizer=tok, data=data, method="lora",
                     r=4, alpha=8.0, dropout=0.0, max_len=256, max_steps=cfg["steps"], batch_size=cfg["batch_size"],
                     micro_batch_size=cfg["batch_size"], log_interval=cfg["log_interval"], dtype="float32",
                     device="cpu", seed=1))
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f][cfg["skip"]:]
    n_tok = train.tokenize_file(data, Tokenizer(tok), dict(train.DEFAULTS, max_len=256, out_dir=out))[0]
    tokens_per_step = cfg["batch_size"] * len(n_tok[0])
    return statistics.median(1e3 * tokens_per_step / r["tok_s"] for r in rows)


def main(argv):
    cfg = parse_args(argv, DEFAULTS)
    work = cfg["work_dir"]
    os.makedirs(work, exist_ok=True)
    tok = tokenizer(work)
    files = {n: data_file(work, n) for n in (cfg["small"], cfg["large"])}
    ms = {n: [] for n in files}
    for rep in range(cfg["repeats"]):
        for n in (files if rep % 2 == 0 else reversed(list(files))):
            ms[n].append(step_ms(work, tok, files[n], cfg, n))
    small, large = (statistics.median(ms[n]) for n in (cfg["small"], cfg["large"]))
    result = {"config": cfg, "step_ms": ms, "small_ms": small, "large_ms": large, "added_ms": large - small}
    print(f"step time: {cfg['small']:,} examples {small:.2f} ms, {cfg['large']:,} examples {large:.2f} ms: "
          f"the larger dataset adds {large - small:+.2f} ms per step (aim: at most 5)")
    os.makedirs(os.path.dirname(os.path.abspath(cfg["out_json"])), exist_ok=True)
    beamlora.atomic_json(result, cfg["out_json"])
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
