# train.py across kills and restarts: a run SIGKILLed at several points and resumed ends with the same
# adapter, checkpoint tensors and records as one never killed; --resume refuses any changed setting (naming
# it) but the few that may change, and any changed input file; a fresh run never overwrites a run.
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import rundir
import train
from configurator import ConfigError
from conftest import ROOT
from test_train import cfg_for  # base, demo_data: fixtures in conftest.py

TIMING = ("tok_s", "mfu", "mem_gib")  # the log fields that measure the machine, not the run


def argv_of(cfg):
    return [f"--{k}={v}" for k, v in cfg.items() if v != train.DEFAULTS[k]]


def python(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the same threads in every process: bitwise equal runs
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def tree(d):
    """{relative path: bytes} of every file under d."""
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


def rows(path, drop=()):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f if line.endswith("\n")]


def ckpt(d):
    ck = torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)
    ck["config"] = {k: v for k, v in json.loads(ck["config"]).items() if k not in train.MAY_CHANGE_ON_RESUME}
    return ck


def same(a, b):
    """Nested dicts / lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(ref, out, log_too=True):
    assert tree(ref / "adapter") == tree(out / "adapter")  # byte for byte
    a, b = ckpt(ref), ckpt(out)
    assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a), [k for k in a if not same(a[k], b[k])]
    for name in ("events.jsonl", "scores.jsonl"):
        assert open(ref / name, "rb").read() == open(out / name, "rb").read(), name
    if log_too:
        assert rows(ref / "log.jsonl", TIMING) == rows(out / "log.jsonl", TIMING)


# ---------------------------------------------------------------------------------------------
# killed and resumed

def test_killed_anywhere_then_resumed_equals_uninterrupted(base, demo_data, tmp_path):
    # a real SIGKILL of a subprocess at each point (tests/kill_run.py wraps the writers; train.py has no hook).
    # dt = 4: operations at 4, 8, 12; rows of log.jsonl every 3 steps, of scores.jsonl every 5; checkpoints every 5
    kw = dict(max_steps=16, dt=4, p_init=0.6, end_step=16, dropout=0.1, log_interval=3, score_log_interval=5,
              save_interval=5)
    ref, out = tmp_path / "ref", tmp_path / "run"
    kill_run = os.path.join(ROOT, "tests", "kill_run.py")

    def go(where, at, d, resume):
        proc = python(kill_run, where, str(at), *argv_of(cfg_for(base, demo_data, d, resume=resume, **kw)))
        assert proc.returncode == (0 if where == "none" else -signal.SIGKILL), proc.stderr[-3000:]
        return torch.load(d / "ckpt.pt", weights_only=True)["step"] if os.path.exists(d / "ckpt.pt") else None

    steps = lambda name: [r["step"] for r in rows(out / name)]  # noqa: E731
    assert go("none", 0, ref, False) == 16
    # right after the operation of step 8: its event is in events.jsonl, the checkpoint is step 5's
    assert go("event", 8, out, False) == 5 and steps("events.jsonl") == [4, 8] and steps("log.jsonl") == [3, 6]
    # half-way through writing step 10's checkpoint: ckpt.pt is still step 5's, the rows of 6 .. 10 are written
    assert go("ckpt", 10, out, True) == 5 and os.path.getsize(out / "ckpt.pt.tmp") > 0
    assert steps("events.jsonl") == [4, 8] and steps("log.jsonl") == [3, 6, 9] and steps("scores.jsonl") == [1, 5, 10]
    # half-way through log.jsonl's row of step 12, after step 12's operation
    assert go("record", 12, out, True) == 10 and steps("events.jsonl") == [4, 8, 12]
    assert not open(out / "log.jsonl", "rb").read().endswith(b"\n")
    # right after step 15's checkpoint replaced step 10's
    assert go("saved", 15, out, True) == 15
    # after the final checkpoint, half-way through writing the adapter
    assert go("export", 16, out, True) == 16 and not os.path.exists(out / "adapter" / "adapter_config.json")
    assert go("none", 0, out, True) == 16
    assert_same_run(ref, out)
    assert steps("events.jsonl") == [4, 8, 12] and steps("scores.jsonl") == [1, 5, 10, 15]
    assert sorted(tree(out)) == sorted(tree(ref))  # no temp file left behind


def test_resume_with_a_new_log_interval_gives_the_same_run(base, demo_data, tmp_path):
    kw = dict(max_steps=12, dt=4, p_init=0.6, end_step=12, dropout=0.1, log_interval=4, score_log_interval=3)
    train.train(cfg_for(base, demo_data, tmp_path / "full", **kw))
    train.train(cfg_for(base, demo_data, tmp_path / "part", stop_after=6, **kw))  # between rows: 5, 6 pending
    train.train(cfg_for(base, demo_data, tmp_path / "part", resume=True, **dict(kw, log_interval=2)))
    assert_same_run(tmp_path / "full", tmp_path / "part", log_too=False)
    full = {r["step"]: r for r in rows(tmp_path / "full" / "log.jsonl")}
    part = {r["step"]: r for r in rows(tmp_path / "part" / "log.jsonl")}
    assert sorted(full) == [4, 8, 12] and sorted(part) == [4, 8, 10, 12]
    assert part[8]["loss"] == full[8]["loss"]  # the first row after the resume averages steps 5 .. 8, as unbroken


def test_a_fresh_run_refuses_a_used_out_dir_and_overwrite_starts_over(base, demo_data, tmp_path):
    cfg = cfg_for(base, demo_data, tmp_path / "out", max_steps=6, dt=2, end_step=6, score_log_interval=2)
    train.train(cfg)
    shutil.copytree(tmp_path / "out", tmp_path / "first")
    with pytest.raises(ConfigError, match="already holds a run .*--resume continues it, --overwrite deletes it"):
        train.train(cfg)
    assert tree(tmp_path / "out") == tree(tmp_path / "first")
    train.train(dict(cfg, overwrite=True))
    assert_same_run(tmp_path / "first", tmp_path / "out")  # each record once, as the first time


# ---------------------------------------------------------------------------------------------
# --resume with other settings

@pytest.fixture(scope="module")
def stopped(base, demo_data, tmp_path_factory):
    """A run stopped after one step: its checkpoint is what each case tries to resume."""
    cfg = cfg_for(base, demo_data, tmp_path_factory.mktemp("stopped"), max_steps=8, stop_after=1)
    train.train(cfg)
    return cfg


CHANGED = [dict(r=2), dict(alpha=4.0), dict(rslora=True), dict(dropout=0.1), dict(targets="q_proj,v_proj"),
           dict(method="lora"), dict(tau=0.1), dict(dt=2), dict(p_init=0.8), dict(end_step=6), dict(scope="module"),
           dict(no_expand=True), dict(random_assess=True), dict(static_p=True), dict(no_history=True),
           dict(inherit_moments="keep"), dict(lr=0.5), dict(min_lr=1e-3), dict(schedule="linear"),
           dict(warmup_steps=2), dict(warmup_ratio=0.1), dict(weight_decay=0.1), dict(beta2=0.99), dict(grad_clip=0.5),
           dict(batch_size=4), dict(micro_batch_size=2), dict(max_steps=9), dict(epochs=2), dict(seed=4),
           dict(max_len=256), dict(dtype="bfloat16"), dict(tokenizer="{base}"), dict(data="{copy}"),
           dict(val_data="{test}")]


@pytest.mark.parametrize("change", CHANGED, ids=lambda c: next(iter(c)))
def test_resume_refuses_a_changed_setting(stopped, demo_data, base, tmp_path, change):
    paths = {"base": base, "test": os.path.join(demo_data, "test.jsonl"), "copy": str(tmp_path / "train.jsonl")}
    shutil.copy(stopped["data"], paths["copy"])
    change = {k: v.format(**paths) if isinstance(v, str) else v for k, v in change.items()}
    before = tree(stopped["out_dir"])
    (key, value), = change.items()
    with pytest.raises(ConfigError, match=rf"ckpt.pt: this run differs from the checkpoint's: --{key}="
                                          rf"{re.escape(repr(value))} \(checkpoint: .*--overwrite"):
        train.train(dict(stopped, resume=True, **change))
    assert tree(stopped["out_dir"]) == before


def test_resume_lists_every_changed_setting_with_both_values(stopped):
    with pytest.raises(ConfigError) as e:
        train.train(dict(stopped, resume=True, lr=0.5, seed=4, log_interval=1, save_interval=3))
    assert "--lr=0.5 (checkpoint: 0.01); --seed=4 (checkpoint: 3)" in str(e.value)
    assert "log_interval" not in str(e.value) and "save_interval" not in str(e.value)  # these may change


def test_resume_compares_options_added_later(stopped, monkeypatch):
    # a method's new option, added to train.py after the checkpoint was written, is compared with no list to
    # update: the checkpoint ran with its default, so another value is refused
    monkeypatch.setitem(train.DEFAULTS, "budget", 0.5)
    with pytest.raises(ConfigError, match=r"--budget=0.25 \(checkpoint: 0.5\)"):
        train.train(dict(stopped, resume=True, budget=0.25))
    ck = {"config": dict(stopped, budget=0.5)}  # and a checkpoint that has it, resumed by code that has it or not
    assert rundir.changes(ck, dict(stopped, budget=0.5), train.DEFAULTS, train.MAY_CHANGE_ON_RESUME, {}) == []
    assert rundir.changes(ck, dict(stopped, budget=0.7), train.DEFAULTS, train.MAY_CHANGE_ON_RESUME, {}) == \
        ["--budget=0.7 (checkpoint: 0.5)"]
    monkeypatch.delitem(train.DEFAULTS, "budget")
    assert rundir.changes(ck, dict(stopped), train.DEFAULTS, train.MAY_CHANGE_ON_RESUME, {}) == \
        ["--budget='(not an option now)' (checkpoint: 0.5)"]


def test_resume_refuses_changed_data_or_tokenizer_content(base, demo_data, tmp_path):
    data, tok = tmp_path / "train.jsonl", tmp_path / "tokenizer.model"
    shutil.copy(os.path.join(demo_data, "train.jsonl"), data)
    shutil.copy(os.path.join(base, "tokenizer.model"), tok)
    cfg = cfg_for(base, demo_data, tmp_path / "out", data=str(data), tokenizer=str(tok), max_steps=4, stop_after=1)
    train.train(cfg)
    original = data.read_bytes()
    data.write_bytes(original + json.dumps({"query": "one more", "response": "line"}).encode() + b"\n")
    with pytest.raises(ConfigError, match=rf"{data} \(data\): content changed \(sha256 \w+, checkpoint: \w+\)"):
        train.train(dict(cfg, resume=True))
    data.write_bytes(original)
    import importlib.util
    spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    other = prep.prepare(str(tmp_path / "other"), seed=1, n_train=64, n_test=8, n_pretrain=400, vocab_size=400)
    shutil.copy(os.path.join(other, "tokenizer.model"), tok)  # a different tokenizer at the same path
    with pytest.raises(ConfigError, match=rf"{tok} \(tokenizer\): content changed"):
        train.train(dict(cfg, resume=True))
    shutil.copy(os.path.join(base, "tokenizer.model"), tok)
    assert train.train(dict(cfg, resume=True, stop_after=0))["steps"] == 4  # unchanged again: resumes
