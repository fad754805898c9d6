"""
LR-LoRA: LoRA whose rank per module is learned by the optimizer, under a parameter budget. This is our
reading of arXiv 2606.04325 (Garg, Lucey, Saratchandran, 2026), of which only the abstract is public (no
full text, no code); docs/LRLORA.md has the equations and says which choices are ours.

    RankMask        the gate: rank i is on with probability m_i = sigmoid((rho - i - 0.5) / T), one learnable rank
                    rho per module; training draws a nested 0/1 mask from m each step, T = 0 is exact
    wrap            r_max ranks per module with a RankMask each; --r is the budget (LoRA r's parameter count)
    RankController  T's annealing, the budget held by a price per parameter (a projection), the final hard ranks
    learned_rank    how many ranks a module keeps: those with m_i > 0.5, i.e. i + 0.5 < rho
    rank, wrap, controller   --method=lrlora (lora.py lists the hooks)
"""
import math

import torch
import torch.nn as nn

from beamlora import Controller, event, lora_layers, lora_scaling
from configurator import ConfigError, check_range

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")

# -----------------------------------------------------------------------------
# LR-LoRA (lrlora.py, docs/LRLORA.md): --r is the budget, the mean rank in parameters (LoRA r's count)
r_max = 0  # ranks allocated per module; each learns its rank in [0, r_max] (0: 2r)
r_init = 0.0  # every module's rank rho at step 0 (0: r)
rank_lr = 0.0  # rho's peak learning rate, in ranks per step (0: 4 r_max / hard_step); AdamW's own lr is far too slow
rank_sample = True  # each step draws a nested 0/1 mask with P(rank i on) = m_i; False: the soft mask m itself
temp_start = 1.0  # the mask's temperature T at step 0, in ranks; annealed geometrically to temp_end
temp_end = 0.05  # at hard_step, where the mask becomes exactly 0/1 and the ranks freeze at the budget
hard_step = 0  # (0: three quarters of the steps)
# -----------------------------------------------------------------------------


class RankMask(nn.Module):
    """An ordered mask over r ranks around a learnable rank rho: rank i is on while rho > i + 0.5.

    m_i = sigmoid((rho - i - 0.5) / T) is the chance that rank i is on this step: with logistic noise eps drawn
    once a step by the controller, the cut rho + T eps keeps ranks 0 .. k-1 (nested) and P(i + 0.5 < cut) = m_i.
    Training sees that exact 0/1 sample and rho gets m's gradient (straight-through). sampled=False uses m itself
    as the mask (the plain soft mask; docs/LRLORA.md says why it is not the default). Without gradients (eval,
    export, logging) and when hard, the mask is the deterministic (rho > i + 0.5), exactly 0/1."""

    def __init__(self, r, rho, sampled=True, device=None):
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(float(rho), device=device))  # () fp32, in ranks
        # buffers, not floats: the controller changes T every step, and a float would recompile under torch.compile
        self.register_buffer("edge", torch.arange(r, dtype=torch.float32, device=device) + 0.5, persistent=False)
        self.register_buffer("T", torch.tensor(1.0, device=device), persistent=False)
        self.register_buffer("noise", torch.tensor(0.0, device=device), persistent=False)  # this step's eps
        self.sampled, self.hard = sampled, False

    def probs(self):
        return torch.sigmoid((self.rho - self.edge) / self.T)  # (r,) m_i

    def forward(self):
        if self.hard or not (self.training and torch.is_grad_enabled()):
            # exactly 0/1; "+ 0 * rho" keeps rho in the graph (zero gradient) so that DDP sees every parameter used
            return (self.rho > self.edge).float() + 0 * self.rho
        m = self.probs()
        if not self.sampled:
            return m
        h = (self.rho.detach() + self.T * self.noise > self.edge).float()  # ranks below the drawn cut
        return h + (m - m.detach())  # forward: h exactly; backward: the gradient of m

    def extra_repr(self):
        return f"r={len(self.edge)}, sampled={self.sampled}, hard={self.hard}"


def learned_rank(m):
    return int((m.gate.rho.detach() > m.gate.edge).sum())


def cost(m):
    return m.in_features + m.out_features  # parameters per rank: a row of A and a column of B


def add_masks(modules, r, r_init, sampled=True):
    """Make LoRA modules of r_max ranks LR-LoRA modules of budget rank r: a RankMask on each, rho = r_init,
    and LoRA's scaling at the budget (alpha / r, or alpha / sqrt(r) with rsLoRA) so that with r ranks on, a
    module is LoRA r exactly. rho.lr_scale puts rho in an optimizer group of its own (train.make_optimizer);
    RankController sets that group's factor once it knows the run's length."""
    for name, m in modules.items():
        if not 0 < r <= m.r or not 0 <= r_init <= m.r:
            raise ValueError(f"{name}: the budget r={r} and r_init={r_init} must lie in (0, r_max={m.r}]")
        m.scaling = lora_scaling(m.alpha, r, m.rslora)
        m.gate = RankMask(m.r, r_init, sampled, device=m.lora_A.device)
        m.gate.rho.lr_scale = 1.0
    return modules


def rank(cfg):
    return cfg["r_max"] or 2 * cfg["r"]


def check(cfg):
    check_range(cfg, "0 or more", "r_init", "rank_lr", "hard_step")
    check_range(cfg, "positive", "temp_end")
    if rank(cfg) < cfg["r"]:
        raise ConfigError(f"--r_max={cfg['r_max']}: must be at least the budget --r={cfg['r']}")
    if cfg["r_init"] > rank(cfg):
        raise ConfigError(f"--r_init={cfg['r_init']}: more than the {rank(cfg)} ranks a module holds (--r_max)")
    if cfg["temp_end"] > cfg["temp_start"]:
        raise ConfigError(f"--temp_end={cfg['temp_end']}: must not exceed --temp_start={cfg['temp_start']}")


def wrap(model, cfg):
    """r_max ranks per module (default 2r), the budget r, rho's own learning rate."""
    return add_masks(lora_layers(model, cfg, rank(cfg)), cfg["r"], cfg["r_init"] or cfg["r"],
                     sampled=cfg["rank_sample"])


def controller(mods, optimizer, cfg, total):
    return RankController(mods, optimizer, budget_rank=cfg["r"], total_steps=total, lr=cfg["lr"],
                          rank_lr=cfg["rank_lr"], temp_start=cfg["temp_start"], temp_end=cfg["temp_end"],
                          hard_step=cfg["hard_step"], seed=cfg["seed"])


class RankController(Controller):
    """Between steps (train.py's step hook). Until hard_step: the masks' temperature
    T(t) = temp_start (temp_end / temp_start)^(t / hard_step), fresh noise for the sampled masks, and after every
    optimizer step the budget: all rho shift by one price per parameter, rho_m <- clip(rho_m - p c_m / c_mean,
    0, r_max), with p chosen so that the expected parameter count P = sum_m c_m sum_i m_i is the budget
    (a projection onto the budget; docs/LRLORA.md section 2 says why, and what it costs). At hard_step the masks
    become exactly 0/1 and the ranks freeze, rounded to the budget. Everything depends only on replicated values
    and a seeded generator: DDP processes agree without communicating."""
    name = "LR-LoRA"
    state = ("price", "t", "gen")

    def __init__(self, modules, optimizer, budget_rank, total_steps, lr=None, rank_lr=0.0, temp_start=1.0,
                 temp_end=0.05, hard_step=0, seed=0):
        super().__init__(modules, optimizer)
        if not modules or any(not isinstance(m.gate, RankMask) for m in modules.values()):
            raise ValueError("RankController needs LoRALinear modules with a RankMask gate (lrlora.add_masks)")
        if not 0 < temp_end <= temp_start:
            raise ValueError(f"temp_start={temp_start}, temp_end={temp_end}: need 0 < temp_end <= temp_start")
        self.costs = {n: cost(m) for n, m in self.modules.items()}
        self.c_sum = sum(self.costs.values())
        self.budget_rank, self.budget = budget_rank, budget_rank * self.c_sum  # LoRA r's trainable parameters
        # the projection's arrays, float64 on the cpu: costs (n,), ranks (n,), edges (n, R), +inf past a module's r
        self.c = torch.tensor(list(self.costs.values()), dtype=torch.float64)
        self.r = torch.tensor([m.r for m in self.modules.values()], dtype=torch.float64)
        self.edges = torch.full((len(self.c), int(self.r.max())), math.inf, dtype=torch.float64)
        for j, m in enumerate(self.modules.values()):
            self.edges[j, :m.r] = torch.arange(m.r) + 0.5
        self.total = total_steps
        self.hard_step = max(1, min(hard_step or (3 * total_steps) // 4, total_steps))
        # rho's peak lr, in ranks per step; default: at AdamW's full step it could cross [0, r_max] four times
        # during the search. Its group's lr is the schedule's times lr_scale (train.py)
        self.rank_lr = rank_lr or 4 * float(self.r.max()) / self.hard_step
        group = self.rho_group()
        lr = group["lr"] if lr is None else lr  # the schedule's peak (train.py passes --lr)
        if lr <= 0 or rank_lr < 0:
            raise ValueError(f"lr={lr}, rank_lr={rank_lr}: rho's learning rate is the schedule's x rank_lr / lr")
        if any(not any(p is m.gate.rho for p in group["params"]) for m in self.modules.values()):
            raise ValueError("RankController: every rho must be in one optimizer group (train.make_optimizer)")
        group["lr_scale"] = self.rank_lr / lr  # kept in the optimizer's state_dict, so a resume has it too
        self.temp_start, self.temp_end = temp_start, temp_end
        self.price, self.t = 0.0, 0
        self.gen = torch.Generator().manual_seed(seed)  # the masks' noise, on the cpu: the same on every process
        self.set_step(0)
        self.draw()

    def temperature(self, t):
        if t >= self.hard_step:
            return 0.0
        return self.temp_start * (self.temp_end / self.temp_start) ** (t / self.hard_step)

    def set_step(self, t):
        # the masks of the coming step t + 1; hard from hard_step on
        T = self.temperature(t)
        for m in self.modules.values():
            m.gate.hard = T == 0
            m.gate.T.fill_(max(T, 1e-6))

    def draw(self):
        """Logistic noise eps = log(u / (1 - u)), one per module, for the coming step's sampled masks."""
        u = torch.rand(len(self.modules), generator=self.gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        self.set_noise((u.log() - (-u).log1p()).tolist())

    def set_noise(self, eps):
        for m, e in zip(self.modules.values(), eps):
            m.gate.noise.fill_(e)

    def expected_params(self, rho, T):
        """P = sum_m c_m sum_i sigmoid((rho_m - i - 0.5) / T): the parameters the masks keep on average."""
        return float((self.c * torch.sigmoid((rho[:, None] - self.edges) / T).sum(1)).sum())

    @torch.no_grad()
    def project(self, T):
        """Find the price p with P(clip(rho - p c / c_mean, 0, r)) = budget by bisection (P falls as p grows),
        and move rho there. Returns p in ranks of an average module."""
        rho = torch.stack([m.gate.rho.detach() for m in self.modules.values()]).double().cpu()
        w = self.c / self.c.mean()
        P = lambda p: self.expected_params(torch.minimum((rho - p * w).clamp_min(0), self.r), T)  # noqa: E731
        lo, hi = float(((rho - self.r) / w).min()), float((rho / w).max())  # every module at its r / at 0
        for _ in range(48):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if P(mid) > self.budget else (lo, mid)
        p = (lo + hi) / 2
        for m, v in zip(self.modules.values(), torch.minimum((rho - p * w).clamp_min(0), self.r).tolist()):
            m.gate.rho.fill_(v)
        return p

    def rho_group(self):
        """rho's AdamW group, looked up each time: loading an optimizer's state (a resume) replaces its groups."""
        rho0 = next(iter(self.modules.values())).gate.rho
        return next(g for g in self.opt.param_groups if any(p is rho0 for p in g["params"]))

    def step(self, t):
        self.t = t
        event = None
        if t < self.hard_step:
            shift = self.project(self.temperature(t))  # the budget, under the coming step's T
            lr = self.rho_group()["lr"]
            self.price = shift / lr if lr > 0 else 0.0  # in units of AdamW's step on rho
        elif t == self.hard_step:
            event = self.freeze(t)
        self.set_step(t)
        self.draw()
        return event

    @torch.no_grad()
    def freeze(self, t):
        """Round every rho to an integer rank k_m (m_i > 0.5 -> on), then move the ranks nearest their edges so
        that P = sum_m c_m k_m is the largest it can be without exceeding the budget: drop ranks (smallest margin
        rho - (k - 0.5) first) while over, add ranks (smallest gap (k + 0.5) - rho first) while one fits. rho
        becomes k exactly and its AdamW moments zero: with zero gradients from now on it stays put."""
        rho = {n: m.gate.rho.item() for n, m in self.modules.items()}
        k = {n: learned_rank(m) for n, m in self.modules.items()}
        P = sum(self.costs[n] * k[n] for n in k)
        while P > self.budget:
            n = min((n for n in k if k[n] > 0), key=lambda n: rho[n] - (k[n] - 0.5))
            k[n] -= 1
            P -= self.costs[n]
        while True:
            fits = [n for n in k if k[n] < self.modules[n].r and P + self.costs[n] <= self.budget]
            if not fits:
                break
            n = min(fits, key=lambda n: k[n] + 0.5 - rho[n])
            k[n] += 1
            P += self.costs[n]
        moved = {n: k[n] - learned_rank(m) for n, m in self.modules.items() if k[n] != learned_rank(m)}
        for n, m in self.modules.items():
            m.gate.rho.fill_(k[n])
            for x in self.moments(m.gate.rho, required=False):
                x.zero_()
        return event(t, "ranks_frozen", f"ranks frozen: {P:,} of a budget of {self.budget:,} parameters (mean rank "
                     f"{P / self.c_sum:.2f}); {len(moved)} modules moved by rounding to the budget",
                     ranks=k, params=P, budget=self.budget, rounding=moved)

    def ranks(self):
        return {n: learned_rank(m) for n, m in self.modules.items()}

    def log(self, t):
        k = self.ranks()
        out = {"rank": sum(self.costs[n] * k[n] for n in k) / self.c_sum}  # parameter-weighted: the budget's measure
        attn = [k[n] for n in k if n.rsplit(".", 1)[-1] in ATTN]
        mlp = [k[n] for n in k if n.rsplit(".", 1)[-1] not in ATTN]
        if attn:
            out["rank_attn"] = sum(attn) / len(attn)
        if mlp:
            out["rank_mlp"] = sum(mlp) / len(mlp)
        return {**out, "price": self.price, "T": self.temperature(t)}

    def final(self):
        k = self.ranks()
        P = sum(self.costs[n] * k[n] for n in k)
        return {"ranks.json": {"budget_rank": self.budget_rank, "budget_params": self.budget, "params": P,
                               "mean_rank": P / self.c_sum, "r_max": max(m.r for m in self.modules.values()),
                               "hard_step": self.hard_step, "ranks": k, "costs": self.costs,
                               "rho": {n: m.gate.rho.item() for n, m in self.modules.items()}}}

    def state_dict(self):
        return {**super().state_dict(), "noise": [m.gate.noise.item() for m in self.modules.values()]}

    def config(self):
        return {"budget": self.budget, "total": self.total, "hard_step": self.hard_step, "temp_start": self.temp_start,
                "temp_end": self.temp_end, "rank_lr": self.rank_lr}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.set_step(self.t)
        self.set_noise(state["noise"])  # the draw made for the coming step, before the checkpoint
