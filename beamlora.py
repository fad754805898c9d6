"""
The LoRA layer every method here shares, and BeamLoRA on it: LoRA whose ranks are scored, and every
dt steps the weakest ranks are pruned and refilled with copies of the strongest (arXiv 2502.13604).
The algorithm, step by step, is in docs/BEAMLORA.md; the section numbers below refer to it.

    LoRALinear      the layer: y = W0 x + scaling * B(s * (A dropout(x))), with seams for the other methods
    Score           BeamLoRA's gate, s = r softmax(g / tau) (section 1); add_scores puts one on each module
    apply_lora      wrap a model's target linears by name
    select_ranks    dynamic top-p: which ranks of which module to prune (section 3)
    BeamController  the schedule (section 2), prune/expand (section 4), the ablations (section 5)
    export_peft     s folded into A, saved as a PEFT LoRA adapter (rank_pattern where ranks differ);
                    merge_lora; load_adapter
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

import dora
from model import load_safetensors, save_safetensors

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = W0 x + scaling * B (s * (A dropout(x))).

    The other methods of the comparison fill in three seams of this one layer, each in its own file:
      gate                   a small module whose forward() gives the per-rank scale s (r,) between B and A:
                             BeamLoRA's Score below, LR-LoRA's rank mask, AdaLoRA's singular values; None: s = 1
      lora_A, lora_B, W0     an initialisation may rewrite them after construction (PiSSA, MiLoRA: pissa.py)
      lora_magnitude_vector  DoRA's magnitude m (out,), which rescales each output row (dora.py; None: plain LoRA)
    Export and merge only need folded_A(): whatever s there is goes into A.
    """

    def __init__(self, base, r, alpha, dropout=0.0, rslora=False, dtype=torch.float32):
        super().__init__()
        # take over the base's own tensors so the key stays "...q_proj.weight" as in the checkpoint
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's scale stable as r grows
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout_p = dropout
        dev = self.weight.device
        # PEFT's shapes and init: A (r, in) kaiming-uniform(a=sqrt 5), B (out, r) zeros, so W starts at W0
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.gate = None
        self.lora_magnitude_vector = None
        # PiSSA / MiLoRA (pissa.py) move part of W0 into A, B; their initial values (cpu, fp32) let
        # export write an adapter for the original W0
        self.lora_A0 = self.lora_B0 = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def rank_scale(self):
        """The per-rank scale s (r,) of the gate, or None for plain LoRA."""
        return None if self.gate is None else self.gate()

    def forward(self, x):
        xd = self.dropout(x)  # the same tensor as x when there is no dropout (or in eval)
        h = F.linear(xd.to(self.lora_A.dtype), self.lora_A)  # (..., r)
        # scaling (and the gate's s) multiply the r-wide h rather than the out-wide B h: same result, cheaper
        s = self.rank_scale()
        h = h * (self.scaling if s is None else self.scaling * s)
        lora = F.linear(h, self.lora_B)  # (..., out)
        if self.lora_magnitude_vector is not None:  # DoRA rescales each output row (dora.py)
            return dora.forward(self, x, xd, lora)
        y = F.linear(x, self.weight, self.bias)
        return y + lora.to(y.dtype)

    def folded_A(self):
        """A' = diag(s) A: the plain-LoRA A that gives this layer's output (section 1)."""
        s = self.rank_scale()
        return self.lora_A if s is None else self.lora_A * s[:, None]

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, rslora={self.rslora}"


class Score(nn.Module):
    """BeamLoRA's gate (section 1): s = r * softmax(g / tau), sums to r. g starts at zero, so s = 1 for
    every rank and the layer is plain LoRA at step 0; the softmax runs in fp32."""

    def __init__(self, r, tau, dtype=torch.float32, device=None):
        super().__init__()
        self.tau = tau
        self.g = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))

    def forward(self):
        return len(self.g) * torch.softmax(self.g.float() / self.tau, dim=0).to(self.g.dtype)

    def extra_repr(self):
        return f"r={len(self.g)}, tau={self.tau}"


def linear_names(model):
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))})


def apply_lora(model, targets, r, alpha, dropout=0.0, rslora=False, dtype=torch.float32):
    """Freeze the model and wrap every linear whose last name is in targets. Returns {name: LoRALinear}."""
    targets = list(targets)
    known = linear_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"unknown target module(s) {', '.join(unknown)}; the model's linears are: {', '.join(known)}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            if not 0 < r <= min(mod.in_features, mod.out_features):
                raise ValueError(f"r={r} does not fit {name} ({mod.in_features} -> {mod.out_features}): "
                                 f"it must be between 1 and {min(mod.in_features, mod.out_features)}")
            wrapped[name] = LoRALinear(mod, r, alpha, dropout, rslora, dtype)
    for name, lora in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lora)
    return wrapped


def add_scores(modules, tau):
    """Make LoRA modules BeamLoRA modules: a Score gate (fp32, like the adapters) on each."""
    for m in modules.values():
        m.gate = Score(m.r, tau, dtype=m.lora_A.dtype, device=m.lora_A.device)
    return modules


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------------------------
# which ranks (section 3)

def threshold(t, p_init, end_step, static=False):
    """p(t): cosine from p_init at t = 0 to 1 at end_step, then 1. Static: p_init throughout."""
    if static:
        return p_init
    if t >= end_step:
        return 1.0
    return p_init + (1 - p_init) * (1 - math.cos(math.pi * t / end_step)) / 2


def order_desc(s):
    """Indices of s by descending score; ties keep index order (stable), so every process agrees."""
    return torch.sort(s.double(), descending=True, stable=True).indices


def to_cpu(tensors):
    """{name: tensor} -> {name: float64 cpu tensor} in one transfer: one device sync for all modules
    (224 at 7B), not one per module."""
    names = list(tensors)
    flat = torch.cat([tensors[n].detach().flatten() for n in names]).double().cpu()
    return dict(zip(names, flat.split([tensors[n].numel() for n in names])))


def select_ranks(scores, p, scope="global"):
    """How many ranks K_m to prune in each module. scores: {name: s (r,)}.

    Sort the scores (all modules together for "global", each module alone for "module"),
    take the cumulative sum; the first position where it exceeds p * mass, and every
    position after it, is pruned. K_m is capped at r // 2 so that the sources (the K_m
    best ranks) are never among the pruned.
    """
    names = list(scores)
    if p >= 1 or not names:
        return {n: 0 for n in names}
    cpu = to_cpu(scores)
    groups = [names] if scope == "global" else [[n] for n in names]
    k = {n: 0 for n in names}
    for group in groups:
        s = torch.cat([cpu[n] for n in group])
        owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(group)])
        order = order_desc(s)
        csum = torch.cumsum(s[order], 0)
        cut = int(torch.searchsorted(csum, p * s.sum(), right=True))  # first position with csum > p * mass
        for i in owner[order[cut:]].tolist():
            k[group[i]] += 1
    return {n: min(k[n], len(scores[n]) // 2) for n in names}


# ----------------------------------------------------------------------------------------------
# the schedule, prune and expand (sections 2, 4, 5)

class BeamController:
    """Call step(t) after optimizer step t (t = 1 .. total_steps). It snapshots the adapters at
    t % dt == dt/2 and prunes/expands at t % dt == 0. Every decision depends only on the
    (replicated) parameters and a seeded generator, so all data-parallel processes agree
    without communicating."""

    def __init__(self, modules, optimizer, dt, p_init, end_step, total_steps, scope="global",
                 no_expand=False, random_assess=False, static_p=False, no_history=False, inherit_moments="history",
                 seed=0):
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(f"BeamLoRA rewrites AdamW's exp_avg/exp_avg_sq; {type(optimizer).__name__} has none")
        if not modules or any(not isinstance(m.gate, Score) for m in modules.values()):
            raise ValueError("BeamController needs LoRALinear modules with a Score gate (add_scores)")
        if dt < 2:
            raise ValueError(f"dt={dt}: the interval must be at least 2 (a snapshot half way between operations)")
        if not 0 < p_init < 1:
            raise ValueError(f"p_init={p_init}: must be in (0, 1)")
        if scope not in ("global", "module"):
            raise ValueError(f"scope={scope!r}: must be 'global' or 'module'")
        if inherit_moments not in ("history", "keep"):
            raise ValueError(f"inherit_moments={inherit_moments!r}: must be 'history' or 'keep'")
        self.modules, self.opt = dict(modules), optimizer
        self.dt, self.p_init, self.end_step, self.total = dt, p_init, end_step, total_steps
        self.scope, self.no_expand, self.random_assess = scope, no_expand, random_assess
        self.static_p, self.no_history, self.inherit_moments = static_p, no_history, inherit_moments
        self.gen = torch.Generator().manual_seed(seed)  # pairings and random assessment; on the cpu
        self.snapshot = None  # {name: {"A", "B", "A_m1", "A_m2", "B_m1", "B_m2"}}
        self.snapshot_step = None

    def threshold(self, t):
        return threshold(t, self.p_init, self.end_step, self.static_p)

    def operates(self, t):
        return t > 0 and t % self.dt == 0 and self.total - t >= self.dt and self.threshold(t) < 1

    def snapshots(self, t):
        # only the snapshots an operation will use: the one dt/2 before each operation
        half = self.dt // 2
        return not self.no_history and t % self.dt == half and self.operates(t - half + self.dt)

    def step(self, t):
        """Do what the schedule says after optimizer step t. Returns the operation's event or None."""
        if self.snapshots(t):
            self.snapshot = None  # free the old one first: a snapshot is as large as the adapters and their moments
            self.snapshot = self.take_snapshot()
            self.snapshot_step = t
        if not self.operates(t):
            return None
        event = self.operate(t)
        self.snapshot = None  # used once; the next operation takes its own (and checkpoints stay small)
        return event

    def moments(self, p):
        st = self.opt.state.get(p, {})
        if "exp_avg" not in st or "exp_avg_sq" not in st:
            raise ValueError("BeamLoRA needs AdamW state (exp_avg, exp_avg_sq) for every adapter parameter; "
                             "call the controller after optimizer.step()")
        return st["exp_avg"], st["exp_avg_sq"]

    @torch.no_grad()
    def take_snapshot(self):
        # A, B and their moments. g needs no history: the operation averages the current logits.
        snap = {}
        for name, m in self.modules.items():
            a1, a2 = self.moments(m.lora_A)
            b1, b2 = self.moments(m.lora_B)
            snap[name] = {"A": m.lora_A.detach().clone(), "B": m.lora_B.detach().clone(),
                          "A_m1": a1.clone(), "A_m2": a2.clone(), "B_m1": b1.clone(), "B_m2": b2.clone()}
        return snap

    @torch.no_grad()
    def operate(self, t):
        p = self.threshold(t)
        scores = to_cpu({n: m.rank_scale() for n, m in self.modules.items()})
        ks = select_ranks(scores, p, self.scope)
        hist = self.take_snapshot() if self.no_history else self.snapshot
        if hist is None:
            raise ValueError(f"step {t}: no snapshot to copy from (a snapshot is taken at t % dt == dt/2)")
        event = {"step": t, "kind": "prune_expand", "p": p, "modules": {}}
        for name, m in self.modules.items():  # fixed order: the generator draws the same on every process
            k = ks[name]
            if k == 0:
                continue
            r = m.r
            if self.random_assess:  # ablation: same K_m, but P and E drawn at random (disjoint)
                perm = torch.randperm(r, generator=self.gen)
                pruned, sources = perm[:k], perm[k:2 * k]
            else:
                order = order_desc(scores[name])
                pruned = order[r - k:]  # the K_m lowest scores
                sources = order[:k][torch.randperm(k, generator=self.gen)]  # the K_m highest, randomly paired
            event["modules"][name] = {"pruned": pruned.tolist(), "sources": sources.tolist(),
                                      "scores": scores[name].tolist()}
            self.prune_expand(m, pruned.to(m.lora_A.device), sources.to(m.lora_A.device), hist[name])
        if self.inherit_moments == "keep":  # the authors' code zeroes the score moments of every module
            for m in self.modules.values():
                for x in self.moments(m.gate.g):
                    x.zero_()
        n = sum(len(d["pruned"]) for d in event["modules"].values())
        event["note"] = f"prune/expand at p={p:.4f}: {n} ranks in {len(event['modules'])} modules re-initialised from their sources"
        return event

    def log(self, t):
        return {"p": self.threshold(t)}

    def prune_expand(self, m, P, E, h):
        """Section 4 on one module: rank P[j] becomes the historical copy of rank E[j].
        inherit_moments="keep" does what the authors' code executes rather than what the paper says:
        their `state["exp_avg"][mask, :].copy_(...)` writes into the copy that boolean indexing makes,
        so the pruned ranks keep their own AdamW moments (docs/BEAMLORA.md, section 4)."""
        A, B, g = m.lora_A, m.lora_B, m.gate.g
        a1, a2 = self.moments(A)
        b1, b2 = self.moments(B)
        if self.no_expand:  # ablation: the pruned ranks are zeroed (and stay dead: their gradients are 0)
            for x in (A, a1, a2):
                x[P] = 0
            for x in (B, b1, b2):
                x[:, P] = 0
            return
        A[P], B[:, P] = h["A"][E], h["B"][:, E]
        if self.inherit_moments == "history":
            a1[P], a2[P] = h["A_m1"][E], h["A_m2"][E]
            b1[:, P], b2[:, P] = h["B_m1"][:, E], h["B_m2"][:, E]
        avg = (g[P] + g[E]) / 2  # the copy and its source start from equal scores
        g[P], g[E] = avg, avg
        for x in self.moments(g):  # the score distribution changed: its momentum is stale
            x.zero_()

    def state_dict(self):
        return {"gen": self.gen.get_state(), "snapshot": self.snapshot, "snapshot_step": self.snapshot_step,
                "config": {"dt": self.dt, "p_init": self.p_init, "end_step": self.end_step, "total": self.total,
                           "scope": self.scope, "inherit_moments": self.inherit_moments}}

    def load_state_dict(self, state):
        mine = self.state_dict()["config"]
        if state["config"] != mine:
            raise ValueError(f"beam schedule of the checkpoint {state['config']} differs from this run's {mine}")
        self.gen.set_state(state["gen"])
        self.snapshot_step = state["snapshot_step"]
        self.snapshot = None
        if state["snapshot"] is not None:
            self.snapshot = {n: {k: v.to(self.modules[n].lora_A.device) for k, v in d.items()}
                             for n, d in state["snapshot"].items()}


# ----------------------------------------------------------------------------------------------
# analysis and export

@torch.no_grad()
@torch.no_grad()  # a record, not a step: a gate's deterministic form (LR-LoRA: its learned rank, not a sample)
def rank_importance(model):
    """Per module: "score" s (r,) (ones for plain LoRA), and "norm" ||s_i b_i a_i||_F (r,), the
    Frobenius norm of each rank's update (the paper's offline measure), = s_i ||b_i|| ||a_i||."""
    out = {}
    for name, m in lora_modules(model).items():
        s = m.rank_scale()
        s = torch.ones(m.r, device=m.lora_A.device) if s is None else s.float()
        norm = s * m.lora_B.float().norm(dim=0) * m.lora_A.float().norm(dim=1)
        out[name] = {"score": s.cpu(), "norm": norm.cpu()}
    return out


def peft_key(name, which):
    return f"base_model.model.{name}.{which}.weight"


def atomic_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def peft_scaling(alpha, r, rslora):
    return alpha / math.sqrt(r) if rslora else alpha / r


@torch.no_grad()
def peft_factors(m, rank=None, alpha=None):
    """(A (k, in), B (out, k)) fp32: the plain LoRA this layer equals under PEFT's scaling for rank k
    and `alpha` (default: the layer's), applied to the original W0.
    The gate's s is folded into A; ranks whose s is exactly 0 (pruned by LR-LoRA, AdaLoRA, ...) are
    dropped; `rank` pads with zero ranks to that uniform rank instead. PiSSA / MiLoRA trained
    W0 - scaling B0 A0 + scaling B A: for the original W0 that is [B, -B0] [A; A0] (2r ranks, as PEFT
    converts them). PEFT scales by alpha / k, so A also carries our scaling / PEFT's where they differ."""
    A, B = m.folded_A().float(), m.lora_B.float()
    s = m.rank_scale()
    if s is not None and bool((s == 0).any()):
        keep = (s != 0).nonzero().flatten()
        A, B = A[keep], B[:, keep]
    if m.lora_A0 is not None:
        A = torch.cat([A, m.lora_A0.to(A)])
        B = torch.cat([B, -m.lora_B0.to(B)], dim=1)
    k = max(1, len(A)) if rank is None else rank
    if k < len(A):
        raise ValueError(f"rank={rank}: the adapter has a module with {len(A)} ranks")
    if k > len(A):  # zero ranks add nothing: a module that kept none still has the shape PEFT expects
        A = torch.cat([A, A.new_zeros(k - len(A), A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], k - B.shape[1])], dim=1)
    ratio = m.scaling / peft_scaling(m.alpha if alpha is None else alpha, k, m.rslora)
    if ratio != 1:
        A = A * ratio
    return A.cpu().contiguous(), B.cpu().contiguous()


@torch.no_grad()
def export_peft(model, out_dir, base_model_name_or_path=None, uniform_rank=0):
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for the original base
    checkpoint, s folded into A. Modules that end with different ranks get PEFT's rank_pattern;
    uniform_rank > 0 pads every module to that rank with zero ranks instead (for servers that need one
    rank, e.g. vLLM). DoRA: PEFT's DoRA format (use_dora, `...lora_magnitude_vector` tensors).
    PiSSA / MiLoRA: a plain LoRA of rank 2r with alpha doubled (x sqrt 2 under rsLoRA), which keeps
    the scaling, as PEFT's own conversion writes it."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules to export")
    first = next(iter(mods.values()))
    kinds = {(m.alpha, m.rslora, m.dropout_p, m.lora_magnitude_vector is None, m.lora_A0 is None) for m in mods.values()}
    if len(kinds) > 1:
        raise ValueError("export_peft: the LoRA modules differ in alpha, rslora, dropout, DoRA or PiSSA")
    alpha = first.alpha if first.lora_A0 is None else first.alpha * (math.sqrt(2) if first.rslora else 2)
    os.makedirs(out_dir, exist_ok=True)
    tensors, ranks = {}, {}
    for name, m in mods.items():
        A, B = peft_factors(m, uniform_rank or None, alpha)
        tensors[peft_key(name, "lora_A")], tensors[peft_key(name, "lora_B")] = A, B
        if m.lora_magnitude_vector is not None:  # PEFT's file key has no ".weight"
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().float().cpu()
        ranks[name] = len(A)
    save_safetensors(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    r = max(ranks.values())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "rank_pattern": {n: k for n, k in ranks.items() if k != r},
              "lora_dropout": first.dropout_p, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": first.rslora,
              "use_dora": first.lora_magnitude_vector is not None,
              "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": str(base_model_name_or_path) if base_model_name_or_path else None}
    atomic_json(config, os.path.join(out_dir, "adapter_config.json"))


@torch.no_grad()
def merge_lora(model):
    """W = W0 + scaling * B A' (DoRA: then m / ||W||_row * W) into each wrapped linear, which becomes a
    plain nn.Linear again."""
    for name, m in lora_modules(model).items():
        w = torch.addmm(m.weight.float(), m.lora_B.float(), m.folded_A().float(), alpha=m.scaling)  # (out, in)
        if m.lora_magnitude_vector is not None:
            w = dora.merged_weight(m, w)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.to(m.weight.dtype), requires_grad=False)
        if m.bias is not None:
            lin.bias = m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, lin)
    return model


def pattern_value(pattern, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter(model, adapter_dir, dtype=torch.float32):
    """Load a PEFT-format LoRA or DoRA adapter (ours or any from elsewhere) onto our model, unmerged."""
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    st_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{cfg_path}: not found; an adapter directory has adapter_config.json")
    if not os.path.isfile(st_path):
        hint = " (adapter_model.bin is a pickle: convert it to safetensors)" if os.path.isfile(
            os.path.join(adapter_dir, "adapter_model.bin")) else ""
        raise ValueError(f"{st_path}: not found{hint}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: only LoRA adapters are supported (peft_type LORA, with or without DoRA)")
    use_dora = bool(cfg.get("use_dora"))
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise ValueError(f"{cfg_path}: {key!r} must be a positive number, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):  # {module name pattern: number}, read by pattern_value
        pattern = cfg.get(key) or {}
        try:
            ok = isinstance(pattern, dict) and all(re.compile(k) and isinstance(v, (int, float)) and
                                                   not isinstance(v, bool) and v > 0 for k, v in pattern.items())
        except re.error:
            ok = False
        if not ok:
            raise ValueError(f"{cfg_path}: {key!r} must map module name patterns to positive numbers, got {pattern!r}")
    tensors = load_safetensors(st_path)
    if not tensors:
        raise ValueError(f"{st_path}: no tensors")
    # keys: base_model.model.<module>.lora_A.weight (PEFT may also write ".default" before ".weight");
    # DoRA adds base_model.model.<module>.lora_magnitude_vector (older PEFT: ...lora_magnitude_vector.weight)
    pat = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(\.weight)?$")
    found = {}
    for key, t in tensors.items():
        mt = pat.match(key)
        magnitude = bool(mt) and mt.group(2) == "lora_magnitude_vector"
        if not mt or (magnitude and not use_dora) or (not magnitude and not mt.group(3)):
            raise ValueError(f"{st_path}: unexpected tensor {key} (only lora_A / lora_B weights"
                             + (" and lora_magnitude_vector" if use_dora else "") + " are supported)")
        found.setdefault(mt.group(1), {})[mt.group(2)] = t
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    want = {"lora_A", "lora_B", "lora_magnitude_vector"} if use_dora else {"lora_A", "lora_B"}
    shapes = {}
    for name, ab in found.items():
        if name not in linears or set(ab) != want:
            raise ValueError(f"{st_path}: {name} is not a linear of this model or lacks one of {', '.join(sorted(want))}")
        if use_dora and ab["lora_magnitude_vector"].shape != (linears[name].out_features,):
            raise ValueError(f"{st_path}: {name}.lora_magnitude_vector has shape {tuple(ab['lora_magnitude_vector'].shape)}, "
                             f"expected ({linears[name].out_features},)")
        base, r = linears[name], int(pattern_value(cfg.get("rank_pattern"), name, cfg["r"]))
        if ab["lora_A"].shape != (r, base.in_features) or ab["lora_B"].shape != (base.out_features, r):
            raise ValueError(f"{st_path}: {name} has shapes {tuple(ab['lora_A'].shape)}, {tuple(ab['lora_B'].shape)}; "
                             f"expected ({r}, {base.in_features}), ({base.out_features}, {r})")
        shapes[name] = r
    for p in model.parameters():
        p.requires_grad_(False)
    for name, ab in found.items():
        alpha = float(pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
        m = LoRALinear(linears[name], shapes[name], alpha, rslora=bool(cfg.get("use_rslora")), dtype=dtype)
        m.lora_A.data.copy_(ab["lora_A"])
        m.lora_B.data.copy_(ab["lora_B"])
        m.lora_A.requires_grad_(False)
        m.lora_B.requires_grad_(False)
        if use_dora:
            m.lora_magnitude_vector = nn.Parameter(ab["lora_magnitude_vector"].to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m)
    return model
