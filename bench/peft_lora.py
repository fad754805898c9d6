r"""
The reference for train.py --method=lora: the same fine-tune done with transformers + PEFT in a plain PyTorch
loop, so that our numbers (loss curve, scores, step time, memory) stand beside a standard implementation's.
bench/smollm2.py runs it as the label "peft"; it takes train.py's options.

    python bench/peft_lora.py --init_from=models/smollm2/SmolLM2-135M-Instruct --data=data/reasoning_gym/train.jsonl \
        --val_data=data/reasoning_gym/test.jsonl --data_format=chat --method=lora --r=8 --batch_size=16 \
        --micro_batch_size=16 --max_steps=100 --lr=1e-3 --warmup_steps=5 --dropout=0.0 --max_len=128 \
        --dtype=float32 --device=cpu --seed=0 --out_dir=out/peft_lora

The same as train.py's run with these options, by train.py's and dataset.py's own functions: the token ids and
label masks (train.load_data), the global batches and their order (dataset.epoch_batches with the seed, collate),
the loss (summed over the global batch's target tokens, divided by their count), the schedule (train.lr_at),
AdamW (train.make_optimizer: its betas, eps, weight decay on 2-d parameters only), gradient clipping, and the
initial A and B (drawn by train.build_model after torch.manual_seed(seed), as train.py draws them, then copied into
PEFT's lora_A / lora_B). PEFT's own: the model (transformers' AutoModelForCausalLM, fp32), the LoRA layers
(peft.LoraConfig on --targets with --r, --alpha, --dropout, --rslora) and the adapter file (save_pretrained), which
eval.py --adapter reads. Only plain LoRA in fp32 on one process: other options stop with one line.

Writes to out_dir: adapter/ (PEFT's save_pretrained), log.jsonl (every step: loss, lr, seconds) and result.json
(the losses, held-out loss, wall time of the loop, peak memory: peak RSS on the CPU).
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, cli, parse_args  # noqa: E402

REFUSED = {  # train.py options this reference does not do: (is it set?, what to say)
    "method": (lambda v: v != "lora", "is plain LoRA: --method=lora"),
    "dora": (bool, "is plain LoRA (no --dora)"),
    "dtype": (lambda v: v != "float32", "runs in float32 only"),
    "model_config": (bool, "fine-tunes a checkpoint: --init_from"),
    "resume": (bool, "has no checkpoints (no --resume)"),
    "compile": (bool, "runs eagerly (no --compile)"),
    "gradient_checkpointing": (bool, "keeps every activation (no --gradient_checkpointing)"),
    "export_rank": (bool, "exports PEFT's own adapter (no --export_rank)"),
    "save_merged": (bool, "exports the adapter only (no --save_merged)"),
}


def check(cfg):
    """train.py's checks, then what this reference does not do; and transformers + peft installed."""
    import train
    train.check_config(cfg)
    for key, (is_set, what) in REFUSED.items():
        if is_set(cfg[key]):
            raise ConfigError(f"--{key}={cfg[key]}: the PEFT reference {what}")
    if int(os.environ.get("RANK", -1)) != -1:
        raise ConfigError("the PEFT reference runs on one process (not under torchrun)")
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("the PEFT reference needs transformers and peft: pip install -r requirements-test.txt") \
            from None


def initial_adapters(cfg):
    """{module name: (A, B)}: the initial adapter train.py draws for this seed, by its own code in its order. The
    base's weights are a memory map that nothing here reads, so this costs little memory."""
    import torch
    import train
    torch.manual_seed(cfg["seed"])
    model, mods = train.build_model(cfg, train.method_hooks(cfg), None, torch.float32)
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in mods.items()}


def summed_loss(model, x, y):
    """Cross-entropy summed over the target tokens (y is already shifted by collate), in fp32."""
    import torch.nn.functional as F
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")


def heldout_loss(model, examples, cfg):
    """Mean loss per target token over the held-out examples, micro-batch by micro-batch (train.heldout_loss's)."""
    import torch
    from dataset import collate
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), cfg["micro_batch_size"]):
            x, y = collate(examples, list(range(i, min(i + cfg["micro_batch_size"], len(examples)))), cfg["device"])
            total += summed_loss(model, x, y).item()
            count += (y != -100).sum().item()
    model.train()
    return total / max(count, 1)


def train_peft(cfg):
    """The run; returns train.train's summary keys: losses, steps, wall_s, peak_mem_gib, val_loss."""
    check(cfg)
    cfg = dict(cfg, alpha=cfg["alpha"] or 2.0 * cfg["r"])  # --alpha=0 is 2 r, as train.py resolves it
    import peft
    import torch
    import transformers
    import train
    from dataset import collate, epoch_batches
    from meter import peak_memory_gib
    from tokenizer import Tokenizer
    transformers.logging.set_verbosity_error()
    tok = Tokenizer(cfg["tokenizer"] or cfg["init_from"])
    train_ex, val_ex, lengths, n_targets = train.load_data(cfg, tok)
    plan_epoch, plan = 0, epoch_batches(lengths, 0, cfg["seed"], cfg["batch_size"])
    if not plan:
        raise ConfigError(f"{cfg['data']}: {len(train_ex)} examples, fewer than one global batch of "
                          f"{cfg['batch_size']}")
    total = cfg["max_steps"] or cfg["epochs"] * len(plan)
    init = initial_adapters(cfg)

    model = transformers.AutoModelForCausalLM.from_pretrained(cfg["init_from"], dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"], use_rslora=cfg["rslora"],
        target_modules=cfg["targets"].split(","), bias="none", task_type="CAUSAL_LM"))
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    if layers.keys() != init.keys():
        raise RuntimeError(f"PEFT wrapped {len(layers)} modules, train.py {len(init)}: "
                           f"{sorted(layers.keys() ^ init.keys())[:4]}")
    with torch.no_grad():  # train.py's initial A and B, so that both runs start from the same weights
        for n, (A, B) in init.items():
            layers[n].lora_A["default"].weight.copy_(A)
            layers[n].lora_B["default"].weight.copy_(B)
    model.to(cfg["device"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.make_optimizer(params, cfg)
    print(f"peft lora: {sum(p.numel() for p in params):,} trained params, {len(train_ex)} examples, {total} steps "
          f"of {cfg['batch_size']}", flush=True)

    mb = cfg["micro_batch_size"]
    losses, log, t_start = [], [], time.time()
    for step in range(total):
        t0 = time.time()
        epoch, i = divmod(step, len(plan))
        if epoch != plan_epoch:  # the batch plan once per epoch, as train.py makes it
            plan_epoch, plan = epoch, epoch_batches(lengths, epoch, cfg["seed"], cfg["batch_size"])
        batch = plan[i]
        n_tgt = sum(n_targets[j] for j in batch)  # target tokens of the global batch
        lr = train.lr_at(step, total, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for k in range(len(batch) // mb):
            x, y = collate(train_ex, batch[k * mb:(k + 1) * mb], cfg["device"])
            loss = summed_loss(model, x, y)
            (loss / n_tgt).backward()
            loss_sum += loss.item()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum / n_tgt)
        log.append({"step": step + 1, "loss": losses[-1], "lr": lr, "step_s": time.time() - t0})
        if (step + 1) % cfg["log_interval"] == 0 or step + 1 == total:
            print(f"step {step + 1}/{total} | loss {losses[-1]:.4f} | lr {lr:.2e} | {log[-1]['step_s']:.2f} s",
                  flush=True)
    result = {"losses": losses, "steps": total, "wall_s": time.time() - t_start,
              "peak_mem_gib": peak_memory_gib("cuda" if cfg["device"].startswith("cuda") else "cpu")}
    os.makedirs(cfg["out_dir"], exist_ok=True)
    model.save_pretrained(os.path.join(cfg["out_dir"], "adapter"))
    if val_ex:
        result["val_loss"] = heldout_loss(model, val_ex, cfg)
        print(f"held-out loss {result['val_loss']:.4f}")
    with open(os.path.join(cfg["out_dir"], "log.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in log)
    with open(os.path.join(cfg["out_dir"], "result.json"), "w") as f:
        json.dump(dict(result, transformers=transformers.__version__, peft=peft.__version__), f, indent=1)
    return result


def main(argv):
    import train
    return train_peft(parse_args(argv, train.DEFAULTS, train.DOC_FILES, __file__))


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, RuntimeError))
