"""
PiSSA (Meng et al., NeurIPS 2024) and MiLoRA (Wang et al., 2024): LoRA whose A and B start as a slice
of W0's singular value decomposition W0 = U S V^T, with that slice taken out of the frozen weight so
the model is unchanged at step 0. PiSSA takes the r largest singular values, MiLoRA the r smallest:

    A = sqrt(S_r / scaling) V_r^T  (r, in)     B = U_r sqrt(S_r / scaling)  (out, r)
    W0 <- W0 - scaling B A                     (the residual, kept in W0's dtype)

The equations and every choice are in docs/PISSA.md.

    wrap      --method=pissa (milora.py: minor=True): LoRA layers, then the SVD initialisation
    init      the SVDs: one weight at a time, in fp32, on the weight's device, with progress lines; A0, B0 kept in
              the layer's lora_A0, lora_B0 seam, from which export writes a rank-2r LoRA for the original W0
              (peft_io.peft_factors)
    residual  W0 <- W0 - scaling B0 A0: one function for init and resume, so both give the same bits
    Init      the method's controller: nothing happens between steps, but its state (A0, B0 of every module)
              goes into ckpt.pt, so --resume rebuilds the residual from the original checkpoint without an SVD
"""
import os
import time

import torch

from beamlora import Controller, lora_layers


@torch.no_grad()
def residual(m):
    """W0 <- W0 - scaling B0 A0, computed in fp32 and stored in W0's own dtype."""
    w = m.weight.float()  # (out, in): the weight itself if it is fp32, else the one fp32 copy
    w.addmm_(m.lora_B0.to(w.device), m.lora_A0.to(w.device), alpha=-m.scaling)
    if w is not m.weight:
        m.weight.copy_(w)


@torch.no_grad()
def init(modules, minor=False, verbose=True):
    """PiSSA (minor=False) or MiLoRA (minor=True) on every module. Needs at most one fp32 copy of one
    weight beside the SVD's own factors U, V^T; the whole model is never converted."""
    name_ = "milora" if minor else "pissa"
    t0 = last = time.time()
    for i, (name, m) in enumerate(modules.items(), 1):
        if m.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: {name_} needs a float32/bfloat16/float16 weight, not {m.weight.dtype}")
        if i == 1 and verbose:
            print(f"{name_}: SVD of {len(modules)} weights in float32 on {m.weight.device}")
        U, S, Vh = torch.linalg.svd(m.weight.float(), full_matrices=False)  # (out, k) (k,) (k, in), S descending
        keep = slice(len(S) - m.r, len(S)) if minor else slice(0, m.r)  # the r smallest or the r largest
        root = torch.sqrt(S[keep] / m.scaling)  # (r,): scaling B A gives back U_r S_r V_r^T
        A, B = root[:, None] * Vh[keep], U[:, keep] * root[None, :]  # (r, in), (out, r)
        del U, S, Vh
        m.lora_A.copy_(A)
        m.lora_B.copy_(B)
        m.lora_A0, m.lora_B0 = m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone()
        residual(m)
        if verbose and (time.time() - last > 10 or i == len(modules)):
            took = time.time() - t0
            print(f"{name_}: {i}/{len(modules)} {name} ({m.out_features}x{m.in_features}), {took:.0f} s"
                  + (f", about {took / i * (len(modules) - i) / 60:.1f} min left" if i < len(modules) else ""))
            last = time.time()
    return modules


def wrap(model, cfg, minor=False):
    mods = lora_layers(model, cfg, cfg["r"])
    if not cfg["resume"]:  # on resume Init.load_state_dict rebuilds W0 from ckpt.pt
        init(mods, minor=minor, verbose=int(os.environ.get("RANK", 0)) == 0)
    return mods


def controller(mods, optimizer, cfg, total):
    return Init(mods)


class Init(Controller):
    """Keeps A0, B0 for the checkpoint; step() does nothing."""
    name = "PiSSA/MiLoRA"

    def state_dict(self):
        return {**super().state_dict(), "A0": {n: m.lora_A0 for n, m in self.modules.items()},
                "B0": {n: m.lora_B0 for n, m in self.modules.items()}}

    @torch.no_grad()
    def load_state_dict(self, state):
        """On resume: the model holds the original W0 (wrap skips the SVD then); take A0, B0 from the
        checkpoint and subtract them exactly as init did."""
        if not isinstance(state, dict) or not {"A0", "B0"} <= set(state):
            raise ValueError("the checkpoint holds no PiSSA/MiLoRA initial adapters (A0, B0): "
                             "was it written with another --method?")
        super().load_state_dict(state)
        if set(state["A0"]) != set(self.modules) or set(state["B0"]) != set(self.modules):
            raise ValueError("the checkpoint's PiSSA/MiLoRA initial adapters are for other modules than this run's")
        for n, m in self.modules.items():
            A0, B0 = state["A0"][n].float().cpu(), state["B0"][n].float().cpu()
            if A0.shape != m.lora_A.shape or B0.shape != m.lora_B.shape:
                raise ValueError(f"{n}: the checkpoint's initial adapter has shapes {tuple(A0.shape)}, "
                                 f"{tuple(B0.shape)}")
            m.lora_A0, m.lora_B0 = A0, B0
            residual(m)
