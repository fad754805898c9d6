"""
DoRA (Liu et al., ICML 2024, "Weight-Decomposed Low-Rank Adaptation") on the one LoRA layer of
beamlora.py: the adapted weight W0 + scaling B diag(s) A is split into a direction (each output row
divided by its norm) and a learned magnitude m per output row. The equations, and where we differ
from the paper or PEFT, are in docs/DORA.md.

    wrap             --method=dora: LoRA with magnitudes (--dora adds them to the other LoRA-family methods that
                     allow it: lora.py's DORA)
    add_magnitudes   fill the layer's lora_magnitude_vector seam: m = ||W0 + scaling B diag(s) A||_row
    weight_norm      that row norm, a constant in backward (fp32, no graph)
    forward          the layer's output with DoRA, PEFT's formula (dropout, bias)
    merged_weight    m / ||W|| * W for a merged checkpoint

With a gate (BeamLoRA's score, ...) s is folded into A everywhere, so `--method=beamlora --dora` needs
nothing else: prune/expand rewrite ranks of A and B; m has no rank dimension and is left alone.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import beamlora  # the module, not its names: beamlora imports this file for the layer's forward


def weight_norm(m):
    """||W0 + scaling B diag(s) A|| over the input dimension, one per output row: (out,) fp32.
    No gradient flows through it: DoRA's paper (section 4.3) and PEFT treat it as a constant, which
    also spares the backward pass an (out, in) matrix."""
    with torch.no_grad(), torch.autocast(m.weight.device.type, enabled=False):
        w = torch.addmm(m.weight.float(), m.lora_B.float(), m.folded_A().float(), alpha=m.scaling)  # (out, in)
        return torch.linalg.vector_norm(w, dim=1)


def add_magnitudes(modules):
    """Make LoRA modules DoRA modules (those that are not yet). m starts at the current norm, so the layer's
    output is unchanged (with B = 0: m = ||W0||_row). m is fp32 like the adapters; its key is PEFT's,
    `...lora_magnitude_vector`."""
    for m in modules.values():
        if m.lora_magnitude_vector is None:
            m.lora_magnitude_vector = nn.Parameter(weight_norm(m).to(m.lora_A.dtype))
    return modules


def wrap(model, cfg):
    return add_magnitudes(beamlora.lora_layers(model, cfg, cfg["r"]))


def forward(m, x, xd, lora):
    """DoRA's output of layer m. x: its input, xd: x after the adapter's dropout (the same tensor as x
    when there is none), lora = scaling B (s * A xd) (..., out). With g = m / ||W0 + scaling B diag(s) A||
    (out,), PEFT's Linear + DoraLinearLayer compute

        W0 x + bias + (g - 1) * W0 xd + g * lora

    which without dropout is g * (W0 x + lora) + bias, computed so in fewer passes over the (..., out)
    activations: the bias is not rescaled. With dropout (in training) the base path keeps W0 x
    undropped and only the rescaling term sees xd."""
    g = m.lora_magnitude_vector / weight_norm(m)  # (out,) fp32
    base = F.linear(x, m.weight)  # W0 x (..., out)
    if xd is x:
        out = g * (base + lora) if m.bias is None else torch.addcmul(m.bias, g, base + lora)
        return out.to(base.dtype)
    y = base if m.bias is None else base + m.bias
    return y + ((g - 1) * F.linear(xd, m.weight) + g * lora).to(y.dtype)


@torch.no_grad()
def merged_weight(m, w):
    """w = W0 + scaling B diag(s) A (out, in) fp32 -> m / ||w||_row * w: the weight a plain linear needs."""
    return w * (m.lora_magnitude_vector.float() / torch.linalg.vector_norm(w, dim=1))[:, None]
