# beamlora.py: the layer, rank selection on hand-computed cases, one prune/expand checked
# element by element, the schedule and ablations, resume, and export against PEFT/transformers.
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import peft_io

import beamlora
from beamlora import BeamController, LoRALinear, apply_lora, select_ranks, threshold


def layer(r=4, beam=True, seed=0, in_f=6, out_f=5):
    torch.manual_seed(seed)
    m = LoRALinear(nn.Linear(in_f, out_f), r=r, alpha=2 * r)
    return beamlora.add_scores({"m": m}, tau=0.05)["m"] if beam else m


def adamw_with_state(params, seed=1):
    """An AdamW whose moments exist (one step on random grads) and are then set to random values."""
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for p in params:
        opt.state[p]["exp_avg"].copy_(torch.randn(p.shape, generator=g))
        opt.state[p]["exp_avg_sq"].copy_(torch.rand(p.shape, generator=g))
    return opt


# ---------------------------------------------------------------------------------------------
# the layer

def test_init_equals_base_and_plain_lora():
    m = layer()
    x = torch.randn(3, 7, 6)
    base = x @ m.weight.T + m.bias
    assert torch.equal(m(x), base)  # B = 0 at init
    assert torch.equal(m.gate.g, torch.zeros(4))
    with torch.no_grad():
        m.lora_B.normal_()
    plain = base + m.scaling * (x @ m.lora_A.T) @ m.lora_B.T
    assert (m(x) - plain).abs().max() < 1e-5
    with torch.no_grad():
        m.gate.g.fill_(3.0)  # equal scores, any value: s = 1
    assert (m(x) - plain).abs().max() < 1e-5
    with torch.no_grad():
        m.gate.g.copy_(torch.tensor([0.1, 0.0, -0.05, 0.02]))
    s = 4 * torch.softmax(m.gate.g / 0.05, 0)
    want = base + m.scaling * ((x @ m.lora_A.T) * s) @ m.lora_B.T
    assert (m(x) - want).abs().max() < 1e-5
    assert (m(x) - plain).abs().max() > 1e-3


def test_gradients_reach_adapters_not_base():
    m = layer()
    with torch.no_grad():
        m.lora_B.normal_()
    m(torch.randn(8, 6)).pow(2).sum().backward()
    for p in (m.lora_A, m.lora_B, m.gate.g):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not m.weight.requires_grad and m.weight.grad is None


def test_fp32_adapters_on_bf16_base():
    lin = nn.Linear(6, 5).to(torch.bfloat16)
    m = beamlora.add_scores({"m": LoRALinear(lin, r=2, alpha=4)}, tau=0.05)["m"]
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.dtype == torch.float32
    y = m(torch.randn(3, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_B.grad.dtype == torch.float32


def tiny_model():
    from model import Transformer
    cfg = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return Transformer.from_config(cfg)


def test_apply_lora_wraps_by_name_keeps_keys_and_freezes():
    model = tiny_model()
    keys = set(model.state_dict())
    mods = beamlora.add_scores(apply_lora(model, ["q_proj", "down_proj"], r=4, alpha=8), tau=0.05)
    assert sorted(mods) == [f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "self_attn.q_proj")]
    assert keys <= set(model.state_dict())  # base keys unchanged: checkpoints still line up
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{n}.{w}" for n in mods for w in ("lora_A", "lora_B", "gate.g"))
    assert beamlora.lora_modules(model).keys() == mods.keys()


def test_apply_lora_errors():
    with pytest.raises(ValueError, match="unknown target module.*qproj.*the model's linears are: .*q_proj"):
        apply_lora(tiny_model(), ["qproj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="r=40 does not fit model.layers.0.self_attn.k_proj"):
        apply_lora(tiny_model(), ["k_proj"], r=40, alpha=8)


# ---------------------------------------------------------------------------------------------
# which ranks (dyadic scores so the sums are exact)

A_S = torch.tensor([2.5, 1.0, 0.25, 0.25])
B_S = torch.tensor([1.5, 1.25, 0.75, 0.5])


def test_select_global_cumulative_rule():
    # sorted: a0 2.5, b0 1.5, b1 1.25, a1 1.0, b2 .75, b3 .5, a2 .25, a3 .25; cumsum 2.5 4 5.25 6.25 7 7.5 7.75 8
    # p = .875: threshold 7.0; the cumsum equals 7.0 at b2 (not > 7), first exceeds at b3 -> b3, a2, a3 pruned
    assert select_ranks({"a": A_S, "b": B_S}, 0.875) == {"a": 2, "b": 1}
    # p = .75: threshold 6; first exceeds at a1 -> a1 a2 a3 (3, capped to r/2 = 2) and b2 b3
    assert select_ranks({"a": A_S, "b": B_S}, 0.75) == {"a": 2, "b": 2}
    # p = .95: threshold 7.6: only a2? cumsum at a2 is 7.75 > 7.6 -> a2, a3 pruned
    assert select_ranks({"a": A_S, "b": B_S}, 0.95) == {"a": 2, "b": 0}


def test_select_module_scope():
    # p = .875 per module: a cumsum 2.5 3.5 3.75 4 vs 3.5 -> a2 a3; b 1.5 2.75 3.5 4 vs 3.5 -> b3
    assert select_ranks({"a": A_S, "b": B_S}, 0.875, "module") == {"a": 2, "b": 1}
    # p = .95 (3.8): a: 3.75 not > 3.8, 4 > 3.8 -> a3 only; b: 4 > 3.8 -> b3
    assert select_ranks({"a": A_S, "b": B_S}, 0.95, "module") == {"a": 1, "b": 1}
    # the same p globally gives b nothing: the scopes differ
    assert select_ranks({"a": A_S, "b": B_S}, 0.95, "global") != select_ranks({"a": A_S, "b": B_S}, 0.95, "module")


def test_select_p1_ties_and_cap():
    assert select_ranks({"a": A_S, "b": B_S}, 1.0) == {"a": 0, "b": 0}
    ones = torch.ones(8)
    # equal scores, p = .8: cumsum 1..8 vs 6.4 -> positions 7, 8 pruned (the last two in index order)
    assert select_ranks({"a": ones}, 0.8) == {"a": 2}
    assert select_ranks({"a": ones}, 0.3) == {"a": 4}  # 6 selected, capped at r/2
    assert select_ranks({"a": torch.tensor([3.0, 0.5, 0.25, 0.25])}, 0.01) == {"a": 2}


def test_threshold_cosine():
    assert threshold(0, 0.9, 100) == 0.9
    assert abs(threshold(50, 0.9, 100) - 0.95) < 1e-12
    t = 30
    assert abs(threshold(t, 0.9, 100) - (0.9 + 0.1 * (1 - math.cos(math.pi * t / 100)) / 2)) < 1e-12
    assert threshold(100, 0.9, 100) == 1.0 and threshold(150, 0.9, 100) == 1.0
    assert threshold(150, 0.9, 100, static=True) == 0.9


# ---------------------------------------------------------------------------------------------
# one prune / expand, element by element

def setup_op(**kw):
    m = layer(r=8, in_f=6, out_f=5)
    opt = adamw_with_state(list(m.parameters()))
    # scores: rank 0 strongest ... rank 7 weakest; s = 8 softmax(g / tau)
    with torch.no_grad():
        m.gate.g.copy_(torch.tensor([0.20, 0.18, 0.16, 0.14, 0.12, 0.10, 0.02, 0.0]))
    ctl = BeamController({"m": m}, opt, dt=4, p_init=0.9, end_step=1000, total_steps=1000, **kw)
    return m, opt, ctl


def state_of(m, opt):
    st = {"A": m.lora_A, "B": m.lora_B, "g": m.gate.g}
    for k, p in list(st.items()):
        st[k + "1"], st[k + "2"] = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
    return {k: v.detach().clone() for k, v in st.items()}


def perturb(m, opt, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.lora_A, m.lora_B):
            p.add_(torch.randn(p.shape, generator=g))
            opt.state[p]["exp_avg"].add_(torch.randn(p.shape, generator=g))
            opt.state[p]["exp_avg_sq"].add_(torch.rand(p.shape, generator=g))


def test_prune_expand_element_by_element():
    m, opt, ctl = setup_op()
    assert ctl.step(2) is None and ctl.snapshot is not None  # snapshot at t % dt == dt / 2
    hist = state_of(m, opt)
    perturb(m, opt, 5)  # the current values differ from the snapshot
    cur = state_of(m, opt)
    ev = ctl.step(4)
    P, E = ev["modules"]["m"]["pruned"], ev["modules"]["m"]["sources"]
    k = select_ranks({"m": 8 * torch.softmax(cur["g"] / 0.05, 0)}, ev["p"])["m"]
    assert k >= 1 and len(P) == len(E) == k
    assert sorted(P) == list(range(8 - k, 8)) and sorted(E) == list(range(k))  # lowest / highest scores
    new = state_of(m, opt)
    for pj, ej in zip(P, E):
        for w in ("A", "A1", "A2"):
            assert torch.equal(new[w][pj], hist[w][ej])  # historical copies, moments included
        for w in ("B", "B1", "B2"):
            assert torch.equal(new[w][:, pj], hist[w][:, ej])
        avg = (cur["g"][pj] + cur["g"][ej]) / 2
        assert new["g"][pj] == avg and new["g"][ej] == avg
    assert torch.equal(new["g1"], torch.zeros(8)) and torch.equal(new["g2"], torch.zeros(8))
    untouched = [i for i in range(8) if i not in P]  # sources and the rest keep current values bit for bit
    for w in ("A", "A1", "A2"):
        assert torch.equal(new[w][untouched], cur[w][untouched])
    for w in ("B", "B1", "B2"):
        assert torch.equal(new[w][:, untouched], cur[w][:, untouched])
    rest = [i for i in range(8) if i not in P and i not in E]
    assert torch.equal(new["g"][rest], cur["g"][rest])


def test_inherit_moments_keep_is_the_authors_code():
    # two modules, global scope: "m" has spread scores and loses ranks, "q" (all s about 1, above m's weak
    # ranks in the global order) keeps all of them
    results = {}
    for mode in ("history", "keep"):
        m, q = layer(r=8, seed=8), layer(r=8, seed=9)
        mods = {"m": m, "q": q}
        opt = adamw_with_state(list(m.parameters()) + list(q.parameters()), seed=4)
        with torch.no_grad():
            m.gate.g.copy_(torch.tensor([0.20, 0.18, 0.16, 0.14, 0.12, 0.10, 0.02, 0.0]))
        ctl = BeamController(mods, opt, dt=4, p_init=0.9, end_step=1000, total_steps=1000, inherit_moments=mode)
        ctl.step(2)
        hist = state_of(m, opt)
        perturb(m, opt, 5)
        cur, cur_q = state_of(m, opt), state_of(q, opt)
        ev = ctl.step(4)
        assert list(ev["modules"]) == ["m"]
        P, E = ev["modules"]["m"]["pruned"], ev["modules"]["m"]["sources"]
        new, new_q = state_of(m, opt), state_of(q, opt)
        for pj, ej in zip(P, E):
            assert torch.equal(new["A"][pj], hist["A"][ej]) and torch.equal(new["B"][:, pj], hist["B"][:, ej])
            for w in ("A1", "A2"):  # history: the source's historical moments; keep: the rank's own, untouched
                assert torch.equal(new[w][pj], hist[w][ej] if mode == "history" else cur[w][pj])
            for w in ("B1", "B2"):
                assert torch.equal(new[w][:, pj], hist[w][:, ej] if mode == "history" else cur[w][:, pj])
        assert torch.equal(new["g1"], torch.zeros(8)) and torch.equal(new["g2"], torch.zeros(8))
        # the score moments of a module with nothing pruned: zeroed by the authors' code only
        zeroed = torch.equal(new_q["g1"], torch.zeros(8)) and torch.equal(new_q["g2"], torch.zeros(8))
        assert zeroed == (mode == "keep") and (mode == "keep" or torch.equal(new_q["g1"], cur_q["g1"]))
        results[mode] = ev
    assert results["history"]["modules"]["m"]["pruned"] == results["keep"]["modules"]["m"]["pruned"]


def test_sources_randomly_paired():
    pairings = set()
    for seed in range(6):
        m, opt, ctl = setup_op(seed=seed)
        ctl.step(2)
        ev = ctl.step(4)
        pairings.add(tuple(ev["modules"]["m"]["sources"]))
    assert len(pairings) > 1


def test_ablation_no_history_copies_current():
    m, opt, ctl = setup_op(no_history=True)
    assert ctl.step(2) is None and ctl.snapshot is None
    cur = state_of(m, opt)
    ev = ctl.step(4)
    new = state_of(m, opt)
    for pj, ej in zip(ev["modules"]["m"]["pruned"], ev["modules"]["m"]["sources"]):
        assert torch.equal(new["A"][pj], cur["A"][ej]) and torch.equal(new["B1"][:, pj], cur["B1"][:, ej])


def test_ablation_no_expand_zeroes():
    m, opt, ctl = setup_op(no_expand=True)
    ctl.step(2)
    cur = state_of(m, opt)
    ev = ctl.step(4)
    new = state_of(m, opt)
    P = ev["modules"]["m"]["pruned"]
    assert P and new["A"][P].abs().sum() == 0 and new["B"][:, P].abs().sum() == 0
    assert new["A1"][P].abs().sum() == 0 and new["B2"][:, P].abs().sum() == 0
    keep = [i for i in range(8) if i not in P]
    assert torch.equal(new["A"][keep], cur["A"][keep]) and torch.equal(new["g"], cur["g"])


def test_ablation_random_assessment():
    lowest = set()
    for seed in range(8):
        m, opt, ctl = setup_op(random_assess=True, seed=seed)
        ref_k = select_ranks({"m": m.rank_scale()}, ctl.threshold(4))["m"]
        ctl.step(2)
        ev = ctl.step(4)
        P, E = ev["modules"]["m"]["pruned"], ev["modules"]["m"]["sources"]
        assert len(P) == ref_k and not set(P) & set(E)
        lowest.add(tuple(sorted(P)) == tuple(range(8 - ref_k, 8)))
    assert False in lowest  # not always the lowest-score ranks


def test_controller_rejects_bad_setup():
    m = layer()
    with pytest.raises(ValueError, match="SGD has none"):
        BeamController({"m": m}, torch.optim.SGD(m.parameters(), lr=0.1), 4, 0.9, 10, 20)
    opt = torch.optim.AdamW(m.parameters())
    for kw, msg in ((dict(dt=1), "dt=1"), (dict(p_init=1.0), "p_init=1.0"), (dict(p_init=0.0), "p_init=0.0"),
                    (dict(scope="layer"), "scope")):
        args = dict(dt=4, p_init=0.9, end_step=10, total_steps=20) | kw
        with pytest.raises(ValueError, match=msg):
            BeamController({"m": m}, opt, **args)
    with pytest.raises(ValueError, match="Score gate"):
        BeamController({"m": layer(beam=False)}, opt, 4, 0.9, 10, 20)


# ---------------------------------------------------------------------------------------------
# the schedule over a training run, and resume

def train_run(total=40, dt=6, end_step=26, stop_at=None, resume_from=None, **kw):
    """Regression with two BeamLoRA layers; returns the events, per-step snapshots and states."""
    torch.manual_seed(0)
    mods = {"a": layer(r=4, seed=1, in_f=8, out_f=8), "b": layer(r=4, seed=2, in_f=8, out_f=3)}
    net = nn.Sequential(mods["a"], nn.Tanh(), mods["b"])
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    ctl = BeamController(mods, opt, dt=dt, p_init=0.9, end_step=end_step, total_steps=total, seed=3, **kw)
    start = 0
    if resume_from is not None:
        net.load_state_dict(resume_from["net"])
        opt.load_state_dict(resume_from["opt"])
        ctl.load_state_dict(resume_from["ctl"])
        start = resume_from["step"]
    data = torch.Generator().manual_seed(4)
    xs = [torch.randn(16, 8, generator=data) for _ in range(total)]
    w = torch.randn(8, 3, generator=data)
    events, snaps, losses = [], [], []
    for t in range(start + 1, total + 1):
        loss = (net(xs[t - 1]) - xs[t - 1] @ w).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        before = ctl.snapshot_step
        ev = ctl.step(t)
        if ctl.snapshot_step != before:
            snaps.append(t)
        if ev is not None:
            events.append(ev)
        if t == stop_at:
            return {"net": copy.deepcopy(net.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                    "ctl": copy.deepcopy(ctl.state_dict()), "step": t}
    return events, snaps, losses, net.state_dict()


def test_schedule_snapshots_and_operations():
    events, snaps, losses, _ = train_run()
    # dt = 6, end 26, total 40: operations at 6, 12, 18, 24 (p < 1; 30 and 36 are past the end step)
    assert [e["step"] for e in events] == [6, 12, 18, 24]
    assert snaps == [3, 9, 15, 21]
    for e in events:
        assert e["p"] == threshold(e["step"], 0.9, 26)
    assert sum(len(m["pruned"]) for e in events for m in e["modules"].values()) > 0
    # static p keeps operating after the end step, but never in the last dt steps
    events, snaps, _, _ = train_run(static_p=True)
    assert [e["step"] for e in events] == [6, 12, 18, 24, 30] and snaps == [3, 9, 15, 21, 27]
    assert all(e["p"] == 0.9 for e in events)


def test_snapshot_held_only_until_its_operation():
    # taken at 9 for the operation at 12, then freed (memory, checkpoint size); 15 for 18
    assert train_run(stop_at=10)["ctl"]["snapshot"] is not None
    assert train_run(stop_at=13)["ctl"]["snapshot"] is None
    assert train_run(stop_at=16)["ctl"]["snapshot"] is not None


def test_resume_takes_the_same_decisions():
    full_events, _, full_losses, full_state = train_run()
    mid = train_run(stop_at=14)  # after the snapshot at 9 and the operation at 12, before 15 / 18
    events, _, losses, state = train_run(resume_from=mid)
    assert losses == full_losses[14:]
    assert events == [e for e in full_events if e["step"] > 14]
    for k in full_state:
        assert torch.equal(state[k], full_state[k]), k
    # the snapshot itself is part of the state: resuming between snapshot and operation
    mid = train_run(stop_at=16)
    events, _, losses, state = train_run(resume_from=mid)
    assert events == [e for e in full_events if e["step"] > 16] and losses == full_losses[16:]


def test_rank_importance_is_frobenius_of_each_rank_update():
    model = tiny_model()
    beamlora.add_scores(apply_lora(model, ["v_proj"], r=4, alpha=8), tau=0.05)
    m = beamlora.lora_modules(model)["model.layers.0.self_attn.v_proj"]
    with torch.no_grad():
        m.lora_B.normal_()
        m.gate.g.normal_(std=0.05)
    imp = beamlora.rank_importance(model)["model.layers.0.self_attn.v_proj"]
    s = m.rank_scale().detach()
    for i in range(4):
        full = torch.outer(m.lora_B[:, i], m.lora_A[i]) * s[i]
        assert abs(imp["norm"][i] - full.norm()) < 1e-5
    assert torch.allclose(imp["score"], s)


# ---------------------------------------------------------------------------------------------
# export: PEFT and transformers as references

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def hf_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    path = str(tmp_path / "base")
    hf.save_pretrained(path)
    return path


def trained_like(model):
    torch.manual_seed(7)
    with torch.no_grad():
        for m in beamlora.lora_modules(model).values():
            m.lora_B.normal_(std=0.05)
            if m.gate is not None:
                m.gate.g.normal_(std=0.05)


def test_export_loads_in_peft_and_merge_loads_everywhere(tmp_path):
    from model import Transformer
    from transformers import AutoModelForCausalLM
    base = hf_checkpoint(tmp_path)
    ours = Transformer.from_pretrained(base)
    beamlora.add_scores(apply_lora(ours, beamlora.TARGETS, r=8, alpha=16), tau=0.05)
    trained_like(ours)
    x = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(x)
        assert (want - Transformer.from_pretrained(base)(x)).abs().max() > 1e-3  # the adapter matters
    peft_io.export_peft(ours, str(tmp_path / "adapter"), base)
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == sorted(beamlora.TARGETS)
    hf = AutoModelForCausalLM.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (pm(x).logits - want).abs().max() <= 1e-4
    # our loader reads the same adapter back (scores folded: a plain LoRA)
    again = peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert (again(x) - want).abs().max() <= 1e-4
    # merged checkpoint: our model and transformers agree with the adapter model
    peft_io.merge_lora(ours)
    assert not beamlora.lora_modules(ours)
    assert set(ours.state_dict()) == set(Transformer.from_pretrained(base).state_dict())
    ours.save_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        assert (Transformer.from_pretrained(str(tmp_path / "merged"))(x) - want).abs().max() <= 1e-4
        assert (AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))(x).logits - want).abs().max() <= 1e-4


def test_load_adapter_saved_by_peft(tmp_path):
    from model import Transformer
    from transformers import AutoModelForCausalLM
    base = hf_checkpoint(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(base)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 task_type="CAUSAL_LM"))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(str(tmp_path / "peft_adapter"))
    pm.eval()
    ours = peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "peft_adapter"))
    assert len(beamlora.lora_modules(ours)) == 6
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pm(x).logits
        assert (ours(x) - ref).abs().max() <= 1e-4
        assert (AutoModelForCausalLM.from_pretrained(base)(x).logits - ref).abs().max() > 1e-3


def test_load_adapter_bad_dirs(tmp_path):
    from model import Transformer
    base = hf_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="adapter_config.json: not found"):
        peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path))
    ours = Transformer.from_pretrained(base)
    apply_lora(ours, ["q_proj"], r=4, alpha=8)
    peft_io.export_peft(ours, str(tmp_path / "ad"), base)
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    cfg["r"] = 2
    json.dump(cfg, open(tmp_path / "ad" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="expected \\(2, 64\\)"):
        peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "ad"))


class FixedScale(nn.Module):
    """A gate with given per-rank scales, some exactly 0: the shape LR-LoRA's and AdaLoRA's pruned ranks take."""

    def __init__(self, s):
        super().__init__()
        self.register_buffer("s", s)

    def forward(self):
        return self.s


def test_export_drops_zero_ranks_with_rank_pattern_and_pads(tmp_path):
    from model import Transformer
    from transformers import AutoModelForCausalLM
    base = hf_checkpoint(tmp_path)
    ours = Transformer.from_pretrained(base)
    mods = apply_lora(ours, ["q_proj", "v_proj", "up_proj"], r=6, alpha=12)
    trained_like(ours)
    g = torch.Generator().manual_seed(5)
    for i, (name, m) in enumerate(mods.items()):  # 6, 4, 2, 0 ... ranks kept, the rest exactly zero
        keep = [6, 4, 2, 0, 3, 6][i]
        m.gate = FixedScale(torch.cat([torch.rand(keep, generator=g) + 0.5, torch.zeros(6 - keep)]))
    x = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(x)
    peft_io.export_peft(ours, str(tmp_path / "ad"), base)
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["r"] == 6 and cfg["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 4,
                                                     "model.layers.0.mlp.up_proj": 2,
                                                     "model.layers.1.self_attn.q_proj": 1,  # none kept: one zero rank
                                                     "model.layers.1.self_attn.v_proj": 3}
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "ad")).eval()
    assert pm.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight.shape == (2, 64)
    again = peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "ad"))
    with torch.no_grad():
        assert (pm(x).logits - want).abs().max() <= 1e-5 * want.abs().max()
        assert (again(x) - want).abs().max() <= 1e-5 * want.abs().max()
    # one uniform rank, zero-padded
    peft_io.export_peft(ours, str(tmp_path / "pad"), base, uniform_rank=8)
    cfg = json.load(open(tmp_path / "pad" / "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {}
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "pad")).eval()
    with torch.no_grad():
        assert (pm(x).logits - want).abs().max() <= 1e-5 * want.abs().max()
    with pytest.raises(ValueError, match="rank=3"):
        peft_io.export_peft(ours, str(tmp_path / "small"), base, uniform_rank=3)


def test_rslora_scaling_exports_and_loads(tmp_path):
    from model import Transformer
    from transformers import AutoModelForCausalLM
    base = hf_checkpoint(tmp_path)
    ours = Transformer.from_pretrained(base)
    mods = apply_lora(ours, ["k_proj", "down_proj"], r=4, alpha=8, rslora=True)
    assert all(m.scaling == 8 / 2 for m in mods.values())  # alpha / sqrt(r)
    trained_like(ours)
    peft_io.export_peft(ours, str(tmp_path / "ad"), base)
    assert json.load(open(tmp_path / "ad" / "adapter_config.json"))["use_rslora"] is True
    x = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        want = ours(x)
        assert (pm(x).logits - want).abs().max() <= 1e-5 * want.abs().max()
        assert (peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "ad"))(x) - want).abs().max() \
            <= 1e-5 * want.abs().max()


def test_load_peft_adapter_with_rank_and_alpha_patterns(tmp_path):
    from model import Transformer
    from transformers import AutoModelForCausalLM
    base = hf_checkpoint(tmp_path)
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"], task_type="CAUSAL_LM",
        rank_pattern={"o_proj": 2, "model.layers.1.self_attn.q_proj": 6}, alpha_pattern={"gate_proj": 3}))
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(str(tmp_path / "pp"))
    ours = peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "pp"))
    mods = beamlora.lora_modules(ours)
    assert mods["model.layers.1.self_attn.q_proj"].r == 6 and mods["model.layers.0.self_attn.o_proj"].r == 2
    assert mods["model.layers.0.mlp.gate_proj"].scaling == 3 / 4
    x = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pm.eval()(x).logits
        assert (ours(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("change, message", [({"r": None}, "'r' must be a positive number"),
                                             ({"lora_alpha": "lots"}, "'lora_alpha' must be"),
                                             ({"use_dora": True}, "lacks one of .*lora_magnitude_vector")])
def test_load_adapter_bad_config_values(tmp_path, change, message):
    from model import Transformer
    base = hf_checkpoint(tmp_path)
    ours = Transformer.from_pretrained(base)
    apply_lora(ours, ["q_proj"], r=4, alpha=8)
    peft_io.export_peft(ours, str(tmp_path / "ad"), base)
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    json.dump(cfg, open(tmp_path / "ad" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=message):
        peft_io.load_adapter(Transformer.from_pretrained(base), str(tmp_path / "ad"))
