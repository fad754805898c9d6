# lrlora.py: the rank mask on hand-computed cases, the layer against plain and truncated LoRA, rho's
# gradient, the controller's temperature, budget projection and rounding, and export against PEFT.
import json

import pytest
import torch
import torch.nn as nn

import peft_io

import beamlora
import lrlora
from beamlora import LoRALinear


def masked(r_max=6, r=3, rho=3.0, seed=0, in_f=7, out_f=5, alpha=6.0):
    torch.manual_seed(seed)
    m = LoRALinear(nn.Linear(in_f, out_f), r=r_max, alpha=alpha)
    with torch.no_grad():
        m.lora_B.normal_()
    lrlora.add_masks({"m": m}, r=r, r_init=r)
    with torch.no_grad():
        m.gate.rho.fill_(rho)  # any value, also beyond r_max
    return m


def set_T(m, T):
    m.gate.T.fill_(T)


# ---------------------------------------------------------------------------------------------
# the mask and the layer

def test_mask_hand_checked():
    g = lrlora.RankMask(4, rho=2.5)
    g.T.fill_(0.5)
    # the chance of each rank: sigmoid((2.5 - 0.5) / 0.5) = sigmoid(4), then sigmoid(2), sigmoid(0), sigmoid(-2)
    m = torch.tensor([0.98201379, 0.88079708, 0.5, 0.11920292])
    assert torch.allclose(g.probs(), m, atol=1e-7)
    # training draws the ranks below the cut rho + T eps: eps = 1.2 -> cut 3.1 keeps 3; eps = -2.5 -> 1.25 keeps 1
    for eps, want in ((1.2, [1.0, 1.0, 1.0, 0.0]), (-2.5, [1.0, 0.0, 0.0, 0.0])):
        g.noise.fill_(eps)
        g.rho.grad = None
        s = g()
        assert torch.equal(s, torch.tensor(want))
        s.sum().backward()  # straight-through: sum_i m_i (1 - m_i) / T = (0.017663 + 0.104994 + 0.25 + 0.104994) / 0.5
        assert abs(g.rho.grad - 0.955302) < 1e-5
    with torch.no_grad():  # eval, export and logs: the deterministic mask, rank i on iff rho > i + 0.5
        assert torch.equal(g(), torch.tensor([1.0, 1.0, 0.0, 0.0]))  # (rho = 2.5 sits exactly on rank 2's edge)
    g.sampled = False  # the plain soft mask
    assert torch.allclose(g(), m, atol=1e-7)
    g.hard = True
    assert torch.equal(g(), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    g.rho.grad = None
    g()[0].backward()
    assert g.rho.grad == 0  # in the graph (DDP needs that), with no gradient


def test_sampled_ranks_have_the_masks_probabilities():
    mods = modules([2.7, 5.2], r_max=8)
    c = lrlora.RankController(mods, adamw(mods), budget_rank=4, total_steps=10**4, temp_start=0.8, temp_end=0.8)
    g = next(iter(mods.values())).gate
    counts = torch.zeros(8)
    for _ in range(4000):
        c.draw()
        counts += g()
    assert (counts / 4000 - g.probs().detach()).abs().max() < 0.03  # P(rank i on) = m_i, ranks nested


def test_large_rho_small_T_is_plain_lora_rmax():
    m = masked(rho=40.0)
    set_T(m, 0.01)
    x = torch.randn(3, 4, 7)
    plain = x @ m.weight.T + m.bias + m.scaling * (x @ m.lora_A.T) @ m.lora_B.T  # LoRA with all r_max ranks
    for sampled in (True, False):
        m.gate.sampled = sampled
        assert torch.equal(m.rank_scale(), torch.ones(6))
        assert (m(x) - plain).abs().max() < 1e-6
    assert m.scaling == 6.0 / 3  # alpha / r with r the budget: LoRA r's scaling


def test_rho_k_small_T_is_lora_truncated_hand_checked():
    # W0 = I (2x2), no bias; A (3, 2), B (2, 3); alpha = r = 3 so scaling = 1; x = (1, 1): A x = (3, 1, 3)
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))
    m = LoRALinear(lin, r=3, alpha=3.0)
    with torch.no_grad():
        m.lora_A.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]]))
        m.lora_B.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    lrlora.add_masks({"m": m}, r=3, r_init=0.0)
    x = torch.tensor([[1.0, 1.0]])
    m.gate.hard = False
    for k, want in ((0, [1.0, 1.0]), (1, [4.0, 1.0]), (2, [4.0, 2.0]), (3, [7.0, 5.0])):
        with torch.no_grad():
            m.gate.rho.fill_(k)
        set_T(m, 1e-3)  # T -> 0: sigmoid(+-500) is exactly 1 or 0 in fp32, and T eps moves the cut by < 0.5
        for sampled, hard, eps in ((True, False, 3.0), (True, False, -3.0), (False, False, 0.0), (True, True, 0.0)):
            m.gate.sampled, m.gate.hard = sampled, hard
            m.gate.noise.fill_(eps)
            assert torch.equal(m(x), torch.tensor([want])), (k, sampled, hard, eps)
    # and against a LoRA of rank k holding the first k ranks, on random numbers
    m = masked(rho=4.0)
    set_T(m, 1e-3)
    m.gate.noise.fill_(1.7)
    ref = LoRALinear(nn.Linear(7, 5), r=4, alpha=1.0)
    ref.weight, ref.bias, ref.scaling = m.weight, m.bias, m.scaling
    with torch.no_grad():
        ref.lora_A.copy_(m.lora_A[:4])
        ref.lora_B.copy_(m.lora_B[:, :4])
    x = torch.randn(2, 3, 7)
    assert (m(x) - ref(x)).abs().max() < 1e-6


def test_rho_gets_a_gradient_and_moves():
    m = masked(rho=3.0)
    set_T(m, 0.5)
    x = torch.randn(8, 7)
    with torch.no_grad():
        target = x @ m.weight.T + m.bias + m.scaling * (x @ m.lora_A.T) @ m.lora_B.T  # all six ranks on
    opt = torch.optim.AdamW([{"params": [m.lora_A, m.lora_B]}, {"params": [m.gate.rho], "lr": 0.1}], lr=0.0)
    rho0 = m.gate.rho.item()
    for _ in range(5):
        loss = (m(x) - target).square().sum()
        opt.zero_grad()
        loss.backward()
        assert m.gate.rho.grad is not None and m.gate.rho.grad != 0
        opt.step()
    assert m.gate.rho.item() > rho0 + 0.3  # towards more rank: the target has a larger update


# ---------------------------------------------------------------------------------------------
# the controller

def modules(rhos, r_max=8, shapes=None):
    shapes = shapes or [(10, 6)] * len(rhos)
    mods = {}
    for i, (rho, (i_f, o_f)) in enumerate(zip(rhos, shapes)):
        mods[f"model.layers.{i}.self_attn.q_proj" if i % 2 == 0 else f"model.layers.{i}.mlp.up_proj"] = \
            LoRALinear(nn.Linear(i_f, o_f), r=r_max, alpha=8.0)
    lrlora.add_masks(mods, r=4, r_init=4.0)
    with torch.no_grad():
        for m, rho in zip(mods.values(), rhos):
            m.gate.rho.fill_(rho)
    return mods


def adamw(mods):
    return torch.optim.AdamW([p for m in mods.values() for p in m.parameters() if p.requires_grad], lr=1e-3,
                             weight_decay=0.0)  # as train.py's group for rho


def test_temperature_schedule_and_hard_end():
    mods = modules([4.0, 4.0])
    c = lrlora.RankController(mods, adamw(mods), budget_rank=4, total_steps=100, temp_start=2.0, temp_end=0.02,
                              hard_step=50)
    assert c.temperature(0) == 2.0 and abs(c.temperature(25) - 0.2) < 1e-12 and c.temperature(50) == 0.0
    g = next(iter(mods.values())).gate
    assert float(g.T) == 2.0 and not g.hard
    for t in range(1, 50):
        c.step(t)
    assert abs(float(g.T) - 2.0 * 0.01 ** (49 / 50)) < 1e-6 and not g.hard
    c.step(50)
    assert g.hard and c.penalty() is None  # the budget is a projection, not a loss term
    # capped: hard at the end
    assert lrlora.RankController(mods, adamw(mods), 4, total_steps=10, hard_step=40).hard_step == 10


def test_projection_holds_the_expected_budget():
    # costs 16, 16, 32, 32 (in + out); budget rank 4: 384 parameters; one module far above r_max, one below 0
    shapes = [(10, 6), (10, 6), (20, 12), (20, 12)]
    for rhos in ([6.0, 5.0, 7.0, 3.0], [1.0, 0.5, 2.0, 2.5], [30.0, 4.0, -5.0, 3.0]):
        mods = modules(rhos, shapes=shapes)
        opt = adamw(mods)
        c = lrlora.RankController(mods, opt, budget_rank=4, total_steps=100, temp_start=0.7, temp_end=0.7)
        opt.param_groups[0]["lr"] = 0.05
        c.step(1)
        new = torch.tensor([m.gate.rho.item() for m in mods.values()], dtype=torch.float64)
        edges = torch.arange(8, dtype=torch.float64) + 0.5
        P = sum(cost * torch.sigmoid((rho - edges) / 0.7).sum() for cost, rho in zip([16, 16, 32, 32], new))
        assert abs(P - 384) < 1e-4  # the expected parameter count, computed here from the formula
        # one price per parameter: rho moved by p c / c_mean (c_mean = 24), clipped to [0, r_max = 8]
        p = c.price * 0.05
        want = (torch.tensor(rhos, dtype=torch.float64) - p * torch.tensor([16, 16, 32, 32]) / 24).clamp(0, 8)
        assert (new - want).abs().max() < 1e-5
        assert (p > 0) == (sum(cost * r for cost, r in zip([16, 16, 32, 32], torch.tensor(rhos).clamp(0, 8))) > 384)


def test_freeze_rounds_to_the_budget_hand_checked():
    # costs 16, 16, 32, 32 (in + out); budget rank 4: 4 x 96 = 384 parameters
    shapes = [(10, 6), (10, 6), (20, 12), (20, 12)]
    mods = modules([5.4, 3.45, 2.2, 5.7], shapes=shapes)
    opt = adamw(mods)
    for m in mods.values():
        m.gate.rho.grad = torch.tensor(1.0)
    opt.step()  # AdamW state for rho
    c = lrlora.RankController(mods, opt, budget_rank=4, total_steps=10, hard_step=5)
    # rounded: 5, 3, 2, 6 -> 16 x 8 + 32 x 8 = 384: on budget already, nothing moves
    ev = c.step(5)
    assert list(ev["ranks"].values()) == [5, 3, 2, 6] and ev["params"] == 384 and ev["rounding"] == {}
    mods = modules([5.6, 3.45, 2.2, 5.7], shapes=shapes)  # 6, 3, 2, 6 -> 400: 16 over
    c = lrlora.RankController(mods, adamw(mods), budget_rank=4, total_steps=10, hard_step=5)
    ev = c.step(5)
    # drop the rank closest to its edge: margins rho - (k - 0.5) = 0.1, 0.45, 0.2, 0.2 -> the first module
    assert list(ev["ranks"].values()) == [5, 3, 2, 6] and ev["params"] == 384
    mods = modules([4.6, 3.2, 2.3, 5.4], shapes=shapes)  # 5, 3, 2, 5 -> 128 + 224 = 352: 32 under
    c = lrlora.RankController(mods, adamw(mods), budget_rank=4, total_steps=10, hard_step=5)
    ev = c.step(5)
    # add where the gap (k + 0.5) - rho is smallest and a rank fits: 0.9, 0.3, 0.2, 0.1 -> the last (32) fits
    assert list(ev["ranks"].values()) == [5, 3, 2, 6] and ev["params"] == 384
    for m, k in zip(mods.values(), [5, 3, 2, 6]):
        assert m.gate.rho.item() == k and m.gate.hard and int(m.rank_scale().sum()) == k


def test_freeze_zeroes_rho_moments_so_rho_stays():
    mods = modules([5.4, 3.45])
    opt = adamw(mods)
    for m in mods.values():
        m.gate.rho.grad = torch.tensor(1.0)
    opt.step()
    c = lrlora.RankController(mods, opt, budget_rank=4, total_steps=10, hard_step=1)
    c.step(1)
    rho = [m.gate.rho.item() for m in mods.values()]
    x = torch.randn(3, 10)
    for _ in range(3):  # a hard mask gives rho a zero gradient; with zero moments AdamW leaves it exactly
        opt.zero_grad()
        sum(m(x).square().sum() for m in mods.values()).backward()
        opt.step()
    assert [m.gate.rho.item() for m in mods.values()] == rho


def test_resume_state_and_config_check(tmp_path):
    mods = modules([4.5, 3.5])
    c = lrlora.RankController(mods, adamw(mods), budget_rank=4, total_steps=100)
    for t in range(1, 8):
        c.step(t)
    torch.save(c.state_dict(), tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    noise = [m.gate.noise.item() for m in mods.values()]
    for m in mods.values():
        m.gate.noise.fill_(0.0)
    d = lrlora.RankController(mods, adamw(mods), budget_rank=4, total_steps=100)
    d.load_state_dict(state)
    assert d.price == c.price and d.t == 7 and d.temperature(d.t) == c.temperature(7)
    assert [m.gate.noise.item() for m in mods.values()] == noise  # the draw for step 8, made before the save
    c.draw()
    d.draw()
    assert torch.equal(c.gen.get_state(), d.gen.get_state())
    with pytest.raises(ValueError, match="schedule of the checkpoint"):
        lrlora.RankController(mods, adamw(mods), budget_rank=4, total_steps=90).load_state_dict(state)


def test_rank_lr_default_and_group():
    mods = modules([4.0, 4.0], r_max=8)
    params = [p for m in mods.values() for p in (m.lora_A, m.lora_B)]
    rhos = [m.gate.rho for m in mods.values()]
    opt = torch.optim.AdamW([{"params": params}, {"params": rhos, "lr_scale": 1.0}], lr=2e-3)
    c = lrlora.RankController(mods, opt, budget_rank=4, total_steps=400, lr=2e-3)
    assert c.hard_step == 300 and c.rank_lr == 4 * 8 / 300  # could cross [0, r_max] 4 times during the search
    assert opt.param_groups[1]["lr_scale"] == c.rank_lr / 2e-3 and "lr_scale" not in opt.param_groups[0]
    lrlora.RankController(mods, opt, budget_rank=4, total_steps=400, lr=2e-3, rank_lr=0.3)
    assert opt.param_groups[1]["lr_scale"] == 0.3 / 2e-3
    with pytest.raises(ValueError, match="lr=0"):
        lrlora.RankController(mods, opt, budget_rank=4, total_steps=400, lr=0.0)
    opt = torch.optim.AdamW([{"params": params + rhos[:1]}, {"params": rhos[1:]}])
    with pytest.raises(ValueError, match="one optimizer group"):
        lrlora.RankController(mods, opt, budget_rank=4, total_steps=400)


def test_bad_setup():
    with pytest.raises(ValueError, match="r_max=4"):
        lrlora.add_masks({"m": LoRALinear(nn.Linear(6, 6), r=4, alpha=8)}, r=6, r_init=4.0)
    mods = {"m": LoRALinear(nn.Linear(6, 6), r=4, alpha=8)}
    with pytest.raises(ValueError, match="RankMask"):
        lrlora.RankController(mods, adamw(mods), 2, 10)
    lrlora.add_masks(mods, r=2, r_init=2.0)
    with pytest.raises(ValueError, match="temp_end"):
        lrlora.RankController(mods, adamw(mods), 2, 10, temp_start=0.1, temp_end=0.5)


# ---------------------------------------------------------------------------------------------
# export: PEFT as the reference

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def lrlora_model(base, variant):
    from model import Transformer
    ours = Transformer.from_pretrained(base)
    mods = beamlora.apply_lora(ours, beamlora.TARGETS, r=8, alpha=8.0, rslora=variant == "rslora")
    lrlora.add_masks(mods, r=4, r_init=4.0)
    if variant == "dora":  # train.py --method=lrlora --dora
        import dora
        dora.add_magnitudes(mods)
    torch.manual_seed(7)
    ks = torch.randint(0, 9, (len(mods),)).tolist()  # 0 .. r_max ranks kept
    ks[0], ks[1] = 8, 0
    with torch.no_grad():
        for m, k in zip(mods.values(), ks):
            m.lora_B.normal_(std=0.05)
            m.gate.rho.fill_(k)
            m.gate.hard = True
    return ours, dict(zip(mods, ks))


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
def test_export_rank_pattern_padded_and_merge_match_peft(tmp_path, variant):
    from model import Transformer
    from test_beamlora import hf_checkpoint
    from transformers import AutoModelForCausalLM
    base = hf_checkpoint(tmp_path)
    ours, ks = lrlora_model(base, variant)
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(x)
        assert (want - Transformer.from_pretrained(base)(x)).abs().max() > 1e-3
    peft_io.export_peft(ours, str(tmp_path / "ad"), base)
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8.0 and cfg["use_rslora"] is (variant == "rslora")
    assert cfg["use_dora"] is (variant == "dora")
    assert cfg["rank_pattern"] == {n: max(k, 1) for n, k in ks.items() if k != 8}  # a module with none: 1 zero rank
    tol = 1e-5 * want.abs().max()
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "ad")).eval()
    again = peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "ad"))
    with torch.no_grad():
        assert (pm(x).logits - want).abs().max() <= tol
        assert (again(x) - want).abs().max() <= tol
    peft_io.export_peft(ours, str(tmp_path / "pad"), base, uniform_rank=10)  # servers that need one rank
    assert json.load(open(tmp_path / "pad" / "adapter_config.json"))["rank_pattern"] == {}
    pp = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "pad")).eval()
    with torch.no_grad():
        assert (pp(x).logits - want).abs().max() <= tol
    # merge: ours equals PEFT's merge_and_unload weight by weight, and the logits
    ref = pm.merge_and_unload()
    peft_io.merge_lora(ours)
    theirs = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert (p - theirs[n]).abs().max() <= 1e-6 * max(1.0, float(p.abs().max())), n
    with torch.no_grad():
        assert (ours(x) - want).abs().max() <= tol and (ref(x).logits - want).abs().max() <= tol


# ---------------------------------------------------------------------------------------------
# train.py --method=lrlora on the demo task at a tiny size (conftest.py's fixtures)

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import train  # noqa: E402
from conftest import ROOT  # noqa: E402
from model import Transformer, load_safetensors  # noqa: E402
from test_train import cfg_for  # noqa: E402  (base, demo_data: fixtures in conftest.py)

# rank_lr 0.5: rho can cross the 8 ranks within the 18 soft steps of a 24-step run
LR = dict(method="lrlora", r=4, r_max=8, rank_lr=0.5, max_steps=24, log_interval=4)


def test_train_budget_ranks_export_eval(base, demo_data, tmp_path):
    out = tmp_path / "run"
    res = train.train(cfg_for(base, demo_data, out, save_merged=True, **LR))
    assert res["losses"][-1] < res["losses"][0]
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all({"rank", "rank_attn", "rank_mlp", "price", "T"} <= set(r) for r in rows) and rows[-1]["T"] == 0
    ranks = json.load(open(out / "ranks.json"))
    linears = dict(Transformer.from_pretrained(base).named_modules())
    mods = {n: linears[n] for n in ranks["ranks"]}
    assert len(mods) == 14  # 7 targets x 2 layers
    budget = 4 * sum(m.in_features + m.out_features for m in mods.values())  # LoRA r = 4's trainable parameters
    assert ranks["budget_params"] == budget and 0.95 * budget <= ranks["params"] <= budget
    assert ranks["params"] == sum((m.in_features + m.out_features) * ranks["ranks"][n] for n, m in mods.items())
    assert len(set(ranks["ranks"].values())) >= 3  # rho moved, and not everywhere alike
    events = [json.loads(line) for line in open(out / "events.jsonl")]
    assert [(e["step"], e["kind"]) for e in events] == [(18, "ranks_frozen")] and events[0]["ranks"] == ranks["ranks"]
    # the adapter keeps exactly the learned ranks, loads in PEFT, and equals the merged checkpoint
    cfg = json.load(open(out / "adapter" / "adapter_config.json"))
    ad = load_safetensors(str(out / "adapter" / "adapter_model.safetensors"))
    for n, k in ranks["ranks"].items():
        assert ad[peft_io.peft_key(n, "lora_A")].shape[0] == max(k, 1) == cfg["rank_pattern"].get(n, cfg["r"])
    x = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(out / "adapter"))
    with torch.no_grad():
        ref = pm.eval()(x).logits
        merged = Transformer.from_pretrained(str(out / "merged"))(x)
        assert (ref - merged).abs().max() <= 1e-5 * ref.abs().max()
        assert (ref - Transformer.from_pretrained(base)(x)).abs().max() > 1e-3
    import eval as eval_lib  # both forms load in eval.py
    common = ["--task=gsm8k", "--limit=2", f"--data={os.path.join(demo_data, 'test.jsonl')}", "--max_new_tokens=8",
              "--device=cpu"]
    a = eval_lib.main([f"--model={base}", f"--adapter={out / 'adapter'}", f"--out={tmp_path / 'e1'}"] + common)
    b = eval_lib.main([f"--model={out / 'merged'}", f"--out={tmp_path / 'e2'}"] + common)
    assert a["n"] == b["n"] == 2
    s1, s2 = (open(tmp_path / d / "gsm8k_samples.jsonl").read() for d in ("e1", "e2"))
    assert ([json.loads(line)["output"] for line in s1.splitlines()]
            == [json.loads(line)["output"] for line in s2.splitlines()])


def test_train_resume_equals_uninterrupted(base, demo_data, tmp_path):
    # stopped at 7 and 14 (sampled masks, noise and T mid-schedule), then 21 (after the freeze at 18)
    full = train.train(cfg_for(base, demo_data, tmp_path / "full", dropout=0.1, **LR))
    got = []
    for i, stop in enumerate((7, 7, 7, 0)):
        got += train.train(cfg_for(base, demo_data, tmp_path / "part", dropout=0.1, resume=i > 0, stop_after=stop,
                                   **LR))["losses"]
    assert len(got) == 24 and max(abs(a - b) for a, b in zip(got, full["losses"])) <= 1e-6
    a = load_safetensors(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_safetensors(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "full" / "ranks.json")) == json.load(open(tmp_path / "part" / "ranks.json"))
    ck = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)
    assert ck["controller"]["t"] == 24


def test_train_ddp_two_processes_match_one(base, demo_data, tmp_path):
    single = train.train(cfg_for(base, demo_data, tmp_path / "one", **LR))
    cfg = cfg_for(base, demo_data, tmp_path / "two", micro_batch_size=2, **LR)
    keys = ("init_from", "data", "out_dir", "r", "alpha", "max_len", "batch_size", "micro_batch_size", "max_steps",
            "lr", "dtype", "device", "log_interval", "seed", "dropout", *LR)
    (tmp_path / "ddp_config.py").write_text("".join(f"{k} = {cfg[k]!r}\n" for k in dict.fromkeys(keys)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                           os.path.join(ROOT, "train.py"), str(tmp_path / "ddp_config.py")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert abs(log[-1]["loss"] - sum(single["losses"][-4:]) / 4) < 1e-4
    one, two = (json.load(open(tmp_path / d / "ranks.json")) for d in ("one", "two"))
    assert one["ranks"] == two["ranks"] and len(set(one["ranks"].values())) > 1
    assert max(abs(one["rho"][n] - two["rho"][n]) for n in one["rho"]) == 0  # frozen at the same integers
    a = load_safetensors(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_safetensors(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


def test_train_bad_lrlora_options(base, demo_data, tmp_path):
    with pytest.raises(ValueError, match="r_max=6"):
        train.train(cfg_for(base, demo_data, tmp_path / "bad", **dict(LR, r_max=6, r=8)))
    with pytest.raises(ValueError, match="temp_end"):
        train.train(cfg_for(base, demo_data, tmp_path / "bad", **dict(LR, temp_end=2.0)))
    assert not os.path.exists(tmp_path / "bad" / "ckpt.pt")
