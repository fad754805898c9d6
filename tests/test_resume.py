# train.py across kills and restarts, and its answer to bad input: a run SIGKILLed at several points and
# resumed ends with the same adapter, checkpoint tensors and records as one never killed; --resume refuses
# any changed setting (naming it) but the few that may change; dozens of bad inputs each give one `error:`
# line naming the option or file, no traceback, and leave a finished run's files byte for byte as they were.
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
from test_train import base, cfg_for, demo_data  # noqa: F401 (fixtures)

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


# ---------------------------------------------------------------------------------------------
# bad input: `python train.py ...` over a finished run's out_dir

class Unsafe:  # what weights_only must refuse: unpickling it would call os.system
    def __reduce__(self):
        return os.system, ("true",)


def make_inputs(d, base, demo_data):
    """Bad files, each named for its case, in d."""
    train_lines = open(os.path.join(demo_data, "train.jsonl"), "rb").read().splitlines(keepends=True)
    ok = train_lines[0]
    files = {"bad_config.py": b"r = 8\nx = = 1\n", "garbage.model": b"not a tokenizer\n", "empty.jsonl": b"",
             "bad_json.jsonl": ok + b'{"query": "a", "resp\n', "no_field.jsonl": b'{"question": "a", "answer": "b"}\n',
             "number.jsonl": ok + b'{"query": "q", "response": 42}\n', "null.jsonl": b'{"query": "q", "response": null}\n',
             "latin1.jsonl": ok + '{"query": "caf\u00e9", "response": "x"}\n'.encode("latin-1"),
             "list.jsonl": b"[1, 2]\n", "tiny.jsonl": ok, "chat.jsonl": b'{"messages": "hi"}\n',
             "bad.txt": b"hello\nworld\n\xff\xfe\n", "a_file": b"x"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "datadir").mkdir()
    (d / "nocfg").mkdir()
    cfg = json.load(open(os.path.join(base, "config.json")))
    models = {"badjson": "{not json", "wrongtype": dict(cfg, vocab_size="lots"), "gpt2": dict(cfg, model_type="gpt2"),
              "missingkey": {k: v for k, v in cfg.items() if k != "hidden_size"}, "zeroheads": dict(cfg, num_attention_heads=0),
              "smallvocab": dict(cfg, vocab_size=100), "truncated": cfg}
    for name, c in models.items():
        (d / name).mkdir()
        (d / name / "config.json").write_text(c if isinstance(c, str) else json.dumps(c))
        shutil.copy(os.path.join(base, "tokenizer.model"), d / name)
    weights = open(os.path.join(base, "model.safetensors"), "rb").read()
    (d / "truncated" / "model.safetensors").write_bytes(weights[:len(weights) // 2])


def corrupt(what, d):
    """Change a finished run's out_dir d as case `what` needs."""
    path = d / "ckpt.pt"
    if what == "no_ckpt":
        os.remove(path)
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif what == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 100)
    elif what == "pickle":
        torch.save({"step": 1, "params": Unsafe()}, path)
    elif what == "list":
        torch.save([1, 2, 3], path)
    elif what == "no_keys":
        torch.save({"step": 4}, path)
    elif what == "shapes":
        ck = torch.load(path, weights_only=True)
        name = next(iter(ck["params"]))
        ck["params"][name] = torch.zeros(3, 3)
        torch.save(ck, path)
    elif what == "records":
        (d / "log.jsonl").write_bytes(b"not json\n" + (d / "log.jsonl").read_bytes())


CUDA = "--device=cuda:99" if torch.cuda.is_available() else "--device=cuda"
# (id, arguments after the finished run's own, what the error line must name, change to its out_dir); {in}: the
# folder of bad files. Cases that start a fresh run pass --overwrite: a bad input must fail before it deletes.
CASES = [
    ("micro_batch_size_0", ["--micro_batch_size=0"], ["--micro_batch_size=0"], None),
    ("batch_size_0", ["--batch_size=0"], ["--batch_size=0"], None),
    ("batch_size_not_multiple", ["--batch_size=6"], ["--batch_size=6", "multiple"], None),
    ("max_steps_negative", ["--max_steps=-1"], ["--max_steps=-1"], None),
    ("epochs_0", ["--max_steps=0", "--epochs=0"], ["--epochs=0", "train nothing"], None),
    ("r_0", ["--r=0"], ["--r=0"], None),
    ("r_too_large", ["--r=1000"], ["r=1000 does not fit"], None),
    ("alpha_0", ["--alpha=0"], ["--alpha=0"], None),
    ("dropout_1", ["--dropout=1.0"], ["--dropout=1.0"], None),
    ("tau_0", ["--tau=0"], ["--tau=0"], None),
    ("dt_odd", ["--dt=3"], ["--dt=3"], None),
    ("p_init_above_1", ["--p_init=1.5"], ["--p_init=1.5"], None),
    ("lr_negative", ["--lr=-0.1"], ["--lr=-0.1"], None),
    ("min_lr_above_lr", ["--min_lr=1.0"], ["--min_lr=1.0"], None),
    ("warmup_ratio_2", ["--warmup_ratio=2.0"], ["--warmup_ratio=2.0"], None),
    ("beta2_1", ["--beta2=1.0"], ["--beta2=1.0"], None),
    ("log_interval_0", ["--log_interval=0"], ["--log_interval=0"], None),
    ("save_interval_negative", ["--save_interval=-1"], ["--save_interval=-1"], None),
    ("max_len_1", ["--max_len=1"], ["--max_len=1"], None),
    ("method_unknown", ["--method=nope"], ["--method=nope"], None),
    ("dtype_unknown", ["--dtype=fp8"], ["--dtype=fp8"], None),
    ("targets_unknown", ["--targets=q_proj,qkv_proj"], ["--targets", "qkv_proj"], None),
    ("targets_empty_name", ["--targets=q_proj,,v_proj"], ["--targets"], None),
    ("device_cuda_absent", [CUDA], [CUDA], None),
    ("device_unknown", ["--device=gpu"], ["--device=gpu"], None),
    ("wandb_absent", ["--wandb_log"], ["--wandb_log"], None),
    ("option_unknown", ["--nope=1"], ["--nope"], None),
    ("option_wrong_type", ["--r=abc"], ["--r"], None),
    ("config_file_missing", ["{in}/missing.py"], ["missing.py"], None),
    ("config_file_syntax", ["{in}/bad_config.py"], ["bad_config.py:2", "SyntaxError"], None),
    ("two_models", ["--model_config={in}/gpt2/config.json"], ["--init_from", "--model_config"], None),
    ("init_from_missing", ["--init_from={in}/nothing"], ["nothing"], None),
    ("init_from_no_config", ["--init_from={in}/nocfg"], ["nocfg/config.json"], None),
    ("config_json_invalid", ["--init_from={in}/badjson"], ["badjson/config.json", "JSON"], None),
    ("config_json_wrong_type", ["--init_from={in}/wrongtype"], ["wrongtype/config.json", "vocab_size", "lots"], None),
    ("config_json_missing_key", ["--init_from={in}/missingkey"], ["missingkey/config.json", "hidden_size"], None),
    ("config_json_zero_heads", ["--init_from={in}/zeroheads"], ["zeroheads/config.json", "num_attention_heads"], None),
    ("config_json_model_type", ["--init_from={in}/gpt2"], ["gpt2/config.json", "model_type"], None),
    ("weights_truncated", ["--init_from={in}/truncated"], ["truncated/model.safetensors"], None),
    ("tokenizer_missing", ["--tokenizer={in}/nope.model"], ["nope.model"], None),
    ("tokenizer_garbage", ["--tokenizer={in}/garbage.model"], ["garbage.model"], None),
    ("tokenizer_above_vocab", ["--init_from={in}/smallvocab"], ["smallvocab/tokenizer.model", "vocab_size (100)"], None),
    ("data_missing", ["--data={in}/nothing.jsonl"], ["nothing.jsonl", "--data"], None),
    ("data_empty", ["--data={in}/empty.jsonl"], ["empty.jsonl", "empty"], None),
    ("data_a_directory", ["--data={in}/datadir"], ["datadir", "--data"], None),
    ("data_bad_json", ["--data={in}/bad_json.jsonl"], ["bad_json.jsonl:2", "JSON"], None),
    ("data_missing_field", ["--data={in}/no_field.jsonl"], ["no_field.jsonl:1", "'query'"], None),
    ("data_response_number", ["--data={in}/number.jsonl"], ["number.jsonl:2", "'response'", "int"], None),
    ("data_response_null", ["--data={in}/null.jsonl"], ["null.jsonl:1", "'response'", "NoneType"], None),
    ("data_not_utf8", ["--data={in}/latin1.jsonl"], ["latin1.jsonl:2", "UTF-8"], None),
    ("data_line_not_object", ["--data={in}/list.jsonl"], ["list.jsonl:1", "list"], None),
    ("data_smaller_than_a_batch", ["--data={in}/tiny.jsonl"], ["tiny.jsonl", "fewer than one global batch"], None),
    ("val_data_bad", ["--val_data={in}/bad_json.jsonl"], ["bad_json.jsonl:2"], None),
    ("chat_messages_not_a_list", ["--data={in}/chat.jsonl", "--data_format=chat"], ["chat.jsonl:1", "messages"], None),
    ("text_not_utf8", ["--data={in}/bad.txt"], ["bad.txt:3", "UTF-8"], None),
    ("out_dir_a_file", ["--out_dir={in}/a_file"], ["a_file", "--out_dir"], None),
    ("resume_and_overwrite", ["--resume", "--overwrite"], ["--resume", "--overwrite"], None),
    # without --overwrite
    ("fresh_run_into_a_run", [], ["already holds a run", "--resume", "--overwrite"], "fresh"),
    ("resume_without_ckpt", ["--resume"], ["ckpt.pt", "no checkpoint"], "no_ckpt"),
    ("ckpt_empty", ["--resume"], ["ckpt.pt", "unreadable"], "empty"),
    ("ckpt_truncated", ["--resume"], ["ckpt.pt", "unreadable"], "truncated"),
    ("ckpt_garbage", ["--resume"], ["ckpt.pt", "unreadable"], "garbage"),
    ("ckpt_unsafe_pickle", ["--resume"], ["ckpt.pt", "refused unread"], "pickle"),
    ("ckpt_not_a_dict", ["--resume"], ["ckpt.pt", "not a train.py checkpoint"], "list"),
    ("ckpt_missing_keys", ["--resume"], ["ckpt.pt", "not a train.py checkpoint"], "no_keys"),
    ("ckpt_wrong_shapes", ["--resume"], ["ckpt.pt", "do not fit"], "shapes"),
    ("records_corrupt", ["--resume"], ["log.jsonl:1"], "records"),
    ("resume_changed_lr", ["--resume", "--lr=0.5"], ["--lr=0.5 (checkpoint: 0.01)"], None),
    ("resume_changed_r", ["--resume", "--r=2"], ["--r=2 (checkpoint: 4)"], None),
]


@pytest.fixture(scope="module")
def cli_results(base, demo_data, tmp_path_factory):
    """Every case in one subprocess (tests/cli_cases.py), each over its own copy of a finished run."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "in").mkdir()
    make_inputs(tmp / "in", base, demo_data)
    prior = cfg_for(base, demo_data, tmp / "prior", max_steps=6, dt=2, end_step=6, score_log_interval=2,
                    log_interval=2)
    train.train(prior)
    cases, before = [], {}
    for name, args, _, change in CASES:
        d = tmp / name
        shutil.copytree(tmp / "prior", d)
        if change not in (None, "fresh"):
            corrupt(change, d)
        fresh = "--resume" not in args and change != "fresh"
        argv = argv_of(dict(prior, out_dir=str(d))) + ["--overwrite"] * fresh + [a.format(**{"in": tmp / "in"}) for a in args]
        cases.append({"id": name, "argv": argv})
        before[name] = tree(d)
    before["a_file"] = (tmp / "in" / "a_file").read_bytes()
    (tmp / "cases.json").write_text(json.dumps(cases))
    proc = python(os.path.join(ROOT, "tests", "cli_cases.py"), str(tmp / "cases.json"), str(tmp / "results.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "results.json").read_text()), before, tmp


@pytest.mark.parametrize("name, names", [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_and_nothing_lost(cli_results, name, names):
    if name == "wandb_absent" and __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed")
    results, before, tmp = cli_results
    res = results[name]
    err = res["stderr"]
    assert res["code"] != 0 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert all(n in err for n in names), err
    assert "weights_only=False" not in err  # never advise unpickling what was refused
    assert tree(tmp / name) == before[name]  # the finished run's ckpt.pt, adapter/ and records, byte for byte
    if name == "out_dir_a_file":
        assert (tmp / "in" / "a_file").read_bytes() == before["a_file"]
