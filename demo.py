"""
The offline first run: `python train.py` with no arguments lands here. No download, CPU is enough.

    1. data/demo/prepare.py writes synthetic GSM8K-style word problems, a plainer pretraining corpus
       and a sentencepiece tokenizer trained on them (data/demo/build/, reused when up to date)
    2. a tiny LLaMA is pretrained from scratch on the corpus by train.py itself (method full) and
       saved as an HF checkpoint (out/demo/base/model/: config.json, model.safetensors,
       tokenizer.model); built once, reused by later runs
    3. BeamLoRA fine-tunes it on the word problems (train.py, method beamlora), with prune/expand
       operations during the run (out/demo/beamlora/events.jsonl)
    4. eval.py's GSM8K scorer on the held-out problems, base vs fine-tuned

    python demo.py --method=lora --finetune_steps=300      # the same with other settings
"""
import importlib.util
import json
import os
import shutil
import sys
import time

from configurator import parse_args

HERE = os.path.dirname(os.path.abspath(__file__))
# -----------------------------------------------------------------------------
# the data (data/demo/prepare.py), built once for each setting
out_dir = "out/demo"  # the base (base/) and each method's run (<method>/) go here
data_dir = os.path.join(HERE, "data", "demo", "build")  # the generated problems, corpus and tokenizer
seed = 1337  # data, pretraining and fine-tuning
n_train = 4000  # word problems to fine-tune on
n_test = 200  # held-out problems for the accuracy table
n_pretrain = 30000  # lines of pretraining text
vocab_size = 768  # sentencepiece pieces (BPE may stop short of it)
# the base: a LLaMA of ~1M parameters, pretrained for pretrain_steps x 32 blocks of 128 tokens.
# Small and well trained beats larger and undertrained here: at dim 256 and 600 steps (same time) the
# fine-tuned accuracy was 2-4%, at dim 128 and 1500 steps about 50%.
dim = 128  # hidden size
n_layers = 4  # transformer blocks
n_heads = 4  # attention heads (no GQA)
pretrain_steps = 1500  # steps of 32 blocks of 128 tokens
pretrain_lr = 3e-3  # peak learning rate of the pretraining (cosine to a tenth)
# the fine-tune
method = "beamlora"  # beamlora | lora | full (train.py's --method)
r = 8  # LoRA rank (alpha = 2r)
finetune_steps = 500  # steps of batch_size problems
finetune_lr = 5e-3  # peak learning rate of the fine-tune
batch_size = 16  # problems per step
eval_limit = 0  # 0: all n_test problems
max_new_tokens = 96  # a solution here is about 60 tokens
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
del DEFAULTS["HERE"]
# -----------------------------------------------------------------------------


def load_prepare():
    spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(HERE, "data", "demo", "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def base_config(n_vocab, cfg):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": n_vocab,
            "hidden_size": cfg["dim"], "intermediate_size": cfg["dim"] * 8 // 3 // 16 * 16,
            "num_hidden_layers": cfg["n_layers"], "num_attention_heads": cfg["n_heads"],
            "num_key_value_heads": cfg["n_heads"], "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2}


def build_base(data, cfg, train):
    """Pretrain the tiny base once; later runs find out_dir/base/model and its matching settings.
    train: train.py's `run` (settings -> summary), handed over by the caller: this file imports nothing of train.py."""
    base_dir = os.path.join(cfg["out_dir"], "base")
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    want = {"data": meta, "config": base_config(meta["n_vocab"], cfg), "steps": cfg["pretrain_steps"],
            "lr": cfg["pretrain_lr"], "seed": cfg["seed"]}
    stamp = os.path.join(base_dir, "built.json")
    if os.path.isfile(stamp) and os.path.isfile(os.path.join(base_dir, "model", "model.safetensors")):
        with open(stamp) as f:
            if json.load(f) == want:
                print(f"base model: reusing {base_dir}/model")
                return os.path.join(base_dir, "model")
    shutil.rmtree(base_dir, ignore_errors=True)  # a stale base from other settings: rebuild from scratch
    os.makedirs(base_dir)
    with open(os.path.join(base_dir, "config.json"), "w") as f:
        json.dump(want["config"], f, indent=2)
    print(f"base model: pretraining a {cfg['n_layers']}-layer, {cfg['dim']}-wide LLaMA from scratch "
          f"({cfg['pretrain_steps']} steps, built once)")
    train(out_dir=base_dir, model_config=os.path.join(base_dir, "config.json"),
          tokenizer=os.path.join(data, "tokenizer.model"), data=os.path.join(data, "pretrain.txt"),
          method="full", max_len=128, batch_size=32, micro_batch_size=32, max_steps=cfg["pretrain_steps"],
          lr=cfg["pretrain_lr"], min_lr=cfg["pretrain_lr"] / 10, warmup_ratio=0.05, weight_decay=0.1,
          beta2=0.99, dropout=0.0, dtype="float32", device="cpu", seed=cfg["seed"],
          log_interval=max(1, cfg["pretrain_steps"] // 10))
    os.remove(os.path.join(base_dir, "ckpt.pt"))  # the optimizer state of a finished pretraining: not needed
    with open(stamp + ".tmp", "w") as f:
        json.dump(want, f)
    os.replace(stamp + ".tmp", stamp)
    return os.path.join(base_dir, "model")


def finetune(base, data, cfg, train):
    out = os.path.join(cfg["out_dir"], cfg["method"])
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: events.jsonl and logs start empty
    steps = cfg["finetune_steps"]
    print(f"fine-tuning: {cfg['method']}, r={cfg['r']}, {steps} steps of {cfg['batch_size']} problems")
    return train(
        out_dir=out, init_from=base, data=os.path.join(data, "train.jsonl"),
        data_format="metamathqa", max_len=256, method=cfg["method"], r=cfg["r"], alpha=2.0 * cfg["r"], dropout=0.0,
        dt=max(2, steps // 8 // 2 * 2), p_init=0.9, max_steps=steps, batch_size=cfg["batch_size"],
        micro_batch_size=cfg["batch_size"], lr=cfg["finetune_lr"], warmup_ratio=0.05, dtype="float32", device="cpu",
        seed=cfg["seed"], log_interval=max(1, steps // 8)), out


def accuracy(model_dir, adapter, data, out, cfg):
    import eval as eval_lib
    argv = [f"--model={model_dir}", "--task=gsm8k", f"--data={os.path.join(data, 'test.jsonl')}", f"--out={out}",
            f"--limit={cfg['eval_limit']}", "--batch_size=50", f"--max_new_tokens={cfg['max_new_tokens']}",
            "--device=cpu"]
    return eval_lib.main(argv + ([f"--adapter={adapter}"] if adapter else []))


def run(cfg, train):
    t0 = time.time()
    data = load_prepare().prepare(cfg["data_dir"], seed=cfg["seed"], n_train=cfg["n_train"], n_test=cfg["n_test"],
                                  n_pretrain=cfg["n_pretrain"], vocab_size=cfg["vocab_size"])
    base = build_base(data, cfg, train)
    t1 = time.time()
    result, out = finetune(base, data, cfg, train)
    events = []
    if os.path.isfile(os.path.join(out, "events.jsonl")):
        with open(os.path.join(out, "events.jsonl")) as f:
            events = [json.loads(line) for line in f]
    t2 = time.time()
    before = accuracy(base, "", data, os.path.join(out, "eval_base"), cfg)
    after = accuracy(base, os.path.join(out, "adapter"), data, os.path.join(out, "eval"), cfg)
    n_ranks = sum(len(m["pruned"]) for e in events for m in e["modules"].values())
    print(f"\n{cfg['method']}: {len(events)} prune/expand operations ({n_ranks} ranks re-initialised), "
          f"see {out}/events.jsonl" if cfg["method"] == "beamlora" else "")
    print(f"| model (held-out problems: {after['n']}) | accuracy | invalid answers |")
    print("|---|---|---|")
    print(f"| base (pretrained only) | {100 * before['accuracy']:.1f}% | {100 * before['invalid_rate']:.1f}% |")
    print(f"| base + {cfg['method']} adapter | {100 * after['accuracy']:.1f}% | {100 * after['invalid_rate']:.1f}% |")
    print(f"\ntime: {time.time() - t0:.0f}s (data + base {t1 - t0:.0f}s, fine-tune {t2 - t1:.0f}s, "
          f"eval {time.time() - t2:.0f}s); adapter in {out}/adapter, samples in {out}/eval/gsm8k_samples.jsonl")
    return {"base": before, "finetuned": after, "events": events, "train": result, "out": out}


def main(argv, train):
    """train: train.py's `run`. `python train.py` (no arguments) hands over its own; `python demo.py` imports it."""
    return run(parse_args(list(argv), DEFAULTS, __file__), train)


if __name__ == "__main__":
    try:
        cfg = parse_args(sys.argv[1:], DEFAULTS, __file__)  # --help before torch is imported
        import train
        run(cfg, train.run)
    except (ValueError, OSError) as e:
        if os.environ.get("BEAMLORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
