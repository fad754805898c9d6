"""
PEFT adapter files for the one LoRA layer of beamlora.py: whatever a method put in the layer's seams is folded
into plain A and B, so PEFT, vLLM and eval.py load the result as an ordinary LoRA (or DoRA) adapter.

    export_peft   adapter_config.json + adapter_model.safetensors (rank_pattern where ranks differ)
    peft_factors  one layer as a plain LoRA for the original W0 (the gate folded into A; PiSSA's offset)
    merge_lora    W0 + scaling B A' into each wrapped linear (a plain HF checkpoint)
    load_adapter  a PEFT LoRA / DoRA adapter (ours or any) onto our model, unmerged
"""
import json
import math
import os
import re

import torch
import torch.nn as nn

import dora
from beamlora import LoRALinear, lora_modules, lora_scaling
from rundir import atomic_json
from safetensors_io import load_safetensors, save_safetensors


def peft_key(name, which):
    return f"base_model.model.{name}.{which}.weight"


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
    ratio = m.scaling / lora_scaling(m.alpha if alpha is None else alpha, k, m.rslora)
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
    kinds = {(m.alpha, m.rslora, m.dropout_p, m.lora_magnitude_vector is None, m.lora_A0 is None)
             for m in mods.values()}
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
            raise ValueError(f"{st_path}: {name} is not a linear of this model or lacks one of "
                             f"{', '.join(sorted(want))}")
        if use_dora and ab["lora_magnitude_vector"].shape != (linears[name].out_features,):
            raise ValueError(f"{st_path}: {name}.lora_magnitude_vector has shape "
                             f"{tuple(ab['lora_magnitude_vector'].shape)}, "
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
