"""
AdaLoRA (Zhang et al., ICLR 2023) on the one LoRA layer: the update is P diag(lambda) Q, the lambdas
sit in the layer's gate, and the least important of them are set to zero as a cubic schedule brings
the total rank from init_r per module down to the budget. PEFT's semantics (peft/tuners/adalora,
which the authors' loralib also follows); every difference is in docs/ADALORA.md.

    SVDGate        the gate: lambda (r,), PEFT's lora_E, the per-rank scale between B (= P) and A (= Q)
    add_svd        PEFT's initialisation: A, B ~ N(0, 0.02), lambda = 0, scaling alpha / (r + 1e-5)
    budget         b(t) and whether step t masks (PEFT's budget_schedule)
    AdaController  after each optimizer step: the importance EMAs, masking to b(t), the final pattern;
                   penalty(): the orthogonality regulariser on A and B
    rank, wrap, controller   --method=adalora (lora.py lists the hooks)
"""
import torch
import torch.nn as nn

from beamlora import Controller, due, event, lora_layers
from configurator import ConfigError, check_choice, check_range

DORA = False  # PEFT has no AdaLoRA with DoRA to test against

# -----------------------------------------------------------------------------
# AdaLoRA (docs/ADALORA.md) and IncreLoRA: --r is the final average rank, the budget r x modules LoRA has at r
init_r = 0  # ranks per module at the start (0: adalora 3r/2, its paper's b(0) = 1.5 b(T); increlora r/2)
tinit = -1  # steps at init_r before the budget falls (-1: a tenth of the steps)
tfinal = -1  # last steps with the final ranks fixed (-1: a third of the steps)
deltaT = 10  # steps between maskings while the budget falls
ipt_beta1 = 0.85  # EMA of the sensitivity |w * grad|
ipt_beta2 = 0.85  # EMA of its uncertainty
orth_reg_weight = 0.1  # orthogonality penalty on A and B (the authors' scripts; PEFT's default is 0.5)
orth = "code"  # code: mean of ||A A^T - I||_F over the matrices (PEFT, authors' code); paper: sum of squares
# -----------------------------------------------------------------------------


class SVDGate(nn.Module):
    """lambda, the singular values: s = lambda, zero where a rank is masked (export drops exact zeros)."""

    def __init__(self, r, dtype=torch.float32, device=None):
        super().__init__()
        self.lora_E = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))  # PEFT: zeros, shape (r, 1)

    def forward(self):
        return self.lora_E


@torch.no_grad()
def add_svd(modules):
    """Make LoRA modules AdaLoRA modules, initialised as PEFT's AdaLoraLayer.reset_lora_parameters."""
    for m in modules.values():
        if m.rslora:
            raise ValueError("adalora: --rslora does not apply (AdaLoRA scales by alpha / (r + 1e-5), as PEFT)")
        nn.init.normal_(m.lora_A, mean=0.0, std=0.02)  # Q (r, in)
        nn.init.normal_(m.lora_B, mean=0.0, std=0.02)  # P (out, r)
        m.scaling = m.alpha / (m.r + 1e-5)  # PEFT: lora_alpha / (ranknum + 1e-5), ranknum = init_r throughout
        m.gate = SVDGate(m.r, dtype=m.lora_A.dtype, device=m.lora_A.device)
    return modules


def budget(t, init_bgt, target_bgt, tinit, tfinal, total, deltaT):
    """(b(t), mask at t?): init_bgt up to tinit, then a cubic fall to target_bgt at total - tfinal,
    masking every deltaT steps; target_bgt (masking every step) after that."""
    if t <= tinit:
        return init_bgt, False
    if t > total - tfinal:
        return target_bgt, True
    mul = 1 - (t - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * mul ** 3 + target_bgt), due(t, deltaT)


def orth_penalty(pairs, form):
    """pairs: [(A (k, in), B (out, k))]. code: mean over the matrices of ||A A^T - I||_F, ||B^T B - I||_F
    (PEFT, the authors' loralib); paper: the sum of the squared norms (the paper's R(P, Q))."""
    total, n = 0.0, 0
    for A, B in pairs:
        for cov in (A @ A.T, B.T @ B):  # (k, k)
            d = torch.norm(cov - torch.eye(len(cov), dtype=cov.dtype, device=cov.device), p="fro")
            total, n = total + (d if form == "code" else d.square()), n + 1
    return total / n if form == "code" else total


class AdaController(Controller):
    """step(t) reads the gradients (the loop calls it before zero_grad). Every decision depends only on the
    (replicated) parameters and gradients, so data-parallel processes agree without communicating."""
    name = "adalora"
    state = ("ema", "unc", "pattern")

    def __init__(self, modules, target_r, tinit, tfinal, deltaT, total_steps, beta1=0.85, beta2=0.85,
                 orth_weight=0.1, orth="code"):
        super().__init__(modules)
        if not modules or any(not isinstance(m.gate, SVDGate) for m in modules.values()):
            raise ValueError("AdaController needs LoRALinear modules with an SVDGate (add_svd)")
        if not 0 < target_r <= min(m.r for m in modules.values()):
            raise ValueError(f"adalora: the final average rank r={target_r} must be between 1 and init_r")
        if not 0 <= tinit < total_steps - tfinal or tfinal < 0:
            raise ValueError(f"adalora: tinit={tinit}, tfinal={tfinal} leave no steps for the budget to fall "
                             f"in {total_steps} steps (need 0 <= tinit < total - tfinal)")
        if deltaT < 1 or not (0 < beta1 < 1 and 0 < beta2 < 1) or orth_weight < 0 or orth not in ("code", "paper"):
            raise ValueError(f"adalora: bad deltaT={deltaT}, ipt_beta1/2=({beta1}, {beta2}), "
                             f"orth_reg_weight={orth_weight} or orth={orth!r} (code | paper)")
        self.init_bgt = sum(m.r for m in self.modules.values())
        self.target_bgt = target_r * len(self.modules)
        self.tinit, self.tfinal, self.deltaT, self.total = tinit, tfinal, deltaT, total_steps
        self.beta1, self.beta2, self.orth_weight, self.orth = beta1, beta2, orth_weight, orth
        self.ema, self.unc = {}, {}  # "{module}.{A|B|E}" -> smoothed sensitivity, its uncertainty (shape of the param)
        self.pattern = None  # the final kept ranks {module: bool (r,)}, fixed at total - tfinal

    def params(self, m):
        return {"A": m.lora_A, "B": m.lora_B, "E": m.gate.lora_E}

    def budget(self, t):
        return budget(t, self.init_bgt, self.target_bgt, self.tinit, self.tfinal, self.total, self.deltaT)

    @torch.no_grad()
    def update_ipt(self):
        # I = |w * grad|; I_bar = b1 I_bar + (1 - b1) I; U_bar = b2 U_bar + (1 - b2) |I - I_bar|
        for name, m in self.modules.items():
            for k, p in self.params(m).items():
                if p.grad is None:
                    raise ValueError(f"adalora: {name}.{k} has no gradient; call the controller before zero_grad")
                key = f"{name}.{k}"
                ipt = (p * p.grad).abs()
                ema = self.ema.get(key, torch.zeros_like(p)) * self.beta1 + (1 - self.beta1) * ipt
                unc = self.unc.get(key, torch.zeros_like(p))
                self.unc[key] = unc * self.beta2 + (1 - self.beta2) * (ipt - ema).abs()
                self.ema[key] = ema

    def scores(self):
        """Per module, the importance (r,) of each triplet (lambda_i, P column i, Q row i):
        s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji), s = I_bar * U_bar."""
        out = {}
        for name in self.modules:
            s = {k: self.ema[f"{name}.{k}"] * self.unc[f"{name}.{k}"] for k in "ABE"}
            out[name] = s["E"] + (s["A"].mean(dim=1) + s["B"].mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, b):
        """Zero the lambdas of the init_bgt - b least important triplets (ties at the threshold go too,
        as in PEFT). -> {module: bool (r,) kept}"""
        scores = self.scores()
        k = self.init_bgt - b
        if k <= 0:  # PEFT's kthvalue would fail; nothing to mask
            return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
        kept = {n: s > threshold for n, s in scores.items()}
        for name, m in self.modules.items():
            m.gate.lora_E.masked_fill_(~kept[name], 0.0)
        return kept

    def event(self, t, kind, b, kept):
        masked = {n: (~k).nonzero().flatten().tolist() for n, k in kept.items()}
        n = sum(len(v) for v in masked.values())
        return event(t, kind, f"{kind.replace('_', ' ')}: budget {b}, {n} of {self.init_bgt} singular values set to "
                     "zero", budget=b, masked=masked)

    @torch.no_grad()
    def step(self, t):
        """PEFT's AdaLoraModel.update_and_allocate(t). Returns the masking event or None."""
        final = self.total - self.tfinal
        if t < final:
            self.update_ipt()
            b, masks = self.budget(t)
            return self.event(t, "mask", b, self.mask_to_budget(b)) if masks else None
        if t == final:  # the final allocation: fixed from here on, the importance no longer needed
            kept = self.mask_to_budget(self.target_bgt)
            self.pattern = {n: k.clone() for n, k in kept.items()}
            self.ema, self.unc = {}, {}
            return self.event(t, "final_mask", self.target_bgt, kept)
        for name, m in self.modules.items():  # masked lambdas regrow by the optimizer's step: zero them again
            m.gate.lora_E.masked_fill_(~self.pattern[name], 0.0)
        return None

    def penalty(self):
        """orth_reg_weight * R(P, Q), added to the loss once per optimizer step."""
        if self.orth_weight == 0:
            return 0.0
        return self.orth_weight * orth_penalty([(m.lora_A, m.lora_B) for m in self.modules.values()], self.orth)

    def log(self, t):
        return {"budget": self.budget(t)[0] if t <= self.total - self.tfinal else self.target_bgt}

    def config(self):
        return {"init_bgt": self.init_bgt, "target_bgt": self.target_bgt, "tinit": self.tinit, "tfinal": self.tfinal,
                "deltaT": self.deltaT, "total": self.total, "beta1": self.beta1, "beta2": self.beta2}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ema, self.unc = self.to_device(self.ema), self.to_device(self.unc)
        self.pattern = self.to_device(self.pattern)


def check_importance(cfg):
    """The settings AdaLoRA and IncreLoRA share: the importance EMAs and the orthogonality penalty."""
    check_range(cfg, "in (0, 1)", "ipt_beta1", "ipt_beta2")
    check_range(cfg, "0 or more", "orth_reg_weight")
    check_choice(cfg, "orth", ("code", "paper"))
    if cfg["rslora"]:
        raise ConfigError(f"--rslora: not with --method={cfg['method']} (it scales by alpha / (ranks + 1e-5), as "
                          "the authors and PEFT do)")


def check(cfg):
    check_importance(cfg)
    check_range(cfg, "at least 1", "deltaT")
    if rank(cfg) < cfg["r"]:
        raise ConfigError(f"--init_r={cfg['init_r']}: must be at least --r={cfg['r']} (the budget falls from init_r "
                          "ranks per module to r)")


def rank(cfg):
    return cfg["init_r"] or 3 * cfg["r"] // 2  # the budget falls from init_r to r per module


def wrap(model, cfg):
    return add_svd(lora_layers(model, cfg, rank(cfg)))


def controller(mods, optimizer, cfg, total):
    return AdaController(
        mods, target_r=cfg["r"], tinit=cfg["tinit"] if cfg["tinit"] >= 0 else total // 10,
        tfinal=cfg["tfinal"] if cfg["tfinal"] >= 0 else total // 3, deltaT=cfg["deltaT"], total_steps=total,
        beta1=cfg["ipt_beta1"], beta2=cfg["ipt_beta2"], orth_weight=cfg["orth_reg_weight"], orth=cfg["orth"])
