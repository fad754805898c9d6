# IncreLoRA: the importance hook against a dense dW's autograd gradient, growth by importance within the budget,
# new ranks and reserves initialised as specified and their lr ramp (hand-checked on a toy model); then train.py
# end to end: the export loads in PEFT with the trained model's logits, resume, DDP.
import json
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import beamlora
import increlora
import train
from increlora import ACTIVE, DEAD, RESERVE, UNUSED
from model import Transformer, load_safetensors
from test_train import cfg_for, run_ddp  # base, demo_data: fixtures in conftest.py


def toy(init_r=1, k=2, max_r=6, names=("q_proj", "k_proj", "v_proj")):
    torch.manual_seed(0)
    net = nn.ModuleDict({n: nn.Linear(8, 7) for n in names})
    mods = increlora.add_slots(beamlora.apply_lora(net, names, r=max_r, alpha=4.0), init_r, k)
    with torch.no_grad():  # trained-looking lambdas for the starting ranks
        for m in mods.values():
            m.gate.lora_E[:init_r] = torch.randn(init_r)
    return net, mods


def controller(mods, opt, budget, **kw):
    args = dict(init_r=1, k=2, top_h=2, warmup=0, interval=1, lr_warmup=2, total_steps=100, seed=5)
    args.update(kw)
    return increlora.IncreController(mods, opt, budget, **args)


def test_score_is_the_dense_sensitivity():
    net, mods = toy()
    ctl = controller(mods, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad]), budget=9)
    xs = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    for x in xs:  # two micro-batches, summed
        (net["q_proj"](x) ** 2).sum().backward()
    m = mods["q_proj"]
    want = 0.0
    for x in xs:  # the same loss through a dense W0 + dW, dW a leaf: its .grad is dL/d(dW)
        dW = (m.scaling * (m.lora_B * m.rank_scale()) @ m.lora_A).detach().requires_grad_()
        (F.linear(x, m.weight + dW, m.bias) ** 2).sum().backward()
        want += (dW * dW.grad).abs().sum() / math.sqrt(56)
    assert torch.allclose(ctl.acc["q_proj"], want, rtol=1e-5) and want > 0
    assert ctl.acc["k_proj"] == 0  # not run
    s = ctl.update_ipt()  # the EMAs: I_bar = 0.15 s, U_bar = 0.15 |s - I_bar|
    assert torch.allclose(ctl.ema, 0.15 * s) and torch.allclose(ctl.unc, 0.15 * (s - 0.15 * s).abs())
    assert ctl.acc["q_proj"] == 0


def test_growth_hand_checked():
    net, mods = toy()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01)
    ctl = controller(mods, opt, budget=8)  # 3 ranks to start, 5 to add: 2 + 2, then 1
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    sum(net[n](x).square().sum() for n in mods).backward()
    opt.step()
    before = {n: (m.lora_A.clone(), m.lora_B.clone(), m.gate.lora_E.clone()) for n, m in mods.items()}
    ctl.restore_fixed()
    assert all(m.gate.lora_E[1:3].eq(1e-5).all() and m.gate.lora_E[3:].eq(0).all() for m in mods.values())
    ctl.ema, ctl.unc = torch.tensor([2.0, 1.0, 3.0]), torch.ones(3)  # importance: v > q > k
    event = ctl.grow(1)
    assert event["added"] == {"v_proj": 2, "q_proj": 2} and event["total_rank"] == 7
    gen = torch.Generator().manual_seed(5)  # the new reserves, replayed in the order the modules grew
    for n in ("v_proj", "q_proj"):
        m, (A0, _, _) = mods[n], before[n]
        assert m.gate.state.tolist() == [ACTIVE] * 3 + [RESERVE] * 2 + [UNUSED] and m.gate.ranknum == 3
        # the old reserve is now trained, as it was learned in advance: values kept, lambda 1e-5
        assert torch.equal(m.lora_A[1:3], A0[1:3]) and torch.equal(m.gate.lora_E[1:3], torch.full((2,), 1e-5))
        a = torch.empty(2, 8).normal_(0.0, 0.02, generator=gen)
        b = torch.empty(7, 2).normal_(0.0, 0.02, generator=gen)
        assert torch.equal(m.lora_A[3:5], a) and torch.equal(m.lora_B[:, 3:5], b)  # the new reserve
        assert m.gate.lora_E[3:5].eq(1e-5).all() and m.lora_A[5].eq(0).all()
        assert all(x[3:5].eq(0).all() for x in ctl.moments(m.lora_A))
        assert all(x[:, 3:5].eq(0).all() for x in ctl.moments(m.lora_B))
        assert not all(x[1:3].eq(0).all() for x in ctl.moments(m.lora_A))  # the advance-learned ranks keep theirs
    assert mods["k_proj"].gate.ranknum == 1 and torch.equal(mods["k_proj"].lora_A, before["k_proj"][0])
    # the model's output moved only by the new scale alpha / (3 + 1e-5) and the two reserves' 1e-5
    m = mods["q_proj"]
    s = m.gate.lora_E / (3 + 1e-5)
    assert torch.allclose(m.rank_scale(), s) and s[5] == 0

    ctl.ema = torch.tensor([1.0, 3.0, 2.0])  # now k > v > q, one rank left: k gets 1, v nothing, never past 8
    event = ctl.grow(2)
    assert event["added"] == {"k_proj": 1} and event["total_rank"] == 8 == ctl.budget
    assert mods["k_proj"].gate.state.tolist() == [ACTIVE, ACTIVE, DEAD, DEAD, UNUSED, UNUSED]
    assert all(m.gate.lora_E[m.gate.state != ACTIVE].eq(0).all() for m in mods.values())  # reserves dropped
    assert ctl.handles == [] and ctl.step(3) is None  # budget reached: no hooks, no more growth


def test_full_module_is_skipped_and_new_ranks_warm_up():
    net, mods = toy(max_r=3)  # q: 1 rank + a reserve of 2 fills its slots
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.01)
    ctl = controller(mods, opt, budget=9, top_h=1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    ctl.ema, ctl.unc = torch.tensor([3.0, 1.0, 2.0]), torch.ones(3)
    assert ctl.grow(1)["added"] == {"q_proj": 2}  # q grows into its reserve; no slot left for a new one
    assert mods["q_proj"].gate.state.tolist() == [ACTIVE] * 3
    assert ctl.grow(2)["added"] == {"v_proj": 2}  # q is still the most important but cannot grow
    # step 3: the ranks q activated at step 1 are past half their warmup of 2: their update counts in full
    for t, f in ((2, 0.5), (3, 1.0)):  # v's new ranks (from step 2): 1/2 at step 3, then 1
        E0 = mods["v_proj"].gate.lora_E.detach().clone()
        sum(net[n](x).square().sum() for n in mods).backward()
        opt.step()
        E1 = mods["v_proj"].gate.lora_E.detach().clone()
        ctl.step(t + 1)
        opt.zero_grad()
        got = mods["v_proj"].gate.lora_E.detach()
        assert torch.allclose(got[1:3], E0[1:3] + f * (E1[1:3] - E0[1:3]), atol=1e-9) and (E1 - E0)[1:3].abs().min() > 0
        assert torch.equal(got[:1], E1[:1])  # the starting rank: no ramp


def inc_cfg(base, demo_data, out, **kw):
    # r 4: 14 modules start at 2 ranks (28) with reserves of 2 and grow to 56: 3 modules x 2 ranks every 2 steps
    cfg = dict(method="increlora", max_steps=16, top_h=3, incre_interval=2, incre_warmup=1, incre_lr_warmup=2,
               log_interval=1, lr=1e-2, micro_batch_size=2)
    cfg.update(kw)
    return cfg_for(base, demo_data, out, **cfg)


def trained_model(base, out, cfg):
    """Our model as train.py left it: parameters and the controller's slots from ckpt.pt."""
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    model = Transformer.from_pretrained(base)
    mods = train.wrap(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(ck["params"][n])
    params = [p for p in model.parameters() if p.requires_grad]
    ctl = train.make_controller(mods, train.make_optimizer(params, cfg), cfg, cfg["max_steps"])
    ctl.load_state_dict(ck["controller"])
    return model, mods


def test_end_to_end_export(base, demo_data, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = inc_cfg(base, demo_data, tmp_path)
    res = train.train(cfg)
    assert sum(res["losses"][-4:]) < sum(res["losses"][:4])
    events = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert [e["step"] for e in events] == [2, 4, 6, 8, 10] and events[-1]["total_rank"] == 56
    ranks = {n: 2 for n in events[0]["scores"]}
    for e in events:  # the added ranks went to the highest scores among the modules that could still grow (< 8)
        top = sorted((n for n in ranks if ranks[n] < 8), key=lambda n: -e["scores"][n])[:len(e["added"])]
        assert sorted(e["added"]) == sorted(top) and sum(e["added"].values()) <= 6
        ranks.update({n: ranks[n] + k for n, k in e["added"].items()})
    assert [sum(e["added"].values()) for e in events] == [6, 6, 6, 6, 4]
    assert all(json.loads(line)["ranks"] <= 56 for line in open(tmp_path / "log.jsonl"))
    model, mods = trained_model(base, tmp_path, cfg)
    ranks = {n: int(m.gate.ranknum) for n, m in mods.items()}
    assert sum(ranks.values()) == 56 and len(set(ranks.values())) > 1
    assert all(int((m.rank_scale() != 0).sum()) == ranks[n] for n, m in mods.items())  # reserves dropped: exact zeros
    conf = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert conf["r"] == max(ranks.values())
    assert conf["rank_pattern"] == {n: k for n, k in ranks.items() if k != conf["r"]}
    x = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    lora = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    with torch.no_grad():
        ref = model.eval()(x)
        got = lora.eval()(input_ids=x).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_resume_equals_uninterrupted(base, demo_data, tmp_path):
    # stopped while ranks are being added (after 5: ramps running) and after the budget is reached (11)
    kw = dict(dropout=0.1)
    full = train.train(inc_cfg(base, demo_data, tmp_path / "full", **kw))
    part = train.train(inc_cfg(base, demo_data, tmp_path / "part", stop_after=5, **kw))
    mid = train.train(inc_cfg(base, demo_data, tmp_path / "part", resume=True, stop_after=6, **kw))
    rest = train.train(inc_cfg(base, demo_data, tmp_path / "part", resume=True, **kw))
    got = part["losses"] + mid["losses"] + rest["losses"]
    assert len(got) == 16 and max(abs(a - b) for a, b in zip(got, full["losses"])) <= 1e-6
    a, b = (load_safetensors(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(tmp_path / "full" / "events.jsonl").read() == open(tmp_path / "part" / "events.jsonl").read()


def test_ddp_two_processes_match_one(base, demo_data, tmp_path):
    # the same micro-batches on both sides (2 examples): the importance is a sum over micro-batches
    kw = dict(max_steps=8, incre_interval=3)
    single = train.train(inc_cfg(base, demo_data, tmp_path / "one", **kw))
    run_ddp(inc_cfg(base, demo_data, tmp_path / "two", **kw), tmp_path)
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert max(abs(r["loss"] - s) for r, s in zip(log, single["losses"])) < 1e-5
    ev = [[json.loads(line) for line in open(tmp_path / d / "events.jsonl")] for d in ("one", "two")]
    assert [e["added"] for e in ev[0]] == [e["added"] for e in ev[1]] and len(ev[0]) == 2
    for e1, e2 in zip(*ev):
        assert all(abs(e1["scores"][n] - e2["scores"][n]) <= 1e-4 * abs(e1["scores"][n]) for n in e1["scores"])
    a, b = (load_safetensors(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


@pytest.mark.parametrize("change, message", [(dict(max_r=3), "--max_r=3: 3 slots per module cannot hold"),
                                             (dict(top_h=0), "top_h=0")])
def test_bad_config(base, demo_data, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train.train(inc_cfg(base, demo_data, tmp_path / "bad", **change))
    assert not os.path.exists(tmp_path / "bad" / "ckpt.pt")


def test_importance_under_gradient_checkpointing(base, demo_data, tmp_path):
    # the 7B recipes recompute each block in backward: the hooks must see each module once, with the same result
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    acc = []
    for ckpt in (False, True):
        cfg = inc_cfg(base, demo_data, tmp_path)
        torch.manual_seed(0)
        model = Transformer.from_pretrained(base)
        mods = train.wrap(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        ctl = train.make_controller(mods, train.make_optimizer(params, cfg), cfg, 16)
        model.gradient_checkpointing = ckpt
        model.train()
        model(x, targets=x).backward()  # the summed loss
        acc.append(torch.stack([ctl.acc[n] for n in mods]))
    assert acc[0].min() > 0 and torch.allclose(acc[0], acc[1], rtol=1e-5)
