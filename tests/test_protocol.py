# The method protocol (lora.py) and the Controller every method shares (beamlora.py): train.py tests no method
# name, every method module resolves to the same hooks, each method refuses a bad setting before anything is
# loaded, and what the controllers share (due, moments, events, state for resume) behaves as written.
import ast
import os

import pytest
import torch
import torch.nn as nn

import beamlora
import lrlora
import train
from configurator import ConfigError
from conftest import ROOT


def test_train_py_tests_no_method_name():
    """No comparison in train.py's code has a method's name on either side (`cfg["method"] == "relora"`,
    `in ("pissa", "milora")`): what differs between methods is in their modules."""
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set(train.METHODS)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts = [c.value for c in ast.walk(side) if isinstance(c, ast.Constant)]
                found += [(node.lineno, c) for c in consts if c in names]
        if isinstance(node, ast.Dict):  # a table keyed by method name is a branch per method too
            found += [(node.lineno, k.value) for k in node.keys if isinstance(k, ast.Constant) and k.value in names]
    assert found == []


def test_every_method_resolves_to_every_hook():
    for name, module in train.METHODS.items():
        hooks = train.method_hooks(dict(train.DEFAULTS, method=name))
        for h in train.HOOKS:
            assert getattr(hooks, h) is getattr(module, h, getattr(train.lora, h)), (name, h)
        assert name == module.__name__ and hooks.SHIPS in ("adapter", "merged", "model")


BAD = [  # (method, settings, what the one error line must name)
    ("beamlora", dict(tau=0.0), "--tau=0.0"),
    ("beamlora", dict(dt=3), "--dt=3"),
    ("beamlora", dict(scope="layer"), "--scope=layer"),
    ("adalora", dict(orth="fro"), "--orth=fro"),
    ("adalora", dict(rslora=True), "--rslora"),
    ("adalora", dict(r=8, init_r=4), "--init_r=4"),
    ("adalora", dict(ipt_beta1=1.0), "--ipt_beta1=1.0"),
    ("increlora", dict(rslora=True), "--rslora"),
    ("increlora", dict(r=8, max_r=6), "--max_r=6"),
    ("increlora", dict(top_h=0), "--top_h=0"),
    ("relora", dict(relora_prune=1.0), "--relora_prune=1.0"),
    ("relora", dict(relora_steps=10, relora_warmup=20), "--relora_warmup=20"),
    ("lrlora", dict(r=8, r_max=4), "--r_max=4"),
    ("lrlora", dict(r=8, r_init=20.0), "--r_init=20.0"),
    ("lrlora", dict(temp_start=0.1, temp_end=0.5), "--temp_end=0.5"),
    ("full", dict(dora=True), "--dora"),
    ("relora", dict(dora=True), "--dora"),
]


@pytest.mark.parametrize("method,bad,named", BAD, ids=[f"{m}-{'-'.join(b)}" for m, b, _ in BAD])
def test_bad_method_setting_fails_before_loading(method, bad, named, tmp_path):
    """check_config runs before anything is read or written: a bad setting of the method that runs is one line."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "q", "response": "r"}\n')
    cfg = dict(train.DEFAULTS, method=method, init_from=str(tmp_path), data=str(data), out_dir=str(tmp_path / "o"),
               **bad)
    with pytest.raises(ConfigError, match="^" + named.replace("+", r"\+")):
        train.check_config(cfg)
    ok = dict(cfg, **{k: train.DEFAULTS[k] for k in bad}, method="lora")
    train.check_config(ok)  # the same settings with a method's defaults pass


def test_due_is_the_schedule_test():
    got = [t for t in range(0, 25) if beamlora.due(t, 4, after=5, before=20)]
    assert got == [8, 12, 16]
    assert [t for t in range(0, 9) if beamlora.due(t, 2)] == [2, 4, 6, 8]  # never step 0


def test_moments_are_the_optimizers_own_tensors():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    assert beamlora.adam_moments(opt, p, required=False) == []
    with pytest.raises(ValueError, match="AdamW state"):
        beamlora.adam_moments(opt, p)
    p.grad = torch.ones(3)
    opt.step()
    m1, m2 = beamlora.adam_moments(opt, p)
    m1.zero_()  # written in place: the optimizer sees it
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3)) and m2 is opt.state[p]["exp_avg_sq"]


def test_event_keeps_its_key_order():
    assert list(beamlora.event(7, "merge", "n", cycle=2, frac=0.5)) == ["step", "kind", "cycle", "frac", "note"]


class Counter(beamlora.Controller):
    name, state = "counter", ("gen", "count")

    def __init__(self, every):
        super().__init__()
        self.every, self.count, self.gen = every, 0, torch.Generator().manual_seed(0)

    def step(self, t):
        if beamlora.due(t, self.every):
            self.count += int(torch.randint(10, (1,), generator=self.gen))
        return None

    def config(self):
        return {"every": self.every}


def test_controller_state_round_trip_and_schedule_check():
    a = Counter(2)
    for t in range(1, 6):
        a.step(t)
    b = Counter(2)
    b.load_state_dict(a.state_dict())
    for t in range(6, 12):
        a.step(t)
        b.step(t)
    assert a.count == b.count and torch.equal(a.gen.get_state(), b.gen.get_state())
    with pytest.raises(ValueError, match="counter: the schedule of the checkpoint"):
        Counter(3).load_state_dict(a.state_dict())
    assert beamlora.Controller().state_dict() == {}  # nothing saved where there is nothing (LoRA, full)


def test_lrlora_price_after_a_resume_equals_the_uninterrupted_runs():
    """The controller finds rho's optimizer group again after the optimizer's state is loaded (which replaces
    its groups), so the logged price is divided by the current lr, not by the peak lr of a stale group."""
    def build():
        torch.manual_seed(0)
        mods = {f"model.layers.{i}.mlp.up_proj": beamlora.LoRALinear(nn.Linear(10, 6), r=8, alpha=8.0)
                for i in range(2)}
        lrlora.add_masks(mods, r=4, r_init=4.0)
        cfg = dict(train.DEFAULTS, lr=1e-2)
        opt = train.make_optimizer([p for m in mods.values() for p in m.parameters() if p.requires_grad], cfg)
        return mods, opt, lrlora.RankController(mods, opt, budget_rank=4, total_steps=20, lr=1e-2)

    def run(mods, opt, ctl, steps, lrs):
        for t in steps:
            for g in opt.param_groups:
                g["lr"] = lrs[t] * g.get("lr_scale", 1.0)
            loss = sum(m(torch.ones(3, 10)).square().sum() for m in mods.values())
            loss.backward()
            opt.step()
            ctl.step(t + 1)
            opt.zero_grad()
        return ctl.price

    lrs = [1e-2 * (0.8 ** t) for t in range(20)]  # a falling lr: a stale group's peak would show
    whole = run(*build(), range(10), lrs)
    mods, opt, ctl = build()
    run(mods, opt, ctl, range(5), lrs)
    saved = {"opt": opt.state_dict(), "ctl": ctl.state_dict(), "params": [p.detach().clone() for p in
                                                                          opt.param_groups[0]["params"]]}
    mods2, opt2, ctl2 = build()
    with torch.no_grad():
        for p, q in zip(opt2.param_groups[0]["params"], saved["params"]):
            p.copy_(q)
        for m2, m in zip(mods2.values(), mods.values()):
            m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(saved["opt"])
    ctl2.load_state_dict(saved["ctl"])
    assert run(mods2, opt2, ctl2, range(5, 10), lrs) == whole
