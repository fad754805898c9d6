"""
Fine-tune a LLaMA / Mistral checkpoint with BeamLoRA, the LoRA-family methods it is compared with
(docs/README.md) or full fine-tuning. One loop for CPU, one GPU, or many under torchrun (DDP).

    python train.py                                      # the offline demo (demo.py), no arguments
    python train.py config/llama2_7b_metamath_beamlora.py --micro_batch_size=2
    torchrun --nproc_per_node=8 train.py config/llama2_7b_metamath_beamlora.py
    python train.py config/llama2_7b_metamath_beamlora.py --resume    # continue from out_dir/ckpt.pt
    python train.py config/llama2_7b_metamath_beamlora.py --overwrite # start over in an out_dir that holds a run

Writes to out_dir: ckpt.pt (every save_interval_min minutes, every save_interval steps, at the end and when
stopped by SIGTERM or SIGUSR1), events.jsonl (one line per event of the
method: BeamLoRA's prune/expand, ...), log.jsonl, scores.jsonl, and what the method ships: adapter/ (PEFT format,
every gate folded in; merged/ too with --save_merged), model/ (full) or merged/ with merged_base/ (relora).
Every input is checked before anything is loaded or written; a killed run continued with --resume ends with the
same files as one never killed (the .jsonl records are cut back to the checkpoint's step).

On a shared cluster: one live run per out_dir (out_dir/run.lock, held with flock: a second start stops naming
the holder's pid and host; a dead holder blocks nothing); SIGTERM or SIGUSR1 (a preemption; under torchrun on every
rank) ends the current step, checkpoints and exits 128 + the signal (143, 138); a failed write (a full disk) is one
line naming the file and the last good checkpoint; under torchrun every rank leaves the process group in an order
that cannot hang (end_ddp) and ends its process once its output is flushed.

A method is a module (METHODS below; lora.py lists its hooks): its settings join this file's, its wrap fills the
one LoRA layer's seams, and its controller (beamlora.Controller) is called the same way for every method:
step(t) after each optimizer step (before zero_grad: some read gradients), penalty() once per step, lr_factor(t)
on the schedule, log(t) for the log line, final() at the end, its state in ckpt.pt. A parameter with an
`lr_scale` attribute (LR-LoRA's rank rho) gets an AdamW group of its own, at the schedule's lr times lr_scale.
"""
import gc
import importlib.util
import json
import math
import os
import re
import signal
import sys
import time
import types
import weakref

import torch
import torch.distributed as dist

import adalora
import beamlora
import cluster
import dora as dora_method  # the module; the --dora setting below takes the name "dora"
import full
import increlora
import lora
import lrlora
import milora
import pissa
import relora
import rundir
from configurator import ConfigError, check_choice, check_range, parse_args
from dataset import FORMATS, collate, epoch_batches, tokenize_file
from meter import Meter, peak_memory_gib
from model import ModelArgs, Transformer, load_config
from rundir import atomic_json, atomic_save
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
data_format = "metamathqa"  # metamathqa (query/response) | alpaca | gsm8k (question/answer) | chat (messages, in the
    # tokenizer's chat template: ChatML, Llama-3's, Mistral's; system turns kept, the replies trained) | alpaca_chat
    # (messages in the Alpaca template: the paper's code recipes)
max_len = 512  # tokens per example; longer ones are truncated (and counted)
# method: LoRA on the target linears, or a method built on it (docs/README.md)
method = "beamlora"  # full | lora | beamlora | dora | pissa | milora | adalora | relora | increlora | lrlora (docs/)
targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # the linears that get an adapter
r = 64  # LoRA rank
alpha = 0.0  # the update is scaled by alpha / r (alpha / sqrt(r) with --rslora); 0: 2 r (the papers' runs)
dropout = 0.05  # LoRA dropout on the adapter's input
rslora = False  # scaling alpha / sqrt(r) instead of alpha / r (rsLoRA), for any LoRA-family method
dora = False  # DoRA's magnitude and direction (dora.py) on any LoRA-family method: --method=beamlora --dora
export_rank = 0  # > 0: pad every module of the exported adapter to this rank (servers that need one rank)
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
dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"  # float32 | bfloat16
                                                                                   # | float16 (bfloat16 on a GPU)
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu | cuda (torchrun: one GPU per process)
gradient_checkpointing = False  # per block, non-reentrant: a 7B model on a 24 GB GPU needs it
compile = False  # torch.compile the model
seed = 1337  # data order, adapter init and BeamLoRA's random choices
# logging and checkpoints
log_interval = 10  # steps between log lines (console and log.jsonl)
eval_interval = 0  # 0: held-out loss only at the end
score_log_interval = 0  # write rank importance (scores, ||b_i a_i||) to scores.jsonl every N steps
save_interval = 0  # steps between checkpoints (0: none by steps)
save_interval_min = 30.0  # minutes of wall time between checkpoints (0: none by time), and at least 100 times the
                          # last checkpoint's write time: checkpoints cost at most 1% of the run (bench_checkpoint)
resume = False  # continue from out_dir/ckpt.pt
overwrite = False  # a fresh run into an out_dir that holds a run's files deletes them (else it refuses)
stop_after = 0  # stop with a checkpoint after this many steps of this run (a job time limit); --resume goes on
save_merged = False  # also write merged/ (W0 + scaling * B diag(s) A), a plain HF checkpoint
peak_flops = 0.0  # one device's peak FLOP/s for MFU; 0: by GPU name and dtype (GPU_PEAK_FLOPS), no MFU on CPU
wandb_log = False  # log to Weights & Biases (needs wandb installed)
wandb_project = "beamlora"  # W&B project
wandb_run_name = "run"  # W&B run name
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
# the methods, by --method name; each module's settings (beamlora.py: tau, dt, ...) join the defaults above
METHODS = {m.__name__: m
           for m in (full, lora, beamlora, dora_method, pissa, milora, adalora, relora, increlora, lrlora)}
HOOKS = ("check", "rank", "wrap", "controller", "export", "TRAINS_BASE", "SHIPS", "DORA")  # lora.py: their defaults


def method_settings(module):
    """A method module's settings: its module-level numbers, strings and bools not named in capitals."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and not k.isupper() and type(v) in (int, float, str, bool)}


for _m in METHODS.values():
    _clash = DEFAULTS.keys() & method_settings(_m).keys()
    if _clash:  # one name, one setting: --help and the configurator could not tell them apart
        raise ImportError(f"{_m.__name__}.py: settings {sorted(_clash)} are already train.py's or another method's")
    DEFAULTS.update(method_settings(_m))
DOC_FILES = [__file__] + [m.__file__ for m in METHODS.values()]  # where --help finds each setting's comment
# --resume: the keys that may differ from the checkpoint's, as they change where and how the run executes,
# logs, checkpoints and exports, not what it computes. Every other key, a new method's too, must match.
MAY_CHANGE_ON_RESUME = ("out_dir", "resume", "overwrite", "device", "compile", "gradient_checkpointing",
                        "log_interval", "eval_interval", "score_log_interval", "save_interval", "save_interval_min",
                        "stop_after", "save_merged", "export_rank", "peak_flops", "wandb_log", "wandb_project",
                        "wandb_run_name")
# -----------------------------------------------------------------------------


def method_hooks(cfg):
    """The --method's module as the loop sees it: every hook of lora.py, the module's own where it has one."""
    module = METHODS[cfg["method"]]
    return types.SimpleNamespace(**{h: getattr(module, h, getattr(lora, h)) for h in HOOKS})


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
# checking every input before anything is loaded or written

def check_config(cfg, world=1):
    """The options on their own: one line naming the first bad one. `world`: processes under torchrun. The
    method checks its own settings (its `check` hook), so that every input fails before anything is loaded."""
    check_choice(cfg, "method", tuple(METHODS))
    for key, allowed in {"schedule": ("cosine", "linear"), "dtype": ("float32", "bfloat16", "float16"),
                         "data_format": FORMATS}.items():
        check_choice(cfg, key, allowed)
    method = method_hooks(cfg)
    method.check(cfg)
    if cfg["dora"] and method.TRAINS_BASE:
        raise ConfigError(f"--dora: needs a LoRA-family --method, not {cfg['method']}")
    if cfg["dora"] and not method.DORA:
        raise ConfigError(f"--dora: not with --method={cfg['method']} (PEFT has no such combination to test against)")
    check_range(cfg, "at least 1", "r", "batch_size", "micro_batch_size", "log_interval")
    check_range(cfg, "at least 2", "max_len")
    check_range(cfg, "0 or more", "alpha")  # 0: 2 r
    check_range(cfg, "0 or more", "epochs", "max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
                "eval_interval", "score_log_interval", "save_interval", "save_interval_min", "stop_after",
                "export_rank", "seed", "peak_flops")
    check_range(cfg, "in [0, 1)", "dropout", "beta1", "beta2")
    check_range(cfg, "in [0, 1]", "warmup_ratio")
    if cfg["min_lr"] > cfg["lr"]:
        raise ConfigError(f"--min_lr={cfg['min_lr']}: must not exceed --lr={cfg['lr']}")
    if cfg["max_steps"] == 0 and cfg["epochs"] == 0:
        raise ConfigError("--epochs=0 (with --max_steps=0): the run would train nothing")
    if cfg["batch_size"] % (cfg["micro_batch_size"] * world):
        raise ConfigError(f"--batch_size={cfg['batch_size']} must be a multiple of micro_batch_size x processes "
                          f"({cfg['micro_batch_size']} x {world})")
    if not method.TRAINS_BASE and not all(t.strip() for t in cfg["targets"].split(",")):
        raise ConfigError(f"--targets={cfg['targets']!r}: an empty module name")
    if bool(cfg["init_from"]) == bool(cfg["model_config"]):
        raise ConfigError("give exactly one of --init_from (an HF checkpoint dir) or --model_config (a config.json)")
    if not cfg["data"]:
        raise ConfigError("--data: no training data given")
    for key in ("data", "val_data"):
        if cfg[key] and not os.path.isfile(cfg[key]):
            raise ConfigError(f"{cfg[key]}: {'not a file' if os.path.exists(cfg[key]) else 'data file not found'} "
                              f"(--{key})")
        if cfg[key] and os.path.getsize(cfg[key]) == 0:
            raise ConfigError(f"{cfg[key]}: data file is empty (--{key})")
    check_system(cfg)


def check_system(cfg):
    """The device, dtype, wandb and out_dir options against this machine."""
    dev = cfg["device"]
    if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
        raise ConfigError(f"--device={dev}: must be cpu, cuda or cuda:N")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={dev}: CUDA is not available here (torch {torch.__version__}"
                          f"{', a CPU-only build' if torch.version.cuda is None else ', no GPU found'}); "
                          "use --device=cpu")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device={dev}: there are {torch.cuda.device_count()} GPUs")
    if dev.startswith("cuda") and cfg["dtype"] == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype=bfloat16: {torch.cuda.get_device_name(dev)} does not support it; use float16")
    if cfg["resume"] and cfg["overwrite"]:
        raise ConfigError("--resume and --overwrite: give one (continue the run in out_dir, or delete it and "
                          "start over)")
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
    """The base's ModelArgs from its config.json (or --model_config), checked; the targets and the method's rank
    are tried on a weightless (meta) copy of the model, so a bad one fails before any weight is read."""
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
    method = method_hooks(cfg)
    if not method.TRAINS_BASE:
        with torch.device("meta"):
            skeleton = Transformer(args, config)
        known = beamlora.linear_names(skeleton)
        unknown = [t for t in cfg["targets"].split(",") if t not in known]
        if unknown:
            raise ConfigError(f"--targets: unknown target module(s) {', '.join(unknown)}; the model's linears are: "
                              f"{', '.join(known)}")
        beamlora.apply_lora(skeleton, cfg["targets"].split(","), r=method.rank(cfg), alpha=cfg["alpha"])  # r fits?
    return config, where, args


def load_data(cfg, tok):
    """The tokenized examples, their lengths and loss tokens. The examples are two int lists each, ~800k lists at
    MetaMathQA's size, alive to the end: the cyclic GC would walk them all at every full collection (seconds each;
    while they are built, many times over). So: garbage collected first, no collections while they are built,
    then frozen out of the GC's sight."""
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
    return train_ex, val_ex, lengths, n_targets


# -----------------------------------------------------------------------------
# the method's pieces, the same calls for every method

def wrap(model, cfg):
    """The method's layers: LoRA on the target linears with the method's seams filled in, and DoRA's magnitudes
    with --dora. -> {name: module} ({} for full fine-tuning)"""
    mods = method_hooks(cfg).wrap(model, cfg)
    if cfg["dora"]:
        dora_method.add_magnitudes(mods)
    return mods


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


def build_model(cfg, method, config, ptdtype):
    """The base (from --init_from, or fresh from --model_config) with the method's layers. -> (model, {name: module})
    The frozen base in the training dtype, the trained parameters in fp32 (a base that trains: fp32 too)."""
    base_dtype = torch.float32 if method.TRAINS_BASE else ptdtype
    model = Transformer.from_pretrained(cfg["init_from"], device=cfg["device"], dtype=base_dtype) \
        if cfg["init_from"] else Transformer.from_config(config, device=cfg["device"])
    mods = wrap(model, cfg)
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    model.train()
    return model, mods


def checkpoint(model, optimizer, scaler, controller, step, cfg, prints, pending, states, cuda):
    """ckpt.pt's content: only what trains, the optimizer, the method's own state, the settings and the inputs'
    digests (a resume compares them), the losses of the current log row, and the random state (every process's
    under DDP: `states`, their dropout draws differ)."""
    ck = {"params": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
          "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
          "config": json.dumps(cfg), "fingerprints": {k: digest for k, (_, digest) in prints.items()},
          "log_losses": pending, "rng_cpu": torch.get_rng_state()}
    state = controller.state_dict()
    if state:  # the method's own state (none for LoRA)
        ck["controller"] = state
    if cuda:
        ck["rng_cuda"] = torch.cuda.get_rng_state()
    if states:  # each process's own, for a resume on as many processes
        ck["rng_cpu_ranks"] = [cpu for cpu, _ in states]
        if cuda:
            ck["rng_cuda_ranks"] = [gpu for _, gpu in states]
    return ck


def make_controller(mods, optimizer, cfg, total):
    """What the method does between optimizer steps (a beamlora.Controller; the plain one does nothing)."""
    return method_hooks(cfg).controller(mods, optimizer, cfg, total)


# -----------------------------------------------------------------------------

def train(cfg):
    """Runs one training job; returns a summary dict (losses, held-out loss, wall time, peak memory; "stopped"
    and "signal" when stopped early). Holds out_dir's lock throughout (rank 0 under torchrun)."""
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1)
    # --alpha=0 is 2 r, resolved once here: the checkpoint, the adapter and a --resume see the number
    cfg = dict(cfg, alpha=cfg["alpha"] or 2.0 * cfg["r"])
    # the lock before anything reads the out_dir (check_out_dir): a second run stops here, having touched nothing.
    # Rank 0 only: a run takes it once (the ranks of one run are one run), before any rank can write
    preemption = cluster.Preemption()
    try:
        with rundir.OutDirLock(cfg["out_dir"], take=int(os.environ.get("RANK", 0)) == 0):
            return run_locked(cfg, ddp, preemption)
    finally:
        preemption.disarm()


def run_locked(cfg, ddp, preemption):
    """train() once out_dir is this run's."""
    # every input is read and checked before anything is loaded or written: a bad one costs seconds and no file
    method = method_hooks(cfg)
    config, config_path, args = model_args(cfg)
    tok = Tokenizer(cfg["tokenizer"] or cfg["init_from"])
    if tok.n_words > args.vocab_size:
        raise ConfigError(f"{tok.path}: {tok.n_words} tokens, more than the model's vocab_size ({args.vocab_size})")
    train_ex, val_ex, lengths, n_targets = load_data(cfg, tok)
    plan_epoch, plan = 0, epoch_batches(lengths, 0, cfg["seed"], cfg["batch_size"])
    steps_per_epoch = len(plan)  # the same for every epoch: only the order changes
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg['data']}: {len(train_ex)} examples, fewer than one global batch of "
                          f"{cfg['batch_size']}")
    total = cfg["max_steps"] or cfg["epochs"] * steps_per_epoch
    prints = rundir.fingerprints({"data": cfg["data"], "val_data": cfg["val_data"], "tokenizer": tok.path,
                                  "model config": config_path})
    ck, records = rundir.check_out_dir(cfg, DEFAULTS, MAY_CHANGE_ON_RESUME, prints)  # reads only

    ddp, rank, world = cluster.setup_ddp(cfg)
    master = rank == 0
    dev_type = "cuda" if cfg["device"].startswith("cuda") else "cpu"
    accum = cfg["batch_size"] // (cfg["micro_batch_size"] * world)
    torch.manual_seed(cfg["seed"])  # same on every process: identical initial adapters
    torch.backends.cuda.matmul.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]

    model, mods = build_model(cfg, method, config, ptdtype)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "embed_tokens" not in n)
    optimizer = make_optimizer(params, cfg, fused=dev_type == "cuda")
    scaler = torch.amp.GradScaler(dev_type, enabled=cfg["dtype"] == "float16")
    ctx = torch.autocast(dev_type, dtype=ptdtype, enabled=ptdtype != torch.float32)
    controller = make_controller(mods, optimizer, cfg, total)

    step, ckpt_path = 0, os.path.join(cfg["out_dir"], "ckpt.pt")
    pending = []  # the losses of the steps since the last log row: that row's mean, carried across a resume
    good = None  # (step, path) of the last checkpoint on disk: what a failed write reports as intact
    if ck is not None:  # the trained tensors, optimizer, controller, random state, and the log row's losses so far
        step, pending = rundir.load_state(ck, ckpt_path, model, optimizer, scaler, controller, cuda=dev_type == "cuda",
                                          rank=rank, world=world)
        good = (step, ckpt_path)
    if master:  # every check passed: the first write of this run
        with rundir.writes(cfg["out_dir"], good):
            rundir.start_writing(cfg, records)
        if ck is not None:
            print(f"resumed from {ckpt_path} at step {step}")

    raw_model = model  # the controller, checkpoints and export work on the unwrapped model
    if cfg["compile"]:
        model = torch.compile(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if dev_type == "cuda" else None)
        wrapper = weakref.ref(model)  # end_ddp checks that it is gone before the process group goes
    if cfg["wandb_log"] and master:
        import wandb
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)
    if master:
        print(f"{cfg['method']}: {n_train:,} trained / {n_frozen:,} frozen params, {len(train_ex)} examples, "
              f"{total} steps of {cfg['batch_size']} ({accum} micro-batches of {cfg['micro_batch_size']} x {world} "
              f"processes){controller.describe()}")

    def save_checkpoint():
        """Called by every process at the same steps (under DDP each one's random state is gathered); process 0
        writes. It reads the run's state and changes none of it: when it runs changes no number."""
        nonlocal good
        started = time.time()
        states = cluster.rng_states(world, dev_type == "cuda") if ddp else None
        clock.saved(step, started)
        if not master:
            return
        with rundir.writes(ckpt_path, good):
            rundir.sync_records(cfg["out_dir"])  # the rows this checkpoint covers are on disk before it is
            atomic_save(checkpoint(raw_model, optimizer, scaler, controller, step, cfg, prints, pending, states,
                                   dev_type == "cuda"), ckpt_path)
        good = (step, ckpt_path)
        clock.saved(step, started)

    def record(name, row):
        with rundir.writes(os.path.join(cfg["out_dir"], name), good):
            append_jsonl(os.path.join(cfg["out_dir"], name), row)

    meter = Meter(cfg, n_train, n_frozen, world, total, step)
    clock = cluster.CheckpointClock(cfg, total, step)  # when to checkpoint in the loop
    if master and not meter.peak and dev_type == "cuda":
        print(f"no MFU: no {cfg['dtype']} peak known for {torch.cuda.get_device_name(cfg['device'])}; "
              "give --peak_flops=<FLOP/s of one GPU>")
    preemption.arm()
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:  # the batch plan once per epoch (a resume recomputes its epoch's once)
            plan_epoch, plan = epoch, epoch_batches(lengths, epoch, cfg["seed"], cfg["batch_size"])
        batch = plan[i]
        n_tgt = sum(n_targets[j] for j in batch)  # target tokens of the global batch, all processes
        mine = batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, cfg) * controller.lr_factor(step) * g.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=cfg["device"])
        for k in range(accum):
            micro = mine[k * cfg["micro_batch_size"]:(k + 1) * cfg["micro_batch_size"]]
            x, y = collate(train_ex, micro, cfg["device"])
            if ddp:  # sync gradients only on the last micro-batch
                model.require_backward_grad_sync = k == accum - 1
            with ctx:  # the summed loss over the micro-batch; the full logits are never held (model.lm_loss)
                loss = model(x, targets=y)
            # normalise by the target tokens of the whole global batch; DDP averages over processes, so x world
            obj = loss * world / n_tgt
            penalty = controller.penalty() if k == 0 else None  # the method's own term, once per step
            if penalty is not None:
                obj = obj + penalty
            scaler.scale(obj).backward()
            loss_sum += loss.detach()
            meter.tokens += sum(lengths[j] for j in micro)
        if cfg["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        step += 1
        event = controller.step(step)  # before zero_grad: some methods read the gradients
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum)
        pending.append(loss_sum.item() / n_tgt)
        meter.losses.append(pending[-1])

        # records: rows of this step, appended before any checkpoint of it (a resume cuts them back to its step)
        if event and master:
            print(f"step {step}: {event.get('note', event.get('kind', 'event'))}")
            record("events.jsonl", event)
        if master and cfg["score_log_interval"] and (step % cfg["score_log_interval"] == 0 or step == 1):
            imp = {n: {k: v.tolist() for k, v in d.items()} for n, d in beamlora.rank_importance(raw_model).items()}
            record("scores.jsonl", {"step": step, "modules": imp})
        if master and (step % cfg["log_interval"] == 0 or step == total):
            row = meter.log(step, pending, optimizer.param_groups[0]["lr"], controller.log(step))
            record("log.jsonl", row)
            if cfg["wandb_log"]:
                wandb.log(row)
            pending = []
        if val_ex and cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and master:
            print(f"step {step}: held-out loss {heldout_loss(raw_model, val_ex, cfg, ctx):.4f}")
        # every process: the same answers at the same step
        signum, save = preemption.agreed(ddp, cfg["device"], master and clock.due(step))
        if save:
            save_checkpoint()
        if not ddp:  # a signal during that save stops the run now (under DDP: the ranks agree after the next step)
            signum = preemption.signum
        stop_after = cfg["stop_after"] and step - meter.start_step >= cfg["stop_after"]
        stop = (signum or stop_after) and step < total
        if stop and clock.step != step:
            save_checkpoint()
        if stop:
            if master:
                why = f"by {signal.Signals(signum).name}" if signum else "(--stop_after)"
                print(f"stopped {why} after step {step}: {ckpt_path} holds it and its records; --resume continues",
                      flush=True)
                if cfg["wandb_log"]:
                    wandb.finish()  # under torchrun the process ends without atexit handlers (exit_at_once)
            if ddp:
                model = None  # the DDP wrapper: gone before the process group (cluster.end_ddp)
                cluster.end_ddp(wrapper)
            return {"losses": meter.losses, "steps": step, "stopped": True, "signal": signum}

    if ddp:  # the methods decide without communicating: check once that every process holds the same weights
        cluster.check_replicas(params, rank)
    result = {"losses": meter.losses, "steps": total, "wall_s": time.time() - meter.t_start,
              "peak_mem_gib": peak_memory_gib(dev_type)}
    save_checkpoint()
    if master:
        if preemption.signum:
            print(f"{signal.Signals(preemption.signum).name} after the last step: the run finishes ({ckpt_path} is "
                  "its final checkpoint; a kill during the export: --resume redoes only the export)", flush=True)
        with rundir.writes(cfg["out_dir"], good):
            for name, obj in controller.final().items():  # the method's own records (LR-LoRA: ranks.json)
                atomic_json(obj, os.path.join(cfg["out_dir"], name))
            method.export(raw_model, controller, cfg, tok.path)
        if val_ex:
            result["val_loss"] = heldout_loss(raw_model, val_ex, cfg, ctx)
            print(f"held-out loss {result['val_loss']:.4f}")
        if cfg["wandb_log"]:
            wandb.finish()  # under torchrun the process ends without atexit handlers (exit_at_once)
    if ddp:
        model = None
        cluster.end_ddp(wrapper)
    return result


def run(**overrides):
    """train() with this file's defaults for every setting not given: what demo.py is handed."""
    return train(dict(DEFAULTS, **overrides))


def main(argv):
    if not argv:  # no arguments: the offline demo, which calls back through `run` (it imports nothing of train.py)
        import demo
        return demo.main([], run)
    result = train(parse_args(argv, DEFAULTS, DOC_FILES))
    if result.get("signal"):  # stopped by SIGTERM / SIGUSR1: 143 / 138, as a shell reports a process they end
        sys.exit(128 + result["signal"])
    return result


if __name__ == "__main__":
    cluster.script(main)  # bad input: one line; under torchrun the process ends at once when the run is done
