"""
IncreLoRA (Zhang et al., 2023) on the one LoRA layer: every module starts with init_r ranks and, every
`interval` steps after a warmup, the top_h modules by importance gain k ranks each until the total
budget (r x modules) is spent. Each module keeps a reserve of k ranks that train ahead of time behind
a fixed, tiny singular value (1e-5, the paper's advance learning); growing makes the reserve's
singular values trainable and draws a new reserve, and the new ranks' learning rate warms up again.
The update is P diag(lambda) Q as in AdaLoRA, scaled by alpha / (ranks + 1e-5). Tensors have a fixed
size (max_r slots per module); slots that are not ranks have lambda = 0 exactly. docs/INCRELORA.md.

    SlotGate         s = lambda / (ranknum + 1e-5) over the max_r slots; `state` says what each slot is
    add_slots        the initial ranks and the first reserve of every module
    IncreController  per-module importance |dW * dL/ddW| (hooks), its EMAs, growth, the new ranks' lr ramp;
                     penalty(): the orthogonality regulariser
    rank, wrap, controller   --method=increlora (lora.py lists the hooks); init_r, ipt_beta1/2, orth_reg_weight and
                     orth are adalora.py's settings
"""
import math
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

import adalora
from beamlora import Controller, due, event, lora_layers
from configurator import ConfigError, check_range

DORA = False  # PEFT has no IncreLoRA to test against

# -----------------------------------------------------------------------------
# IncreLoRA (docs/INCRELORA.md), with adalora.py's init_r, ipt_beta1/2, orth_reg_weight and orth
max_r = 0  # slots per module: the most ranks one module can reach, its reserve included (0: 2r)
incre_warmup = -1  # steps before the first addition (-1: a tenth of the steps)
incre_interval = 0  # steps between additions (0: spread so that the budget is reached at two thirds of the steps)
top_h = 10  # modules that grow at each addition
incre_rank_num = 0  # ranks a chosen module gains, also the size of its reserve (0: r/2, the authors' rule)
incre_lr_warmup = -1  # lr warmup of the new ranks (-1: as long as the main warmup; 0: none)
# -----------------------------------------------------------------------------

UNUSED, RESERVE, ACTIVE, DEAD = 0, 1, 2, 3  # slot states; DEAD: a reserve left when the budget was reached
RESERVE_LAMBDA = 1e-5  # the reserve's fixed singular value (the authors' code)


class SlotGate(nn.Module):
    def __init__(self, r, dtype=torch.float32, device=None):
        super().__init__()
        self.lora_E = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.register_buffer("ranknum", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("state", torch.zeros(r, dtype=torch.int8, device=device), persistent=False)

    def forward(self):
        return self.lora_E / (self.ranknum + 1e-5)  # the authors' scaling / (ranknum + 1e-5), alpha in m.scaling


def normal_slots_(m, slots, generator=None):
    """A rows and B columns of `slots` drawn from N(0, 0.02), as the authors initialise P and Q."""
    n = len(slots)
    a = torch.empty(n, m.in_features).normal_(0.0, 0.02, generator=generator)
    b = torch.empty(m.out_features, n).normal_(0.0, 0.02, generator=generator)
    m.lora_A[slots] = a.to(m.lora_A)
    m.lora_B[:, slots] = b.to(m.lora_B)


@torch.no_grad()
def add_slots(modules, init_r, k):
    """Slots 0 .. init_r-1 are the starting ranks (lambda 0), the next k the first reserve (lambda 1e-5),
    the rest unused (all zero)."""
    for m in modules.values():
        if m.rslora:
            raise ValueError("increlora: --rslora does not apply (the scaling is alpha / (ranks + 1e-5))")
        if init_r < 1 or init_r + k > m.r:
            raise ValueError(f"increlora: max_r={m.r} slots cannot hold init_r={init_r} ranks and a reserve of {k}")
        m.lora_A.zero_()
        m.lora_B.zero_()
        normal_slots_(m, list(range(init_r + k)))
        m.scaling = m.alpha
        m.gate = SlotGate(m.r, dtype=m.lora_A.dtype, device=m.lora_A.device)
        m.gate.state[:init_r] = ACTIVE
        m.gate.state[init_r:init_r + k] = RESERVE
        m.gate.lora_E[init_r:init_r + k] = RESERVE_LAMBDA
        m.gate.ranknum.fill_(init_r)
    return modules


class IncreController(Controller):
    """The importance is read by hooks during the backward passes of each step and summed over micro-batches and
    (all-reduced) processes, so every process takes the same decisions."""
    name, adam = "increlora", True
    state = ("gen", "ema", "unc", "ramps", "prev")

    def __init__(self, modules, optimizer, budget, init_r, k, top_h, warmup, interval, lr_warmup, total_steps,
                 beta1=0.85, beta2=0.85, orth_weight=0.1, orth="code", seed=0):
        super().__init__(modules, optimizer)
        if not modules or any(not isinstance(m.gate, SlotGate) for m in modules.values()):
            raise ValueError("IncreController needs LoRALinear modules with a SlotGate (add_slots)")
        if not (k >= 1 and top_h >= 1 and warmup >= 0 and interval >= 1 and lr_warmup >= 0 and 0 < beta1 < 1
                and 0 < beta2 < 1 and orth_weight >= 0 and orth in ("code", "paper")):
            raise ValueError(f"increlora: bad incre_rank_num={k}, top_h={top_h}, incre_warmup={warmup}, "
                             f"incre_interval={interval}, incre_lr_warmup={lr_warmup}, ipt_beta1/2=({beta1}, {beta2}), "
                             f"orth_reg_weight={orth_weight} or orth={orth!r}")
        self.names = list(modules)
        if not init_r * len(self.names) <= budget <= sum(m.r for m in self.modules.values()):
            raise ValueError(f"increlora: the budget of {budget} ranks must lie between init_r x modules "
                             f"({init_r * len(self.names)}) and the slots of all modules (max_r x modules)")
        self.budget, self.init_r, self.k, self.top_h = budget, init_r, k, top_h
        self.warmup, self.interval, self.lr_warmup, self.total = warmup, interval, lr_warmup, total_steps
        self.beta1, self.beta2, self.orth_weight, self.orth = beta1, beta2, orth_weight, orth
        self.gen = torch.Generator().manual_seed(seed)  # new reserves, drawn on the cpu
        self.ema = torch.zeros(len(self.names), dtype=torch.float64)  # smoothed importance per module
        self.unc = torch.zeros(len(self.names), dtype=torch.float64)  # its uncertainty
        self.ramps = []  # [module, "E" | "AB", slots, start step]: new parameters whose lr warms up
        self.prev = []  # their values after the previous step, one entry per ramp
        self.handles, self.inputs = [], {}
        self.acc = {n: torch.zeros((), device=m.lora_A.device) for n, m in self.modules.items()}
        if self.total_rank() < budget:
            self.attach()
        else:  # nothing to add: no reserves either
            self.finish()

    def total_rank(self):
        return int(sum(int(m.gate.ranknum) for m in self.modules.values()))

    # ------------------------------------------------------------------------------------------
    # importance: s = sum |dW * dL/d(dW)| / sqrt(out * in) per module and step (the authors' backward hook)

    def attach(self):
        for name, m in self.modules.items():
            self.handles.append(m.dropout.register_forward_hook(partial(self.keep_input, name)))
            self.handles.append(m.register_forward_hook(partial(self.on_output, name)))

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles, self.inputs = [], {}

    def keep_input(self, name, mod, inputs, out):
        self.inputs[name] = out  # dropout(x), what the low-rank update multiplies

    def on_output(self, name, m, inputs, out):
        x = self.inputs.pop(name, None)
        if x is not None and torch.is_grad_enabled() and out.requires_grad:
            out.register_hook(partial(self.score, name, m, x))

    @torch.no_grad()
    def score(self, name, m, x, g):
        # dL/d(dW) = g^T x over the micro-batch's tokens (out, in): held one module at a time
        G = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        dW = m.scaling * (m.lora_B.float() * m.rank_scale().float()) @ m.lora_A.float()  # (out, in)
        self.acc[name] += (dW * G).abs().sum() / math.sqrt(dW.numel())

    @torch.no_grad()
    def update_ipt(self):
        s = torch.stack([self.acc[n] for n in self.names]).double()
        if dist.is_available() and dist.is_initialized():  # each process's gradients carry a factor of world
            dist.all_reduce(s)
            s /= dist.get_world_size()
        s = s.cpu()
        for a in self.acc.values():
            a.zero_()
        self.ema = self.beta1 * self.ema + (1 - self.beta1) * s
        self.unc = self.beta2 * self.unc + (1 - self.beta2) * (s - self.ema).abs()
        return s

    def scores(self):
        return self.ema * self.unc

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, t):
        self.restore_fixed()
        self.warm_up_new(t)
        if not self.handles:  # budget reached
            return None
        self.update_ipt()
        if due(t, self.interval, after=self.warmup):
            return self.grow(t)
        return None

    @torch.no_grad()
    def restore_fixed(self):
        """The optimizer moved every lambda: the reserve's stay at 1e-5 and unused slots' at 0, without
        momentum, as in the authors' code where they are not trained."""
        for m in self.modules.values():
            E, state = m.gate.lora_E, m.gate.state
            fixed = state != ACTIVE
            E[fixed] = torch.where(state[fixed] == RESERVE, RESERVE_LAMBDA, 0.0).to(E.dtype)
            for x in self.moments(E, required=False):
                x[fixed] = 0

    @torch.no_grad()
    def warm_up_new(self, t):
        """The lr of a new rank's parameters ramps from 1/W to 1 over W steps (the authors give each new
        parameter group a fresh warmup): its last update is scaled by min(1, (t - start) / W)."""
        keep = []
        for ramp, prev in zip(self.ramps, self.prev):
            name, which, slots, start = ramp
            f = min(1.0, (t - start) / self.lr_warmup)
            cur = self.ramp_values(name, which, slots)
            new = [p + f * (c - p) for p, c in zip(prev, cur)]
            self.set_ramp_values(name, which, slots, new)
            if f < 1:
                keep.append((ramp, [x.clone() for x in new]))
        self.ramps, self.prev = [r for r, _ in keep], [p for _, p in keep]

    def ramp_values(self, name, which, slots):
        m = self.modules[name]
        return [m.gate.lora_E[slots]] if which == "E" else [m.lora_A[slots], m.lora_B[:, slots]]

    def set_ramp_values(self, name, which, slots, values):
        m = self.modules[name]
        if which == "E":
            m.gate.lora_E[slots] = values[0]
        else:
            m.lora_A[slots], m.lora_B[:, slots] = values

    def start_ramp(self, name, which, slots, t):
        if self.lr_warmup > 0:
            self.ramps.append((name, which, slots, t))
            self.prev.append([x.clone() for x in self.ramp_values(name, which, slots)])

    @torch.no_grad()
    def grow(self, t):
        """The top_h modules by importance (those with a reserve left) each gain up to k ranks, never
        past the budget: the reserve's lambdas become trainable and a new reserve is drawn."""
        scores = self.scores()
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()  # ties: module order
        remaining, added = self.budget - self.total_rank(), {}
        for i in order:
            if len(added) == self.top_h or remaining == 0:
                break
            name, m = self.names[i], self.modules[self.names[i]]
            reserve = (m.gate.state == RESERVE).nonzero().flatten().tolist()
            if not reserve:  # every slot in use: this module cannot grow
                continue
            n = min(self.k, remaining, len(reserve))
            self.activate(name, m, reserve[:n], t)
            added[name], remaining = n, remaining - n
        total = self.total_rank()
        if remaining == 0:
            self.finish()
        note = (f"{sum(added.values())} ranks added to {len(added)} modules, {total} of {self.budget}"
                + (" (budget reached)" if remaining == 0 else ""))
        return event(t, "grow", note, added=added, total_rank=total, scores=dict(zip(self.names, scores.tolist())))

    def activate(self, name, m, slots, t):
        m.gate.state[slots] = ACTIVE  # their lambda, 1e-5 so far, now trains
        m.gate.ranknum += len(slots)
        self.start_ramp(name, "E", slots, t)
        new = (m.gate.state == UNUSED).nonzero().flatten().tolist()[:len(slots)]
        if new:  # the next reserve: fresh P and Q, lambda 1e-5, no momentum
            normal_slots_(m, new, self.gen)
            m.gate.lora_E[new] = RESERVE_LAMBDA
            m.gate.state[new] = RESERVE
            for p, idx in ((m.lora_A, (new,)), (m.lora_B, (slice(None), new)), (m.gate.lora_E, (new,))):
                for x in self.moments(p, required=False):
                    x[idx] = 0
            self.start_ramp(name, "AB", new, t)

    def finish(self):
        """Budget reached: the reserves are dropped (lambda 0 from now on) and the hooks removed."""
        for m in self.modules.values():
            m.gate.state[m.gate.state == RESERVE] = DEAD
        self.restore_fixed()
        self.detach()

    # ------------------------------------------------------------------------------------------

    def penalty(self):
        """orth_reg_weight x the orthogonality term over the ranks that exist (not the unused slots). code
        (the authors'): the mean, over the starting block and every added rank or reserve as a block of
        its own, of ||Q Q^T - I||_F and ||P^T P - I||_F; paper: the sum of the squared norms over whole
        modules."""
        if self.orth_weight == 0:
            return 0.0
        if self.orth == "paper":
            pairs = []
            for m in self.modules.values():
                e = (m.gate.state != UNUSED).nonzero().flatten()
                pairs.append((m.lora_A[e], m.lora_B[:, e]))
            return self.orth_weight * adalora.orth_penalty(pairs, "paper")
        total, n, r0 = 0.0, 0, self.init_r
        for m in self.modules.values():
            total = total + 2 * adalora.orth_penalty([(m.lora_A[:r0], m.lora_B[:, :r0])], "code")  # the two norms
            extra = (m.gate.state[r0:] != UNUSED).nonzero().flatten() + r0  # rank i alone: ||q_i q_i^T - 1|| etc.
            total = total + (m.lora_A[extra].square().sum(1) - 1).abs().sum()
            total = total + (m.lora_B[:, extra].square().sum(0) - 1).abs().sum()
            n += 2 + 2 * len(extra)
        return self.orth_weight * total / n

    def log(self, t):
        return {"ranks": self.total_rank()}

    def config(self):
        return {"budget": self.budget, "init_r": self.init_r, "k": self.k, "top_h": self.top_h, "warmup": self.warmup,
                "interval": self.interval, "lr_warmup": self.lr_warmup, "total": self.total}

    def state_dict(self):
        return {**super().state_dict(), "slots": {n: m.gate.state.cpu() for n, m in self.modules.items()},
                "ranknum": {n: float(m.gate.ranknum) for n, m in self.modules.items()}, "reached": not self.handles}

    @torch.no_grad()
    def load_state_dict(self, state):
        super().load_state_dict(state)
        for n, m in self.modules.items():
            m.gate.state.copy_(state["slots"][n])
            m.gate.ranknum.fill_(state["ranknum"][n])
        self.ramps = [tuple(r) for r in self.ramps]
        self.prev = self.to_device(self.prev)
        if state["reached"]:
            self.detach()


def check(cfg):
    adalora.check_importance(cfg)
    check_range(cfg, "at least 1", "top_h")
    (init_r, k), slots = start_and_step(cfg), rank(cfg)
    if init_r + k > slots:
        raise ConfigError(f"--max_r={cfg['max_r']}: {slots} slots per module cannot hold init_r={init_r} ranks and "
                          f"a reserve of {k}")


def start_and_step(cfg):
    """(ranks each module starts with, ranks added at a time and held in reserve)"""
    return cfg["init_r"] or max(1, cfg["r"] // 2), cfg["incre_rank_num"] or max(1, cfg["r"] // 2)


def rank(cfg):
    return cfg["max_r"] or 2 * cfg["r"]  # slots: the most a module can grow to, its reserve included


def wrap(model, cfg):
    return add_slots(lora_layers(model, cfg, rank(cfg)), *start_and_step(cfg))


def controller(mods, optimizer, cfg, total):
    """The additions spread so that the budget (r x modules) is reached at two thirds of the run."""
    (init_r, k), budget = start_and_step(cfg), cfg["r"] * len(mods)
    warmup = cfg["incre_warmup"] if cfg["incre_warmup"] >= 0 else total // 10
    rounds = max(1, math.ceil((budget - init_r * len(mods)) / max(1, cfg["top_h"] * k)))
    return IncreController(
        mods, optimizer, budget, init_r, k, cfg["top_h"], warmup,
        interval=cfg["incre_interval"] or max(1, (2 * total // 3 - warmup) // rounds),
        lr_warmup=cfg["incre_lr_warmup"] if cfg["incre_lr_warmup"] >= 0 else
        cfg["warmup_steps"] or math.ceil(cfg["warmup_ratio"] * total),
        total_steps=total, beta1=cfg["ipt_beta1"], beta2=cfg["ipt_beta2"], orth_weight=cfg["orth_reg_weight"],
        orth=cfg["orth"], seed=cfg["seed"])
