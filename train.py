"""
Fine-tune a LLaMA / Mistral checkpoint with BeamLoRA, the LoRA-family methods it is compared with
(docs/README.md) or full fine-tuning. One loop for CPU, one GPU, or many under torchrun (DDP).

    python train.py                                      # the offline demo (demo.py), no arguments
    python train.py config/llama2_7b_metamath_beamlora.py --micro_batch_size=2
    torchrun --nproc_per_node=8 train.py config/llama2_7b_metamath_beamlora.py
    python train.py config/llama2_7b_metamath_beamlora.py --resume    # continue from out_dir/ckpt.pt
    python train.py config/llama2_7b_metamath_beamlora.py --overwrite # start over in an out_dir that holds a run

Writes to out_dir: ckpt.pt (every save_interval steps and at the end), events.jsonl (one line
per event of the method: BeamLoRA's prune/expand, ...), log.jsonl, scores.jsonl, adapter/ (PEFT format,
scores folded in), and on request merged/ (a full HF checkpoint). Method full writes model/ instead of adapter/;
relora always writes merged/ (its result) and merged_base/, the base its last cycle's adapter/ applies to.
Every input is checked before anything is loaded or written; a killed run continued with --resume ends
with the same files as one never killed (the .jsonl records are cut back to the checkpoint's step).

A method is the LoRA layer of beamlora.py with its seams filled in (wrap, below) and, if it acts
between optimizer steps, a controller (make_controller) that the loop drives through a few hooks:
    step(t)           after optimizer step t, gradients still in place -> an event dict or None
    state_dict(), load_state_dict(d)   its state, in ckpt.pt
    log(t)            (optional) extra fields for the log line
    penalty()         (optional) a scalar added to the loss once per optimizer step
    lr_factor(t)      (optional) a factor on the schedule's learning rate
    final()           (optional) -> {file name: JSON object}, written to out_dir at the end (LR-LoRA: ranks.json)
A parameter with an `lr_scale` attribute (LR-LoRA's rank rho) gets an AdamW group of its own whose learning
rate is the schedule's times lr_scale.
"""
import gc
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist

import adalora
import beamlora
import increlora
import lrlora
import pissa
import relora
import rundir
from rundir import atomic_save
from dora import add_magnitudes  # the module; the --dora flag below takes the name "dora"
from configurator import ConfigError, parse_args
from dataset import collate, epoch_batches, tokenize_file
from model import ModelArgs, Transformer, load_config
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# defaults, overridden by a config file and --key=value (see configurator.py)
# model and data
out_dir = "out"  # ckpt.pt, logs, adapter/ (or model/) and merged/ go here
init_from = ""  # an HF checkpoint directory (config.json + safetensors)
model_config = ""  # or a config.json for a fresh, randomly initialised model (pretraining, method full)
tokenizer = ""  # tokenizer.model (or its directory); default: the one in init_from
data = ""  # training data: .jsonl instruction data, or .txt plain text (loss on every token)
val_data = ""  # held-out data in the same format: loss reported at eval_interval and at the end
data_format = "metamathqa"  # metamathqa (query/response) | alpaca | gsm8k (question/answer) | chat (messages)
max_len = 512  # tokens per example; longer ones are truncated (and counted)
# method: LoRA on the target linears, or a method built on it (docs/README.md)
method = "beamlora"  # full | lora | beamlora | dora | pissa | milora | adalora | relora | increlora | lrlora (docs/)
targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # the linears that get an adapter
r = 64  # LoRA rank
alpha = 128.0  # the update is scaled by alpha / r (the paper's runs: alpha = 2r)
dropout = 0.05  # LoRA dropout on the adapter's input
rslora = False  # scaling alpha / sqrt(r) instead of alpha / r (rsLoRA), for any LoRA-family method
dora = False  # DoRA's magnitude and direction (dora.py) on any LoRA-family method: --method=beamlora --dora
export_rank = 0  # > 0: pad every module of the exported adapter to this rank (servers that need one rank)
# BeamLoRA (docs/BEAMLORA.md)
tau = 0.05  # temperature of the rank scores (the authors use 0.03 when lr < 1e-4)
dt = 0  # steps between prune/expand operations (0: total_steps // 12, rounded to even)
p_init = 0.95  # initial top-p threshold (paper: 0.95 for r = 64, 0.96 for r = 32)
end_step = 0  # p reaches 1 here (0: two thirds of the total steps, as in the paper)
scope = "global"  # global (the authors' code) | module (the paper's text)
no_expand = False  # ablation (paper Table 3): pruned ranks are zeroed, not refilled
random_assess = False  # ablation: the same number of ranks, but pruned and source ranks drawn at random
static_p = False  # ablation: the top-p threshold stays p_init
no_history = False  # ablation: copy the source ranks as they are now, not from the dt/2 snapshot
inherit_moments = "history"  # history: pruned ranks get the sources' historical AdamW moments (the paper's text);
                             # keep: they keep their own, what the authors' code executes (docs/BEAMLORA.md, section 4)
# AdaLoRA (docs/ADALORA.md) and IncreLoRA: --r is the final average rank, the budget r x modules LoRA has at r
init_r = 0  # ranks per module at the start (0: adalora 3r/2, its paper's b(0) = 1.5 b(T); increlora r/2)
tinit = -1  # steps at init_r before the budget falls (-1: a tenth of the steps)
tfinal = -1  # last steps with the final ranks fixed (-1: a third of the steps)
deltaT = 10  # steps between maskings while the budget falls
ipt_beta1 = 0.85  # EMA of the sensitivity |w * grad|
ipt_beta2 = 0.85  # EMA of its uncertainty
orth_reg_weight = 0.1  # orthogonality penalty on A and B (the authors' scripts; PEFT's default is 0.5)
orth = "code"  # code: mean of ||A A^T - I||_F over the matrices (PEFT, authors' code); paper: sum of squares
# IncreLoRA (docs/INCRELORA.md), with init_r, ipt_beta1/2, orth_reg_weight and orth above
max_r = 0  # slots per module: the most ranks one module can reach, its reserve included (0: 2r)
incre_warmup = -1  # steps before the first addition (-1: a tenth of the steps)
incre_interval = 0  # steps between additions (0: spread so that the budget is reached at two thirds of the steps)
top_h = 10  # modules that grow at each addition
incre_rank_num = 0  # ranks a chosen module gains, also the size of its reserve (0: r/2, the authors' rule)
incre_lr_warmup = -1  # lr warmup of the new ranks (-1: as long as the main warmup; 0: none)
# ReLoRA (docs/RELORA.md)
relora_steps = 0  # steps per cycle: merge, re-initialise, prune the moments, restart the lr (0: a quarter of the steps)
relora_warmup = 0  # steps of the lr warmup after each restart (0: min(50, relora_steps // 10), at least 1)
relora_prune = 0.99  # fraction of each AdamW moment tensor of A and B zeroed at a restart, smallest magnitudes first
relora_joint = True  # an entry keeps both moments or neither (False: each tensor on its own, the authors' code)
# LR-LoRA (lrlora.py, docs/LRLORA.md): --r is the budget, the mean rank in parameters (LoRA r's count)
r_max = 0  # ranks allocated per module; each learns its rank in [0, r_max] (0: 2r)
r_init = 0.0  # every module's rank rho at step 0 (0: r)
rank_lr = 0.0  # rho's peak learning rate, in ranks per step (0: 4 r_max / hard_step); AdamW's own lr is far too slow
rank_sample = True  # each step draws a nested 0/1 mask with P(rank i on) = m_i; False: the soft mask m itself
temp_start = 1.0  # the mask's temperature T at step 0, in ranks; annealed geometrically to temp_end
temp_end = 0.05  # at hard_step, where the mask becomes exactly 0/1 and the ranks freeze at the budget
hard_step = 0  # (0: three quarters of the steps)
# optimisation
epochs = 3  # passes over the data
max_steps = 0  # 0: epochs over the data
batch_size = 32  # global batch, in examples, over all processes and accumulation steps
micro_batch_size = 4  # examples per forward/backward on one process
lr = 3e-4  # peak learning rate
min_lr = 0.0  # the schedule decays to this
schedule = "cosine"  # cosine | linear (the authors' commonsense runs), after a linear warmup
warmup_ratio = 0.03  # the authors' math and code runs
warmup_steps = 0  # if > 0, overrides warmup_ratio (the authors' commonsense runs: 100)
weight_decay = 0.0  # AdamW, on 2-d parameters only (not on scores or norms)
beta1 = 0.9  # AdamW
beta2 = 0.999  # AdamW
grad_clip = 1.0  # max global gradient norm (0: no clipping)
# system
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # float32 | bfloat16 | float16 (default: bfloat16 on a GPU that has it)
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu | cuda (torchrun: one GPU per process)
gradient_checkpointing = False  # per block, non-reentrant: a 7B model on a 24 GB GPU needs it
compile = False  # torch.compile the model
seed = 1337  # data order, adapter init and BeamLoRA's random choices
# logging and checkpoints
log_interval = 10  # steps between log lines (console and log.jsonl)
eval_interval = 0  # 0: held-out loss only at the end
score_log_interval = 0  # write rank importance (scores, ||b_i a_i||) to scores.jsonl every N steps
save_interval = 0  # 0: checkpoint only at the end
resume = False  # continue from out_dir/ckpt.pt
overwrite = False  # a fresh run into an out_dir that holds a run's files deletes them (else it refuses)
stop_after = 0  # stop with a checkpoint after this many steps of this run (a job time limit); --resume goes on
save_merged = False  # also write merged/ (W0 + scaling * B diag(s) A), a plain HF checkpoint
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0: by GPU name and dtype (GPU_PEAK_FLOPS), no MFU on CPU
wandb_log = False  # log to Weights & Biases (needs wandb installed)
wandb_project = "beamlora"  # W&B project
wandb_run_name = "run"  # W&B run name
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
# --resume: the keys that may differ from the checkpoint's, as they change where and how the run executes,
# logs, checkpoints and exports, not what it computes. Every other key, a new method's too, must match.
MAY_CHANGE_ON_RESUME = ("out_dir", "resume", "overwrite", "device", "compile", "gradient_checkpointing",
                        "log_interval", "eval_interval", "score_log_interval", "save_interval", "stop_after",
                        "save_merged", "export_rank", "peak_flops", "wandb_log", "wandb_project", "wandb_run_name")
# -----------------------------------------------------------------------------

def lr_at(step, total, cfg):
    warmup = cfg["warmup_steps"] or math.ceil(cfg["warmup_ratio"] * total)
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg["schedule"] == "cosine" else 1 - progress
    return cfg["min_lr"] + decay * (cfg["lr"] - cfg["min_lr"])


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


@torch.no_grad()
def heldout_loss(model, examples, cfg, ctx):
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), cfg["micro_batch_size"]):
        x, y = collate(examples, list(range(i, min(i + cfg["micro_batch_size"], len(examples)))), cfg["device"])
        with ctx:
            total += model(x, targets=y).item()  # the summed loss, chunk by chunk (model.lm_loss)
        count += (y != -100).sum().item()
    model.train()
    return total / max(count, 1)


# -----------------------------------------------------------------------------
# checking every input before anything is loaded or written, and resuming

def check_config(cfg, world=1):
    """The options on their own: one line naming the first bad one. `world`: processes under torchrun."""
    choices = {"method": METHODS, "scope": ("global", "module"), "schedule": ("cosine", "linear"),
               "inherit_moments": ("history", "keep"), "orth": ("code", "paper"),
               "dtype": ("float32", "bfloat16", "float16"), "data_format": ("metamathqa", "alpaca", "gsm8k", "chat")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key}={cfg[key]}: must be one of {', '.join(allowed)}")
    if cfg["dora"] and cfg["method"] == "full":
        raise ConfigError("--dora: needs a LoRA-family --method, not full")
    if cfg["dora"] and cfg["method"] in ("adalora", "relora", "increlora"):
        raise ConfigError(f"--dora: not with --method={cfg['method']} (PEFT has no such combination to test against)")
    need = {"at least 1": ("r", "batch_size", "micro_batch_size", "log_interval"), "at least 2": ("max_len",),
            "positive": ("alpha", "tau"),
            "0 or more": ("dt", "end_step", "epochs", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
                          "grad_clip", "eval_interval", "score_log_interval", "save_interval", "stop_after",
                          "export_rank", "seed", "peak_flops"),
            "in [0, 1)": ("dropout", "beta1", "beta2"), "in [0, 1]": ("warmup_ratio",), "in (0, 1)": ("p_init",)}
    test = {"at least 1": lambda v: v >= 1, "at least 2": lambda v: v >= 2, "positive": lambda v: v > 0,
            "0 or more": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1, "in [0, 1]": lambda v: 0 <= v <= 1,
            "in (0, 1)": lambda v: 0 < v < 1}
    for what, keys in need.items():
        for key in keys:
            if not test[what](cfg[key]):  # NaN fails every test
                raise ConfigError(f"--{key}={cfg[key]}: must be {what}")
    if cfg["min_lr"] > cfg["lr"]:
        raise ConfigError(f"--min_lr={cfg['min_lr']}: must not exceed --lr={cfg['lr']}")
    if cfg["max_steps"] == 0 and cfg["epochs"] == 0:
        raise ConfigError("--epochs=0 (with --max_steps=0): the run would train nothing")
    if cfg["batch_size"] % (cfg["micro_batch_size"] * world):
        raise ConfigError(f"--batch_size={cfg['batch_size']} must be a multiple of micro_batch_size x processes "
                          f"({cfg['micro_batch_size']} x {world})")
    if cfg["dt"] and (cfg["dt"] < 2 or cfg["dt"] % 2):
        raise ConfigError(f"--dt={cfg['dt']}: must be an even number >= 2 (a snapshot is taken at dt/2)")
    if cfg["method"] != "full" and not all(t.strip() for t in cfg["targets"].split(",")):
        raise ConfigError(f"--targets={cfg['targets']!r}: an empty module name")
    if bool(cfg["init_from"]) == bool(cfg["model_config"]):
        raise ConfigError("give exactly one of --init_from (an HF checkpoint dir) or --model_config (a config.json)")
    if not cfg["data"]:
        raise ConfigError("--data: no training data given")
    for key in ("data", "val_data"):
        if cfg[key] and not os.path.isfile(cfg[key]):
            raise ConfigError(f"{cfg[key]}: {'not a file' if os.path.exists(cfg[key]) else 'data file not found'} (--{key})")
        if cfg[key] and os.path.getsize(cfg[key]) == 0:
            raise ConfigError(f"{cfg[key]}: data file is empty (--{key})")
    dev = cfg["device"]
    if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
        raise ConfigError(f"--device={dev}: must be cpu, cuda or cuda:N")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={dev}: CUDA is not available here (torch {torch.__version__}"
                          f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU found'}); use --device=cpu")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device={dev}: there are {torch.cuda.device_count()} GPUs")
    if dev.startswith("cuda") and cfg["dtype"] == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype=bfloat16: {torch.cuda.get_device_name(dev)} does not support it; use float16")
    if cfg["resume"] and cfg["overwrite"]:
        raise ConfigError("--resume and --overwrite: give one (continue the run in out_dir, or delete it and start over)")
    if cfg["wandb_log"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb_log: wandb is not installed (pip install wandb)")
    out, parent = cfg["out_dir"], os.path.abspath(cfg["out_dir"])
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out_dir={out}: exists and is not a directory")
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"--out_dir={out}: cannot be written ({parent} is not a writable directory)")


def model_args(cfg):
    """The base's ModelArgs from its config.json (or --model_config), checked; the targets and r are tried on a
    weightless (meta) copy of the model, so a bad one fails before any weight is read."""
    if cfg["init_from"]:
        where = os.path.join(cfg["init_from"], "config.json")
        config = load_config(cfg["init_from"])
    else:
        where = cfg["model_config"]
        try:
            with open(where, encoding="utf-8") as f:
                config = json.load(f)
        except OSError as e:
            raise ConfigError(f"{where}: cannot read --model_config ({e.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
    args = ModelArgs.from_config(config, where)
    if cfg["method"] != "full":
        with torch.device("meta"):
            skeleton = Transformer(args, config)
        known = beamlora.linear_names(skeleton)
        unknown = [t for t in cfg["targets"].split(",") if t not in known]
        if unknown:
            raise ConfigError(f"--targets: unknown target module(s) {', '.join(unknown)}; the model's linears are: "
                              f"{', '.join(known)}")
        beamlora.apply_lora(skeleton, cfg["targets"].split(","), r=lora_rank(cfg), alpha=cfg["alpha"])  # r fits each?
    return config, where, args


# --method: each one's layer in wrap, its controller in make_controller
METHODS = ("full", "lora", "beamlora", "dora", "pissa", "milora", "adalora", "relora", "increlora", "lrlora")


def wrap(model, cfg):
    """The method's layers: LoRA on the target linears, then what the method adds to each. -> {name: module}"""
    if cfg["method"] == "full":
        return {}
    if cfg["method"] == "lrlora":  # r_max ranks, each module's rank learned under the budget --r
        mods = lrlora.wrap(model, cfg)
    else:
        mods = beamlora.apply_lora(model, cfg["targets"].split(","), r=lora_rank(cfg), alpha=cfg["alpha"],
                                   dropout=cfg["dropout"], rslora=cfg["rslora"], dtype=torch.float32)
    if cfg["method"] == "beamlora":
        beamlora.add_scores(mods, cfg["tau"])
    if cfg["method"] in ("pissa", "milora") and not cfg["resume"]:  # on resume pissa.Init rebuilds W0 from ckpt.pt
        pissa.init(mods, minor=cfg["method"] == "milora", verbose=int(os.environ.get("RANK", 0)) == 0)
    if cfg["method"] == "dora" or cfg["dora"]:
        add_magnitudes(mods)
    if cfg["method"] == "adalora":
        adalora.add_svd(mods)
    if cfg["method"] == "increlora":
        increlora.add_slots(mods, *increlora_ranks(cfg))
    return mods


def lora_rank(cfg):
    """The layers' r"""
    return {"adalora": cfg["init_r"] or 3 * cfg["r"] // 2, "increlora": cfg["max_r"] or 2 * cfg["r"],
            "lrlora": cfg["r_max"] or 2 * cfg["r"]}.get(cfg["method"], cfg["r"])


def increlora_ranks(cfg):
    """(ranks each module starts with, ranks added at a time and held in reserve)"""
    return cfg["init_r"] or max(1, cfg["r"] // 2), cfg["incre_rank_num"] or max(1, cfg["r"] // 2)


def make_optimizer(params, cfg, fused=False):
    """AdamW without weight decay on the 1-d parameters (scores, norms, magnitudes), as PEFT/HF do. A parameter
    with an lr_scale attribute (LR-LoRA's rho) gets a group of its own, whose lr the loop multiplies by it."""
    decay = [p for p in params if p.dim() >= 2 and not hasattr(p, "lr_scale")]
    no_decay = [p for p in params if p.dim() < 2 and not hasattr(p, "lr_scale")]
    scaled = [{"params": [p for p in params if getattr(p, "lr_scale", None) == s], "weight_decay": 0.0, "lr_scale": s}
              for s in sorted({p.lr_scale for p in params if hasattr(p, "lr_scale")})]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}] + scaled,
                             lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def make_controller(mods, optimizer, cfg, total):
    """What the method does between optimizer steps (see the hooks at the top), or None."""
    if cfg["method"] == "beamlora":
        return beamlora.BeamController(
            mods, optimizer, dt=cfg["dt"] or max(2, (total // 12) // 2 * 2), p_init=cfg["p_init"],
            end_step=cfg["end_step"] or (2 * total) // 3, total_steps=total, scope=cfg["scope"],
            no_expand=cfg["no_expand"], random_assess=cfg["random_assess"], static_p=cfg["static_p"],
            no_history=cfg["no_history"], inherit_moments=cfg["inherit_moments"], seed=cfg["seed"])
    if cfg["method"] in ("pissa", "milora"):
        return pissa.Init(mods)  # A0, B0 into ckpt.pt
    if cfg["method"] == "adalora":
        return adalora.AdaController(
            mods, target_r=cfg["r"], tinit=cfg["tinit"] if cfg["tinit"] >= 0 else total // 10,
            tfinal=cfg["tfinal"] if cfg["tfinal"] >= 0 else total // 3, deltaT=cfg["deltaT"], total_steps=total,
            beta1=cfg["ipt_beta1"], beta2=cfg["ipt_beta2"], orth_weight=cfg["orth_reg_weight"], orth=cfg["orth"])
    if cfg["method"] == "increlora":
        (init_r, k), budget = increlora_ranks(cfg), cfg["r"] * len(mods)
        warmup = cfg["incre_warmup"] if cfg["incre_warmup"] >= 0 else total // 10
        rounds = max(1, math.ceil((budget - init_r * len(mods)) / max(1, cfg["top_h"] * k)))
        return increlora.IncreController(
            mods, optimizer, budget, init_r, k, cfg["top_h"], warmup,
            interval=cfg["incre_interval"] or max(1, (2 * total // 3 - warmup) // rounds),
            lr_warmup=cfg["incre_lr_warmup"] if cfg["incre_lr_warmup"] >= 0 else
            cfg["warmup_steps"] or math.ceil(cfg["warmup_ratio"] * total),
            total_steps=total, beta1=cfg["ipt_beta1"], beta2=cfg["ipt_beta2"], orth_weight=cfg["orth_reg_weight"],
            orth=cfg["orth"], seed=cfg["seed"])
    if cfg["method"] == "relora":
        steps = cfg["relora_steps"] or max(1, total // 4)
        warmup = cfg["relora_warmup"] or max(1, min(50, steps // 10))
        return relora.ReLoController(mods, optimizer, steps, warmup, cfg["relora_prune"], total, seed=cfg["seed"],
                                     joint=cfg["relora_joint"])
    if cfg["method"] == "lrlora":
        return lrlora.RankController(mods, optimizer, budget_rank=cfg["r"], total_steps=total, lr=cfg["lr"],
                                     rank_lr=cfg["rank_lr"], temp_start=cfg["temp_start"], temp_end=cfg["temp_end"],
                                     hard_step=cfg["hard_step"], seed=cfg["seed"])
    return None


def train(cfg):
    """Runs one training job; returns a summary dict (losses, held-out loss, wall time, peak memory)."""
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1)
    # every input is read and checked before anything is loaded or written: a bad one costs seconds and no file
    config, config_path, args = model_args(cfg)
    tok = Tokenizer(cfg["tokenizer"] or cfg["init_from"])
    if tok.n_words > args.vocab_size:
        raise ConfigError(f"{tok.path}: {tok.n_words} tokens, more than the model's vocab_size ({args.vocab_size})")
    # the examples are two int lists each, ~800k lists at MetaMathQA's size, alive to the end: the cyclic GC
    # would walk them all at every full collection (seconds each; while they are built, many times over).
    # So: garbage collected first, no collections while they are built, then frozen out of the GC's sight.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        train_ex = tokenize_file(cfg["data"], tok, cfg)
        val_ex = tokenize_file(cfg["val_data"], tok, cfg) if cfg["val_data"] else []
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()
    lengths = [len(e[0]) for e in train_ex]
    # loss tokens per example (labels[0] is never a target: position t predicts t + 1), counted once, at C speed
    n_targets = [len(e[1]) - e[1].count(-100) - (e[1][0] != -100) for e in train_ex]
    plan_epoch, plan = 0, epoch_batches(lengths, 0, cfg["seed"], cfg["batch_size"])
    steps_per_epoch = len(plan)  # the same for every epoch: only the order changes
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg['data']}: {len(train_ex)} examples, fewer than one global batch of {cfg['batch_size']}")
    total = cfg["max_steps"] or cfg["epochs"] * steps_per_epoch
    prints = rundir.fingerprints({"data": cfg["data"], "val_data": cfg["val_data"], "tokenizer": tok.path,
                                  "model config": config_path})
    ck, records = rundir.check_out_dir(cfg, DEFAULTS, MAY_CHANGE_ON_RESUME, prints)  # reads only

    if ddp:
        dist.init_process_group(backend="nccl" if cfg["device"].startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg["device"].startswith("cuda"):
            cfg["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg["device"])
    else:
        rank, world = 0, 1
    master = rank == 0
    dev_type = "cuda" if cfg["device"].startswith("cuda") else "cpu"
    accum = cfg["batch_size"] // (cfg["micro_batch_size"] * world)
    torch.manual_seed(cfg["seed"])  # same on every process: identical initial adapters
    torch.backends.cuda.matmul.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]

    # model: the frozen base in the low precision dtype, trained params in fp32
    if cfg["init_from"]:
        base_dtype = torch.float32 if cfg["method"] == "full" else ptdtype
        model = Transformer.from_pretrained(cfg["init_from"], device=cfg["device"], dtype=base_dtype)
    else:
        model = Transformer.from_config(config, device=cfg["device"])
    mods = wrap(model, cfg)
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "embed_tokens" not in n)
    optimizer = make_optimizer(params, cfg, fused=dev_type == "cuda")
    scaler = torch.amp.GradScaler(dev_type, enabled=cfg["dtype"] == "float16")
    ctx = torch.autocast(dev_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    controller = make_controller(mods, optimizer, cfg, total)
    penalty = getattr(controller, "penalty", None)
    lr_factor = getattr(controller, "lr_factor", lambda t: 1.0)
    log_extra = getattr(controller, "log", lambda t: {})

    step, ckpt_path = 0, os.path.join(cfg["out_dir"], "ckpt.pt")
    pending = []  # the losses of the steps since the last log row: that row's mean, carried across a resume
    if ck is not None:
        rundir.load_state(ck, ckpt_path, model, optimizer, scaler, controller)
        step, pending = ck["step"], list(ck.get("log_losses", []))
        torch.set_rng_state(ck["rng_cpu"])
        if dev_type == "cuda" and "rng_cuda" in ck:
            torch.cuda.set_rng_state(ck["rng_cuda"])
    if master:  # every check passed: the first write of this run
        rundir.start_writing(cfg, records)
        if ck is not None:
            print(f"resumed from {ckpt_path} at step {step}")

    raw_model = model  # the controller, checkpoints and export work on the unwrapped model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if dev_type == "cuda" else None)
    if cfg["wandb_log"] and master:
        import wandb
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)
    if master:
        print(f"{cfg['method']}: {n_train:,} trained / {n_frozen:,} frozen params, {len(train_ex)} examples, "
              f"{total} steps of {cfg['batch_size']} ({accum} micro-batches of {cfg['micro_batch_size']} x {world} "
              f"processes)" + (f", dt={controller.dt}" if hasattr(controller, "dt") else ""))

    def save_checkpoint():
        rundir.sync_records(cfg["out_dir"])  # the rows this checkpoint covers are on disk before it is
        ck = {"params": {n: p.detach() for n, p in raw_model.named_parameters() if p.requires_grad},
              "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
              "config": json.dumps(cfg), "fingerprints": {k: digest for k, (_, digest) in prints.items()},
              "log_losses": pending, "rng_cpu": torch.get_rng_state()}
        if controller is not None:
            ck["controller"] = controller.state_dict()
        if dev_type == "cuda":
            ck["rng_cuda"] = torch.cuda.get_rng_state()
        atomic_save(ck, ckpt_path)

    flops_per_token = 6 * n_train + 4 * n_frozen  # frozen matmuls: forward + input grads; trained: + weight grads
    peak = cfg["peak_flops"] or device_peak_flops(cfg["device"], cfg["dtype"])  # None: no MFU (CPU, unknown GPU)
    if master and not peak and dev_type == "cuda":
        print(f"no MFU: no {cfg['dtype']} peak known for {torch.cuda.get_device_name(cfg['device'])}; "
              "give --peak_flops=<FLOP/s of one GPU>")
    losses, t0, t_log, tokens_log, t_start = [], time.time(), time.time(), 0, time.time()
    start_step = step
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:  # the batch plan once per epoch (a resume recomputes its epoch's once)
            plan_epoch, plan = epoch, epoch_batches(lengths, epoch, cfg["seed"], cfg["batch_size"])
        batch = plan[i]
        n_tgt = sum(n_targets[j] for j in batch)  # target tokens of the global batch, all processes
        mine = batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, cfg) * lr_factor(step) * g.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=cfg["device"])
        for k in range(accum):
            x, y = collate(train_ex, mine[k * cfg["micro_batch_size"]:(k + 1) * cfg["micro_batch_size"]], cfg["device"])
            if ddp:  # sync gradients only on the last micro-batch
                model.require_backward_grad_sync = k == accum - 1
            with ctx:  # the summed loss over the micro-batch; the full logits are never held (model.lm_loss)
                loss = model(x, targets=y)
            # normalise by the target tokens of the whole global batch; DDP averages over processes, so x world
            obj = loss * world / n_tgt
            if penalty is not None and k == 0:  # the method's own term, once per step (the same on every process)
                obj = obj + penalty()
            scaler.scale(obj).backward()
            loss_sum += loss.detach()
            tokens_log += sum(lengths[j] for j in mine[k * cfg["micro_batch_size"]:(k + 1) * cfg["micro_batch_size"]])
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        step += 1
        event = controller.step(step) if controller is not None else None  # before zero_grad: some methods read grads
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum)
        losses.append(loss_sum.item() / n_tgt)
        pending.append(losses[-1])

        # records: rows of this step, appended before any checkpoint of it (a resume cuts them back to its step)
        if event and master:
            print(f"step {step}: {event.get('note', event.get('kind', 'event'))}")
            append_jsonl(os.path.join(cfg["out_dir"], "events.jsonl"), event)
        if master and cfg["score_log_interval"] and (step % cfg["score_log_interval"] == 0 or step == 1):
            imp = {n: {k: v.tolist() for k, v in d.items()} for n, d in beamlora.rank_importance(raw_model).items()}
            append_jsonl(os.path.join(cfg["out_dir"], "scores.jsonl"), {"step": step, "modules": imp})
        if master and (step % cfg["log_interval"] == 0 or step == total):
            dtime = time.time() - t_log
            tok_s = tokens_log * world / dtime
            mfu = tok_s * flops_per_token / (peak * world) if peak else None  # null in log.jsonl
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev_type == "cuda" else peak_rss_gib()
            eta = (time.time() - t0) / (step - start_step) * (total - step)
            extra = log_extra(step)  # the method's own fields (BeamLoRA: p)
            row = {"step": step, "loss": sum(pending) / len(pending),  # each step's loss in one row
                   "lr": optimizer.param_groups[0]["lr"], **extra, "tok_s": tok_s, "mfu": mfu, "mem_gib": mem}
            extra_txt = "".join(f"{k} {v:.4g} | " if isinstance(v, float) else f"{k} {v} | " for k, v in extra.items())
            print(f"step {step}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {extra_txt}"
                  f"{tok_s:,.0f} tok/s | " + (f"mfu {100 * mfu:.2f}% | " if peak else "") +
                  f"mem {mem:.2f} GiB | eta {eta / 60:.1f} min")
            append_jsonl(os.path.join(cfg["out_dir"], "log.jsonl"), row)
            if cfg["wandb_log"]:
                wandb.log(row)
            t_log, tokens_log, pending = time.time(), 0, []
        if val_ex and cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and master:
            print(f"step {step}: held-out loss {heldout_loss(raw_model, val_ex, cfg, ctx):.4f}")
        if master and cfg["save_interval"] and step % cfg["save_interval"] == 0 and step < total:
            save_checkpoint()
        if cfg["stop_after"] and step - start_step >= cfg["stop_after"] and step < total:
            if master:
                save_checkpoint()
                print(f"stopped after step {step} (--stop_after); --resume continues")
            if ddp:
                dist.barrier()
                dist.destroy_process_group()
            return {"losses": losses, "steps": step, "stopped": True}

    if ddp:  # BeamLoRA decides without communicating: check once that every process holds the same weights
        sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in params])
        ref = sums.clone()
        dist.broadcast(ref, 0)
        if not torch.equal(sums, ref):
            raise RuntimeError(f"process {rank}: trained parameters differ from process 0's")
    result = {"losses": losses, "steps": total, "wall_s": time.time() - t_start,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev_type == "cuda" else peak_rss_gib()}
    if master:
        save_checkpoint()
        for name, obj in getattr(controller, "final", dict)().items():  # the method's own records (LR-LoRA: ranks.json)
            beamlora.atomic_json(obj, os.path.join(cfg["out_dir"], name))
        tok_file = tok.path
        if cfg["method"] == "full":
            raw_model.save_pretrained(os.path.join(cfg["out_dir"], "model"))
            shutil.copy(tok_file, os.path.join(cfg["out_dir"], "model", "tokenizer.model"))
        else:
            base_dir = cfg["init_from"]
            if cfg["method"] == "relora":  # the frozen weights were trained too: the adapter's base is merged_base/
                base_dir = os.path.join(cfg["out_dir"], "merged_base")
                relora.save_base(raw_model, base_dir)
                shutil.copy(tok_file, os.path.join(base_dir, "tokenizer.model"))
            beamlora.export_peft(raw_model, os.path.join(cfg["out_dir"], "adapter"), base_dir, cfg["export_rank"])
            if cfg["save_merged"] or cfg["method"] == "relora":
                beamlora.merge_lora(raw_model)
                raw_model.save_pretrained(os.path.join(cfg["out_dir"], "merged"))
                shutil.copy(tok_file, os.path.join(cfg["out_dir"], "merged", "tokenizer.model"))
        if val_ex:
            result["val_loss"] = heldout_loss(raw_model, val_ex, cfg, ctx)
            print(f"held-out loss {result['val_loss']:.4f}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return result


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


def run(**overrides):
    """train() with this file's defaults for every setting not given: what demo.py is handed."""
    return train(dict(DEFAULTS, **overrides))


def main(argv):
    if not argv:  # no arguments: the offline demo, which calls back through `run` (it imports nothing of train.py)
        import demo
        return demo.main([], run)
    return train(parse_args(argv, DEFAULTS, __file__))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as e:  # bad input: one line, no traceback (BEAMLORA_DEBUG=1 shows it)
        if os.environ.get("BEAMLORA_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
