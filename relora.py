"""
ReLoRA (Lialin et al., 2023) on the one LoRA layer: every N steps the adapter is merged into the frozen
weights, A is re-initialised (kaiming) and B zeroed, most of their AdamW moments are pruned by
magnitude, and the learning rate restarts from near zero with a short warmup (the jagged schedule).
The merges accumulate in the frozen weights themselves: the model's working copy of the base, in the
dtype it was loaded in (train.py: the training dtype), never written back to the base's files. The
sum of the cycles' updates is not low rank, so the result ships as merged weights. docs/RELORA.md.

    ReLoController   step(t): merge and restart every N steps; lr_factor(t): the restart warmups
    prune_magnitude_ zero the smallest |x| of a tensor (the authors' magnitude_pruning_); joint: an entry keeps
                    both moments or neither
    save_base        the frozen weights as they stand (W0 + every merged cycle) as an HF checkpoint
    controller, export   --method=relora (lora.py lists the hooks): the result is merged/, with merged_base/ and the
                    last cycle's adapter/ on it
"""
import math
import os
import shutil

import torch
import torch.nn as nn

import lora
import peft_io
from beamlora import Controller, due, event, lora_modules
from configurator import ConfigError, check_range

SHIPS = "merged"  # the cycles' sum is not low rank
DORA = False  # PEFT has no ReLoRA to test against

# -----------------------------------------------------------------------------
# ReLoRA (docs/RELORA.md)
relora_steps = 0  # steps per cycle: merge, re-initialise, prune the moments, restart the lr (0: a quarter of the steps)
relora_warmup = 0  # steps of the lr warmup after each restart (0: min(50, relora_steps // 10), at least 1)
relora_prune = 0.99  # fraction of each AdamW moment tensor of A and B zeroed at a restart, smallest magnitudes first
relora_joint = True  # an entry keeps both moments or neither (False: each tensor on its own, the authors' code)
# -----------------------------------------------------------------------------


@torch.no_grad()
def prune_magnitude_(x, ratio):
    """Zero the entries of x whose |x| is at or below the `ratio` quantile of |x| (linear interpolation,
    as torch.quantile, which the authors call; sorted here since torch.quantile stops at 2^24 entries)."""
    v = x.abs().flatten().float().sort().values
    pos = ratio * (len(v) - 1)
    lo = math.floor(pos)
    threshold = v[lo] + (pos - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])
    x.mul_(x.abs().float() > threshold)


class ReLoController(Controller):
    """Merges at t = N, 2N, ... before the last step; lr_factor(t) scales the learning rate of step t + 1. Every
    process merges the same (replicated) adapter and draws A from the same seeded generator, so processes agree."""
    name, adam = "relora", True
    state = ("gen", "merges")

    def __init__(self, modules, optimizer, steps, warmup, prune, total_steps, seed=0, joint=True):
        super().__init__(modules, optimizer)
        if not modules or any(m.gate is not None for m in modules.values()):
            raise ValueError("ReLoController needs plain LoRALinear modules (no gate)")
        if steps < 1 or not 0 <= warmup <= steps or not 0 <= prune < 1:
            raise ValueError(f"relora: relora_steps={steps} must be >= 1, relora_warmup={warmup} between 0 and "
                             f"relora_steps, relora_prune={prune} in [0, 1)")
        self.steps, self.warmup, self.prune, self.total = steps, warmup, prune, total_steps
        self.joint = joint  # an entry keeps its moments only if both survive (docs/RELORA.md section 2)
        self.gen = torch.Generator().manual_seed(seed)  # the new A's, drawn on the cpu
        self.merges = 0

    def lr_factor(self, t):
        """Steps t + 1 after a restart at a multiple of N ramp up as 1/W, 2/W, ..., 1 (W = warmup)."""
        if t < self.steps or self.warmup == 0:
            return 1.0
        return min(1.0, (t % self.steps + 1) / self.warmup)

    @torch.no_grad()
    def step(self, t):
        if not due(t, self.steps, before=self.total):  # no restart after the last step: its adapter is exported
            return None
        zeroed, n = 0, 0
        for m in self.modules.values():
            self.merge_and_reinit(m)
            for p in (m.lora_A, m.lora_B):
                state = self.moments(p, required=False)
                for x in state:
                    prune_magnitude_(x, self.prune)
                if self.joint and len(state) == 2:
                    # A's gradient is 0 right after a restart (B = 0): an exp_avg kept without its exp_avg_sq
                    # would move A by lr * exp_avg / eps, thousands of times the lr, and the run diverges
                    keep = (state[0] != 0) & (state[1] != 0)
                    for x in state:
                        x.mul_(keep)
                for x in state:
                    zeroed, n = zeroed + int((x == 0).sum()), n + x.numel()
        self.merges += 1
        frac = zeroed / max(n, 1)
        return event(t, "merge", f"merged cycle {self.merges} into the weights, A re-drawn, B = 0, "
                     f"{100 * frac:.1f}% of the adapter's AdamW moments zeroed", cycle=self.merges, moments_zeroed=frac)

    def merge_and_reinit(self, m):
        # W <- W + scaling B A, summed in fp32 and rounded once to the weights' dtype
        m.weight.copy_((m.weight.float() + m.scaling * (m.lora_B.float() @ m.lora_A.float())).to(m.weight.dtype))
        A = torch.empty(m.lora_A.shape, dtype=m.lora_A.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=self.gen)  # as LoRA's init, from our generator
        m.lora_A.copy_(A)
        m.lora_B.zero_()

    def log(self, t):
        return {"cycle": self.merges + 1}

    def config(self):
        return {"steps": self.steps, "warmup": self.warmup, "prune": self.prune, "total": self.total,
                "joint": self.joint}

    def state_dict(self):
        # the merged frozen weights are part of the state: the base's files hold W0 only
        weights = {n: m.weight for n, m in self.modules.items()} if self.merges else None
        return {**super().state_dict(), "weights": weights}

    @torch.no_grad()
    def load_state_dict(self, state):
        super().load_state_dict(state)
        for name, w in (state["weights"] or {}).items():
            self.modules[name].weight.copy_(w)


@torch.no_grad()
def save_base(model, out_dir):
    """The model's frozen weights as they stand, without the adapters, as an HF checkpoint."""
    mods = lora_modules(model)
    for name, m in mods.items():  # plain linears on the same tensors while saving
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
    try:
        model.save_pretrained(out_dir)
    finally:
        for name, m in mods.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m)


def check(cfg):
    check_range(cfg, "0 or more", "relora_steps", "relora_warmup")
    check_range(cfg, "in [0, 1)", "relora_prune")
    if cfg["relora_steps"] and cfg["relora_warmup"] > cfg["relora_steps"]:
        raise ConfigError(f"--relora_warmup={cfg['relora_warmup']}: longer than a cycle (--relora_steps="
                          f"{cfg['relora_steps']})")


def controller(mods, optimizer, cfg, total):
    steps = cfg["relora_steps"] or max(1, total // 4)
    warmup = cfg["relora_warmup"] or max(1, min(50, steps // 10))
    return ReLoController(mods, optimizer, steps, warmup, cfg["relora_prune"], total, seed=cfg["seed"],
                          joint=cfg["relora_joint"])


def export(model, controller, cfg, tokenizer_path):
    """merged/ (the result), merged_base/ (W0 + every cycle but the last) and adapter/ (the last cycle, on it)."""
    out, base_dir = cfg["out_dir"], os.path.join(cfg["out_dir"], "merged_base")
    save_base(model, base_dir)
    shutil.copy(tokenizer_path, os.path.join(base_dir, "tokenizer.model"))
    peft_io.export_peft(model, os.path.join(out, "adapter"), base_dir, cfg["export_rank"])
    lora.save_model(model, tokenizer_path, os.path.join(out, "merged"), merge=True)
