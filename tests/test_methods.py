# DoRA, PiSSA, MiLoRA and BeamLoRA + DoRA against PEFT (and MiLoRA against an SVD computed by hand):
# the same initial weights give the same logits and gradients, five AdamW steps the same adapter, and
# every export loads in PEFT on the ORIGINAL base with our logits; --save_merged; rsLoRA throughout.
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import peft_io

import beamlora
import dora
import train
from model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

R, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama checkpoint written by transformers, with biases on the attention (DoRA's bias
    handling) and init std 0.1 so the weights' singular values are spread."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                      initializer_range=0.1)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(std=0.1)
    path = str(tmp_path_factory.mktemp("methods") / "base")
    hf.save_pretrained(path)
    return path


def ours_and_peft(base, method, rslora=False, dropout=0.0, **peft_kw):
    """Our model wrapped by train.wrap and PEFT's on the same checkpoint, all seven linears."""
    cfg = dict(train.DEFAULTS, method=method.split("+")[0], dora="+dora" in method, r=R, alpha=ALPHA,
               dropout=dropout, rslora=rslora, targets=",".join(beamlora.TARGETS))
    ours = Transformer.from_pretrained(base)
    mods = train.wrap(ours, cfg)
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=dropout, use_rslora=rslora, target_modules=list(beamlora.TARGETS),
        **peft_kw))
    return ours, mods, pm


def peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def pairs(mods, pm):
    """(ours, PEFT's) for every trained tensor, in one order."""
    out = []
    for n, m in mods.items():
        pl = peft_layer(pm, n)
        out += [(m.lora_A, pl.lora_A["default"].weight), (m.lora_B, pl.lora_B["default"].weight)]
        if m.lora_magnitude_vector is not None:
            out.append((m.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight))
    return out


def same_start(mods, pm):
    """A nonzero B (so the direction is no longer W0's), then all of ours into PEFT (its random A differs)."""
    torch.manual_seed(5)
    with torch.no_grad():
        for a, b in pairs(mods, pm):
            if a.dim() == 2 and a.shape[1] == R:  # B (out, r)
                a.normal_(std=0.2)
            b.copy_(a)


def close(a, b, tol=1e-5):
    """max |a - b| <= tol, relative to the reference's largest entry when that is above 1."""
    return (a.detach() - b.detach()).abs().max().item() <= tol * max(1.0, b.detach().abs().max().item())


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (2, 13), generator=g), torch.randint(0, 97, (2, 13), generator=g)


def check_training_parity(ours, mods, pm, steps=5, lr=5e-4):
    """Step 0: logits and every gradient equal; after `steps` AdamW steps on the same batches (and the
    same dropout masks: the same seed before each forward), every adapter tensor equal. (AdamW's first
    steps move an entry by about lr whatever its gradient, so an entry whose gradient is near 0 turns
    float noise into lr-sized differences: lr 5e-4 keeps those well under the tolerance.)"""
    ours.train(), pm.train()
    ps = pairs(mods, pm)
    assert len(ps) >= 2 * len(mods)
    start = [a.detach().clone() for a, _ in ps]
    opt_o = torch.optim.AdamW([a for a, _ in ps], lr=lr)
    opt_p = torch.optim.AdamW([b for _, b in ps], lr=lr)
    for t in range(steps + 1):
        x, y = batch(t)
        torch.manual_seed(100 + t)
        lo = ours(x)
        torch.manual_seed(100 + t)
        lp = pm(x).logits
        F.cross_entropy(lo.flatten(0, 1), y.flatten()).backward()
        F.cross_entropy(lp.flatten(0, 1), y.flatten()).backward()
        if t == 0:
            assert close(lo, lp), (lo - lp).abs().max()
            for a, b in ps:
                assert b.grad is not None and b.grad.abs().max() > 0
                assert close(a.grad, b.grad), (a.grad - b.grad).abs().max()
        if t == steps:
            break
        opt_o.step(), opt_p.step()
        opt_o.zero_grad(), opt_p.zero_grad()
    for a, b in ps:
        assert close(a, b), (a - b).abs().max()
    moved = max((a.detach() - a0).abs().max().item() for (a, _), a0 in zip(ps, start))
    assert steps == 0 or moved > 100 * 1e-5  # the adapters really trained
    ours.eval(), pm.eval()


def check_exports(base, ours, tmp_path, x=None):
    """Our adapter in PEFT and in our loader on the ORIGINAL base, and the merged checkpoint in
    transformers: all give our logits."""
    x = batch(7)[0] if x is None else x
    ours.eval()
    with torch.no_grad():
        want = ours(x)
        assert not close(want, Transformer.from_pretrained(base)(x), 1e-3)  # the adapter matters
    peft_io.export_peft(ours, str(tmp_path / "adapter"), base)
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "adapter")).eval()
    again = peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "adapter"))
    peft_io.merge_lora(ours)
    ours.save_pretrained(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert close(hf(x).logits, want), (hf(x).logits - want).abs().max()
        assert close(again(x), want)
        assert close(merged(x).logits, want)
        # eval.py's path: load_adapter, then merge (DoRA's rescaling folded into W)
        assert close(peft_io.merge_lora(again)(x), want)
    return json.load(open(tmp_path / "adapter" / "adapter_config.json"))


# ---------------------------------------------------------------------------------------------
# DoRA

@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_matches_peft_and_exports(base, tmp_path, rslora, dropout):
    ours, mods, pm = ours_and_peft(base, "dora", rslora, dropout, use_dora=True)
    assert all(m.scaling == (ALPHA / R ** 0.5 if rslora else ALPHA / R) for m in mods.values())
    for a, b in pairs(mods, pm)[2::3]:  # the magnitudes, from the same W0: ||W0||_row
        assert close(a, b) and a.shape == (b.shape[0],)
    same_start(mods, pm)
    check_training_parity(ours, mods, pm)
    cfg = check_exports(base, ours, tmp_path)
    assert cfg["use_dora"] is True and cfg["use_rslora"] is rslora and cfg["r"] == R and cfg["lora_alpha"] == ALPHA


def test_dora_layer_equations():
    # y = m / ||W0 + s B A||_row * (W0 x + s B A x) + bias, by hand; the norm is a constant in backward
    lin = torch.nn.Linear(6, 5)
    m = beamlora.LoRALinear(lin, r=2, alpha=4)
    dora.add_magnitudes({"m": m})
    assert close(m.lora_magnitude_vector, lin.weight.norm(dim=1), 1e-7)  # B = 0: ||W0||_row
    torch.manual_seed(1)
    with torch.no_grad():
        m.lora_B.normal_()
        m.lora_magnitude_vector.mul_(torch.rand(5) + 0.5)
    x = torch.randn(3, 6)
    trained = (m.lora_A, m.lora_B, m.lora_magnitude_vector)

    def grads(out):
        return torch.autograd.grad(out.square().sum(), trained)

    def by_hand(detach):
        w = lin.weight + 2 * m.lora_B @ m.lora_A
        norm = w.norm(dim=1)
        return m.lora_magnitude_vector / (norm.detach() if detach else norm) * (x @ w.T) + lin.bias

    assert close(m(x), by_hand(True), 1e-6)
    for got, want, other in zip(grads(m(x)), grads(by_hand(True)), grads(by_hand(False))):
        assert close(got, want, 1e-5)
    assert not close(grads(m(x))[0], grads(by_hand(False))[0], 1e-3)  # a norm with gradient differs


def test_dora_adapter_saved_by_peft_loads_in_ours(base, tmp_path):
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=R, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_dora=True))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "magnitude" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(tmp_path / "peft_dora"))
    ours = peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "peft_dora"))
    assert all(m.lora_magnitude_vector is not None for m in beamlora.lora_modules(ours).values())
    x = batch(2)[0]
    with torch.no_grad():
        assert close(ours(x), pm.eval()(x).logits)


# ---------------------------------------------------------------------------------------------
# BeamLoRA + DoRA

def test_beamlora_dora_matches_peft_dora_at_init_and_exports(base, tmp_path):
    ours, mods, pm = ours_and_peft(base, "beamlora+dora", use_dora=True)
    assert all(m.gate is not None and m.lora_magnitude_vector is not None for m in mods.values())
    same_start(mods, pm)
    check_training_parity(ours, mods, pm, steps=0)  # s = 1 at init: the layer is DoRA
    torch.manual_seed(6)
    with torch.no_grad():  # scores after training: spread, one module with two ranks pruned to exactly 0
        for m in mods.values():
            m.gate.g.normal_(std=0.1)
        mods["model.layers.1.mlp.up_proj"].gate = FixedScale(torch.tensor([1.5, 0.0, 2.5, 0.0]))
    cfg = check_exports(base, ours, tmp_path)
    assert cfg["use_dora"] is True and cfg["rank_pattern"] == {"model.layers.1.mlp.up_proj": 2}


class FixedScale(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.register_buffer("s", s)

    def forward(self):
        return self.s


def test_beamlora_dora_prune_expand_leaves_magnitude_alone(base):
    # one operation on DoRA layers: A, B, their moments and the scores as for BeamLoRA (tests/test_beamlora.py
    # checks those element by element); the magnitude and its AdamW moments untouched bit for bit
    ours = Transformer.from_pretrained(base)
    mods = train.wrap(ours, dict(train.DEFAULTS, method="beamlora", dora=True, r=8, alpha=16.0, dropout=0.0,
                                 targets="q_proj,up_proj"))
    params = [p for p in ours.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ctl = train.make_controller(mods, opt, dict(train.DEFAULTS, method="beamlora", dt=4, p_init=0.6, end_step=100,
                                                scope="global"), 100)
    x, y = batch(3)
    for t in range(1, 5):
        with torch.no_grad():  # spread scores so that some ranks are pruned
            for m in mods.values():
                m.gate.g.copy_(torch.linspace(0.3, -0.3, 8))
        F.cross_entropy(ours(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        before = {n: (m.lora_magnitude_vector.detach().clone(), m.lora_A.detach().clone(),
                      {k: v.clone() for k, v in opt.state[m.lora_magnitude_vector].items()}) for n, m in mods.items()}
        ev = ctl.step(t)
        opt.zero_grad()
    assert ev is not None and sum(len(d["pruned"]) for d in ev["modules"].values()) > 0
    for n, m in mods.items():
        mag, A, st = before[n]
        assert torch.equal(m.lora_magnitude_vector, mag)
        assert all(torch.equal(opt.state[m.lora_magnitude_vector][k], v) for k, v in st.items())
        if n in ev["modules"]:
            assert not torch.equal(m.lora_A, A)  # the operation did rewrite ranks of this module


# ---------------------------------------------------------------------------------------------
# PiSSA and MiLoRA

@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_pissa_matches_peft_and_exports_for_the_original_base(base, tmp_path, rslora):
    ours, mods, pm = ours_and_peft(base, "pissa", rslora, init_lora_weights="pissa")
    for n, m in mods.items():  # PEFT's own PiSSA init: the same A, B and residual W0 - scaling B A
        pl = peft_layer(pm, n)
        assert close(m.lora_A, pl.lora_A["default"].weight) and close(m.lora_B, pl.lora_B["default"].weight)
        assert close(m.weight, pl.base_layer.weight)
        assert torch.equal(m.lora_A0, m.lora_A.detach()) and torch.equal(m.lora_B0, m.lora_B.detach())
    x = batch(4)[0]
    with torch.no_grad():
        assert close(ours(x), Transformer.from_pretrained(base)(x))  # unchanged at step 0
    check_training_parity(ours, mods, pm)
    cfg = check_exports(base, ours, tmp_path)
    # a plain LoRA of rank 2r whose scaling equals ours, as PEFT's own conversion writes it
    assert cfg["r"] == 2 * R and cfg["use_dora"] is False and cfg["use_rslora"] is rslora
    assert cfg["lora_alpha"] == pytest.approx(ALPHA * (2 ** 0.5 if rslora else 2))


def test_pissa_export_equals_peft_conversion(base, tmp_path):
    # PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) on the same trained adapter
    ours, mods, pm = ours_and_peft(base, "pissa", init_lora_weights="pissa")
    pm.save_pretrained(str(tmp_path / "init"))
    torch.manual_seed(8)
    with torch.no_grad():
        for a, b in pairs(mods, pm):
            b.add_(torch.randn_like(b) * 0.05)
            a.copy_(b)
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_io.export_peft(ours, str(tmp_path / "ours"), base)
    theirs = peft_io.load_safetensors(str(tmp_path / "peft" / "adapter_model.safetensors"))
    mine = peft_io.load_safetensors(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert theirs.keys() == mine.keys() and all(close(mine[k], theirs[k]) for k in mine)
    ct, cm = (json.load(open(tmp_path / d / "adapter_config.json")) for d in ("peft", "ours"))
    assert (cm["r"], cm["lora_alpha"], cm["use_rslora"]) == (ct["r"], ct["lora_alpha"], ct["use_rslora"])


def hand_svd(w, r, scaling):
    """MiLoRA's init by hand: float64 numpy SVD, the r smallest singular triplets."""
    U, S, Vt = np.linalg.svd(w.double().numpy(), full_matrices=False)
    root = np.sqrt(S[-r:] / scaling)
    return torch.from_numpy(root[:, None] * Vt[-r:]), torch.from_numpy(U[:, -r:] * root[None, :]), S


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
def test_milora_against_hand_svd_and_exports(base, tmp_path, rslora):
    ours, mods, pm = ours_and_peft(base, "milora", rslora)
    originals = Transformer.from_pretrained(base).state_dict()
    for n, m in mods.items():
        w0 = originals[n + ".weight"]
        A, B, S = hand_svd(w0, R, m.scaling)
        sign = torch.sign((A * m.lora_A.double().detach()).sum(1))  # singular vectors are defined up to sign
        assert close(m.lora_A.double(), A * sign[:, None], 1e-4) and close(m.lora_B.double(), B * sign[None, :], 1e-4)
        assert close(m.weight.double(), w0.double() - m.scaling * B @ A, 1e-6)  # the residual
        assert S[-1] < S[-R] < S[0] / 2  # really the smallest ones, not the largest
    # the same initial weights in PEFT (a LoRA with our A, B on our residual base)
    with torch.no_grad():
        for n, m in mods.items():
            pl = peft_layer(pm, n)
            pl.base_layer.weight.copy_(m.weight)
            pl.lora_A["default"].weight.copy_(m.lora_A)
            pl.lora_B["default"].weight.copy_(m.lora_B)
    x = batch(4)[0]
    with torch.no_grad():
        assert close(ours(x), Transformer.from_pretrained(base)(x))  # unchanged at step 0
    check_training_parity(ours, mods, pm)
    cfg = check_exports(base, ours, tmp_path)
    assert cfg["r"] == 2 * R


def test_pissa_dora_exports_as_dora_for_the_original_base(base, tmp_path):
    # PiSSA's rank-2r conversion keeps W0 + scaling B' A' equal to our residual + scaling B A, so DoRA's
    # norm, and with it the DoRA adapter, carries over
    ours, mods, _ = ours_and_peft(base, "pissa+dora")
    torch.manual_seed(9)
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.add_(torch.randn_like(m.lora_B) * 0.05)
            m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(m.lora_magnitude_vector))
    cfg = check_exports(base, ours, tmp_path)
    assert cfg["use_dora"] is True and cfg["r"] == 2 * R


def test_pissa_bf16_base_stays_bf16_and_svd_is_fp32(base, monkeypatch):
    seen = []
    svd = torch.linalg.svd

    def spy(w, **kw):
        seen.append(w.dtype)
        return svd(w, **kw)
    monkeypatch.setattr(torch.linalg, "svd", spy)
    ours = Transformer.from_pretrained(base, dtype=torch.bfloat16)
    mods = train.wrap(ours, dict(train.DEFAULTS, method="pissa", r=R, alpha=ALPHA, targets="q_proj,down_proj"))
    ours.eval()  # no dropout
    assert seen == [torch.float32] * len(mods) == [torch.float32] * 4
    for m in mods.values():
        assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == m.lora_B.dtype == torch.float32
    x = batch(4)[0]
    with torch.no_grad():  # unchanged up to the bf16 rounding of the residual: no further from the fp32
        # model than the bf16 base itself is
        ref = Transformer.from_pretrained(base)(x)
        err = (Transformer.from_pretrained(base, dtype=torch.bfloat16)(x).float() - ref).abs().max()
        assert (ours(x).float() - ref).abs().max() <= 2 * err


def test_pissa_init_state_rebuilds_the_residual_bit_for_bit(base):
    ours = Transformer.from_pretrained(base)
    cfg = dict(train.DEFAULTS, method="milora", r=R, alpha=ALPHA, targets="v_proj,gate_proj")
    mods = train.wrap(ours, cfg)
    state = train.make_controller(mods, None, cfg, 10).state_dict()
    again = Transformer.from_pretrained(base)
    mods2 = train.wrap(again, dict(cfg, resume=True))  # resume: no SVD, the original W0
    assert all(m.lora_A0 is None for m in mods2.values())
    ctl = train.make_controller(mods2, None, cfg, 10)
    ctl.load_state_dict(state)
    for n in mods:
        assert torch.equal(mods2[n].weight, mods[n].weight) and torch.equal(mods2[n].lora_A0, mods[n].lora_A0)
    with pytest.raises(ValueError, match="other modules"):
        ctl.load_state_dict({"A0": {}, "B0": {}})
    with pytest.raises(ValueError, match="no PiSSA/MiLoRA initial adapters"):
        ctl.load_state_dict({"gen": None, "snapshot": None})  # a BeamLoRA controller's state
