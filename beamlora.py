"""
The LoRA layer every method shares, the Controller every method's between-steps object shares, and BeamLoRA on
them: LoRA whose ranks are scored, and every dt steps the weakest ranks are pruned and refilled with copies of the
strongest (arXiv 2502.13604). The algorithm, step by step, is in docs/BEAMLORA.md; the section numbers below refer
to it. A method module's shape (settings, wrap, controller, properties) is in lora.py.

    LoRALinear      the layer: y = W0 x + scaling * B(s * (A dropout(x))), with seams for the other methods
    apply_lora      wrap a model's target linears by name; lora_layers: the same from train.py's settings
    Controller      what the loop calls between steps (nothing, here), and what every method's controller needs:
                    due (is t an operation step), moments (a parameter's AdamW moments), event, state for resume
    Score           BeamLoRA's gate, s = r softmax(g / tau) (section 1)
    select_ranks    dynamic top-p: which ranks of which module to prune (section 3)
    BeamController  the schedule (section 2), prune/expand (section 4), the ablations (section 5)
    check, wrap, controller   --method=beamlora (lora.py lists the hooks); add_scores puts a Score on each module
    rank_importance each rank's score and update norm (scores.jsonl, the figures)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import dora
from configurator import ConfigError, check_choice, check_range

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# -----------------------------------------------------------------------------
# BeamLoRA (--method=beamlora; docs/BEAMLORA.md)
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
# -----------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = W0 x + scaling * B (s * (A dropout(x))).

    The other methods of the comparison fill in seams of this one layer, each in its own file:
      gate                   a small module whose forward() gives the per-rank scale s (r,) between B and A:
                             BeamLoRA's Score below, LR-LoRA's rank mask, AdaLoRA's singular values; None: s = 1
      lora_A, lora_B, W0     an initialisation may rewrite them after construction (PiSSA, MiLoRA: pissa.py)
      lora_A0, lora_B0       what such an initialisation took out of W0 (fp32, cpu): export writes the adapter for
                             the original W0 as [B, -B0] [A; A0] (peft_io.peft_factors); None: W0 is the original
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
        self.scaling = lora_scaling(alpha, r, rslora)
        self.dropout_p = dropout
        dev = self.weight.device
        # PEFT's shapes and init: A (r, in) kaiming-uniform(a=sqrt 5), B (out, r) zeros, so W starts at W0
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.gate = None
        self.lora_magnitude_vector = None
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


def lora_scaling(alpha, r, rslora=False):
    return alpha / math.sqrt(r) if rslora else alpha / r  # LoRA's alpha / r; rsLoRA's alpha / sqrt(r)


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


def lora_layers(model, cfg, r):
    """apply_lora with train.py's settings (--targets, --alpha, --dropout, --rslora) and r ranks; adapters in fp32."""
    return apply_lora(model, cfg["targets"].split(","), r=r, alpha=cfg["alpha"], dropout=cfg["dropout"],
                      rslora=cfg["rslora"], dtype=torch.float32)


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ----------------------------------------------------------------------------------------------
# what every method's controller shares

def due(t, every, after=0, before=math.inf):
    """Is optimizer step t an operation step: a multiple of `every`, after step `after`, before step `before`."""
    return after < t < before and t % every == 0


def adam_moments(optimizer, p, required=True):
    """[exp_avg, exp_avg_sq] of parameter p, the tensors themselves (write them in place). Before AdamW's first
    step on p there are none: [] , or an error if `required`."""
    st = optimizer.state.get(p, {})
    if "exp_avg" in st and "exp_avg_sq" in st:
        return [st["exp_avg"], st["exp_avg_sq"]]
    if required:
        raise ValueError("this method needs AdamW state (exp_avg, exp_avg_sq) for every adapter parameter; "
                         "call the controller after optimizer.step()")
    return [st[k] for k in ("exp_avg", "exp_avg_sq") if k in st]


def event(t, kind, note, **fields):
    """One line of events.jsonl: step, kind, the method's fields, and a note for the console."""
    return {"step": t, "kind": kind, **fields, "note": note}


class Controller:
    """What train.py calls between optimizer steps, the same for every method; this one does nothing (LoRA, DoRA,
    full fine-tuning). A method's controller overrides what it needs:
        step(t)        after optimizer step t, gradients still in place (before zero_grad) -> an event or None
        penalty()      a term added to the loss once per optimizer step, or None
        lr_factor(t)   a factor on the schedule's learning rate of step t + 1
        log(t)         extra fields for the log line; describe(): a few words for the run's first line
        final()        {file name: JSON object}, written to out_dir at the end
        config()       the schedule a resume must match; `state` names the attributes saved in ckpt.pt beside it
    Every decision must depend only on replicated values and seeded generators (or all-reduced ones), so that
    data-parallel processes agree."""
    name = "controller"  # in error messages
    state = ()  # attributes in ckpt.pt; a torch.Generator is saved as its state
    adam = False  # rewrites AdamW's moments: refuses another optimizer

    def __init__(self, modules=(), optimizer=None):
        if self.adam and not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(f"{self.name} rewrites AdamW's exp_avg/exp_avg_sq; {type(optimizer).__name__} has none")
        self.modules, self.opt = dict(modules), optimizer

    def step(self, t):
        return None

    def penalty(self):
        return None

    def lr_factor(self, t):
        return 1.0

    def log(self, t):
        return {}

    def final(self):
        return {}

    def config(self):
        return {}

    def describe(self):
        return ""  # appended to the run's first line (BeamLoRA: its dt)

    def moments(self, p, required=True):
        return adam_moments(self.opt, p, required)

    def to_device(self, x):
        """Tensors in dicts and lists, as a checkpoint gives them (on the cpu), on the adapters' device."""
        dev = next(iter(self.modules.values())).lora_A.device
        if isinstance(x, dict):
            return {k: self.to_device(v) for k, v in x.items()}
        if isinstance(x, list):
            return [self.to_device(v) for v in x]
        return x.to(dev) if isinstance(x, torch.Tensor) else x

    def state_dict(self):
        out = {"config": self.config()} if self.config() else {}  # {}: nothing to save (LoRA, full)
        for k in self.state:
            v = getattr(self, k)
            out[k] = v.get_state() if isinstance(v, torch.Generator) else v
        return out

    def load_state_dict(self, state):
        """The checkpoint's state; its schedule must be this run's. Tensors come as saved (on the cpu)."""
        if state.get("config", {}) != self.config():
            raise ValueError(f"{self.name}: the schedule of the checkpoint {state.get('config')} differs from this "
                             f"run's {self.config()}")
        for k in self.state:
            v = getattr(self, k)
            if isinstance(v, torch.Generator):
                v.set_state(state[k])
            else:
                setattr(self, k, state[k])


# ----------------------------------------------------------------------------------------------
# BeamLoRA: the score (section 1)

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


def add_scores(modules, tau):
    """Make LoRA modules BeamLoRA modules: a Score gate (fp32, like the adapters) on each."""
    for m in modules.values():
        m.gate = Score(m.r, tau, dtype=m.lora_A.dtype, device=m.lora_A.device)
    return modules


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

class BeamController(Controller):
    """Snapshots the adapters at t % dt == dt/2 and prunes/expands at t % dt == 0. Every decision depends only on
    the (replicated) parameters and a seeded generator, so all data-parallel processes agree without
    communicating."""
    name, adam = "BeamLoRA", True
    state = ("gen", "snapshot", "snapshot_step")

    def __init__(self, modules, optimizer, dt, p_init, end_step, total_steps, scope="global",
                 no_expand=False, random_assess=False, static_p=False, no_history=False, inherit_moments="history",
                 seed=0):
        super().__init__(modules, optimizer)
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
        self.dt, self.p_init, self.end_step, self.total = dt, p_init, end_step, total_steps
        self.scope, self.no_expand, self.random_assess = scope, no_expand, random_assess
        self.static_p, self.no_history, self.inherit_moments = static_p, no_history, inherit_moments
        self.gen = torch.Generator().manual_seed(seed)  # pairings and random assessment; on the cpu
        self.snapshot = None  # {name: {"A", "B", "A_m1", "A_m2", "B_m1", "B_m2"}}
        self.snapshot_step = None

    def threshold(self, t):
        return threshold(t, self.p_init, self.end_step, self.static_p)

    def operates(self, t):
        # an operation needs dt steps after it to train the copies, and p < 1
        return due(t, self.dt, before=self.total - self.dt + 1) and self.threshold(t) < 1

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
        ev = self.operate(t)
        self.snapshot = None  # used once; the next operation takes its own (and checkpoints stay small)
        return ev

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
        changed = {}
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
            changed[name] = {"pruned": pruned.tolist(), "sources": sources.tolist(), "scores": scores[name].tolist()}
            self.prune_expand(m, pruned.to(m.lora_A.device), sources.to(m.lora_A.device), hist[name])
        if self.inherit_moments == "keep":  # the authors' code zeroes the score moments of every module
            for m in self.modules.values():
                for x in self.moments(m.gate.g):
                    x.zero_()
        n = sum(len(d["pruned"]) for d in changed.values())
        return event(t, "prune_expand", f"prune/expand at p={p:.4f}: {n} ranks in {len(changed)} modules "
                     "re-initialised from their sources", p=p, modules=changed)

    def log(self, t):
        return {"p": self.threshold(t)}

    def describe(self):
        return f", dt={self.dt}"

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

    def config(self):
        return {"dt": self.dt, "p_init": self.p_init, "end_step": self.end_step, "total": self.total,
                "scope": self.scope, "inherit_moments": self.inherit_moments}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.snapshot = self.to_device(self.snapshot)


# ----------------------------------------------------------------------------------------------
# the method (lora.py lists the hooks)

def check(cfg):
    """BeamLoRA's settings, before anything is loaded."""
    check_range(cfg, "positive", "tau")
    check_range(cfg, "0 or more", "dt", "end_step")
    check_range(cfg, "in (0, 1)", "p_init")
    check_choice(cfg, "scope", ("global", "module"))
    check_choice(cfg, "inherit_moments", ("history", "keep"))
    if cfg["dt"] and (cfg["dt"] < 2 or cfg["dt"] % 2):
        raise ConfigError(f"--dt={cfg['dt']}: must be an even number >= 2 (a snapshot is taken at dt/2)")


def wrap(model, cfg):
    return add_scores(lora_layers(model, cfg, cfg["r"]), cfg["tau"])


def controller(mods, optimizer, cfg, total):
    """dt defaults to a twelfth of the run (even: a snapshot at dt/2), end_step to two thirds of it."""
    return BeamController(
        mods, optimizer, dt=cfg["dt"] or max(2, (total // 12) // 2 * 2), p_init=cfg["p_init"],
        end_step=cfg["end_step"] or (2 * total) // 3, total_steps=total, scope=cfg["scope"],
        no_expand=cfg["no_expand"], random_assess=cfg["random_assess"], static_p=cfg["static_p"],
        no_history=cfg["no_history"], inherit_moments=cfg["inherit_moments"], seed=cfg["seed"])


# ----------------------------------------------------------------------------------------------
# analysis

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
