# The offline demo (python train.py with no arguments) end to end at a minimum size, then the
# miniature comparison and the figures on its base.
import ast
import json
import os
import re
import shutil
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
TINY = dict(n_train=96, n_test=6, n_pretrain=600, vocab_size=420, dim=32, n_layers=1, n_heads=2, pretrain_steps=6,
            finetune_steps=12, batch_size=8, eval_limit=4, max_new_tokens=8)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import demo
    import train
    tmp = tmp_path_factory.mktemp("demo")
    argv = [f"--out_dir={tmp / 'out'}", f"--data_dir={tmp / 'data'}"] + [f"--{k}={v}" for k, v in TINY.items()]
    return demo.main(argv, train.run), argv, tmp


def only_base(tmp):
    (base,) = [os.path.join(d, "model") for d in (tmp / "out" / "base").iterdir()]
    return base


def test_demo_end_to_end(demo_run, capsys):
    import demo
    import train
    res, argv, tmp = demo_run
    base = only_base(tmp)
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(base))
    ops = [e for e in res["events"] if e["modules"]]
    assert ops, "no prune/expand operation happened"
    assert 0 <= res["base"]["accuracy"] <= 1 and res["finetuned"]["n"] == 4
    # the base is an HF checkpoint: transformers loads it and agrees with our model
    transformers = pytest.importorskip("transformers")
    from model import Transformer
    x = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(base))(x).logits
        assert (ref - Transformer.from_pretrained(str(base))(x)).abs().max() <= 1e-4
    # a second run reuses the data and the base
    capsys.readouterr()
    demo.main(argv, train.run)
    out = capsys.readouterr().out
    assert "up to date" in out and "base model: reusing" in out and "| base + beamlora adapter |" in out


def test_base_key_follows_code_settings_data_and_torch(demo_run, tmp_path, monkeypatch):
    import demo
    _, _, tmp = demo_run
    data = str(tmp / "data")
    cfg = dict(demo.DEFAULTS, **TINY)
    config, settings = demo.base_config(500, cfg), demo.pretrain_settings(cfg)
    key = demo.base_key(data, config, settings)[0]
    assert demo.base_key(data, config, dict(settings))[0] == key  # the same inputs: the same key
    assert demo.base_key(data, config, dict(settings, lr=settings["lr"] / 2))[0] != key
    assert demo.base_key(data, dict(config, hidden_size=64), settings)[0] != key
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "-other")
    assert demo.base_key(data, config, settings)[0] != key
    monkeypatch.undo()
    # a one-byte change to a code file or to the data: another key
    code = tmp_path / "code"
    code.mkdir()
    for name in demo.base_code():
        shutil.copy(os.path.join(ROOT, name), code / name)
    monkeypatch.setattr(demo, "HERE", str(code))
    assert demo.base_key(data, config, settings)[0] == key
    with open(code / "model.py", "a") as f:
        f.write("\n")
    assert demo.base_key(data, config, settings)[0] != key
    monkeypatch.undo()
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    assert demo.base_key(str(copy), config, settings)[0] == key
    with open(copy / "pretrain.txt", "a") as f:
        f.write("1+1=2\n")
    assert demo.base_key(str(copy), config, settings)[0] != key


def local_imports(name, seen, skip=("demo.py", "eval.py")):
    """The repo's top-level modules that `name` imports, directly or through each other (not through skip)."""
    with open(os.path.join(ROOT, name)) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for m in mods:
            path = m.split(".")[0] + ".py"
            if os.path.isfile(os.path.join(ROOT, path)) and path not in seen and path not in skip:
                seen.add(path)
                local_imports(path, seen)
    return seen


def test_base_key_covers_what_train_imports():
    import demo
    # train.py runs the pretraining, without the demo (whose part is the settings, in the key) or the eval
    assert local_imports("train.py", {"train.py"}) <= set(demo.base_code())


# t quantiles for a 95% two-sided interval, from a published table, not from our code: NIST/SEMATECH e-Handbook of
# Statistical Methods, 1.3.6.7.2 "Critical values of the Student's t distribution", column 0.975
T975 = {1: 12.706, 2: 4.303, 4: 2.776, 7: 2.365, 9: 2.262, 30: 2.042}


def test_t_quantiles():
    import compare
    for df, t in T975.items():
        assert compare.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4), df


def hand_interval(xs):
    n = len(xs)
    m = sum(xs) / n
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5
    return m, T975[n - 1] * sd / n ** 0.5


def test_compare_quick_and_figures(demo_run, tmp_path):
    import compare
    _, _, tmp = demo_run
    data = tmp / "data"
    out = tmp_path / "cmp"
    argv = [f"--out_dir={out}", f"--base={only_base(tmp)}", f"--data={data / 'train.jsonl'}", "--quick",
            f"--test={data / 'test.jsonl'}", "--ranks=4", "--steps=8", "--batch_size=8", "--eval_limit=3",
            "--max_new_tokens=4", "--score_log_interval=2", "--eval_batch_size=3"]
    summary = compare.main(argv)
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert sorted((r["label"], r["seed"]) for r in rows) == [("beamlora", 0), ("beamlora", 1), ("lora", 0), ("lora", 1)]
    for r in rows:  # what a rerun needs to know: the commit and torch that made it
        assert r["torch"] == torch.__version__ and re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", r["commit"])
        assert r["n"] == 3 and r["correct"] == round(3 * r["accuracy"])
    assert all(r["operations"] > 0 for r in rows if r["label"] == "beamlora")
    by = {(r["label"], r["seed"]): r for r in rows}
    st = summary[4]
    for key in ("accuracy", "val_loss"):  # the intervals against a hand computation with the table's t
        for m in ("lora", "beamlora"):
            mean, hw = hand_interval([by[m, s][key] for s in (0, 1)])
            assert st[m][key] == pytest.approx(mean, abs=1e-12)
            assert st[m][key + "_hw"] == pytest.approx(hw, rel=1e-4, abs=1e-9)
        d, hw = hand_interval([by["beamlora", s][key] - by["lora", s][key] for s in (0, 1)])
        assert st["beamlora"]["d_" + key] == pytest.approx(d, abs=1e-12)
        assert st["beamlora"]["d_" + key + "_hw"] == pytest.approx(hw, rel=1e-4, abs=1e-9)
    assert st["lora"]["val_loss_hw"] > 0 and "d_val_loss" not in st["lora"]
    md = open(out / "table.md").read()
    d, hw = st["beamlora"]["d_val_loss"], st["beamlora"]["d_val_loss_hw"]
    assert "| beamlora | 2 |" in md and f"{d:+.4f} [{d - hw:+.4f}, {d + hw:+.4f}]" in md
    assert "Δ accuracy vs lora" in md and torch.__version__ in md
    assert json.load(open(out / "summary.json"))["ranks"]["4"]["beamlora"]["d_val_loss"] == d
    # a rerun reuses every finished run; another setting is another run
    assert compare.main(argv) == summary and len(open(out / "results.jsonl").readlines()) == 4
    compare.main(argv + ["--methods=lora", "--seeds=1", "--lr=0.004"])
    assert len(open(out / "results.jsonl").readlines()) == 5

    pytest.importorskip("matplotlib")
    import figures
    runs = f"{out / 'lora_r4_s0'},{out / 'beamlora_r4_s0'}"
    curves = figures.main([f"--runs={runs}", f"--out_dir={tmp_path / 'fig'}", "--fractions=0,0.5", "--eval_limit=2",
                           "--max_new_tokens=4"])
    assert os.path.getsize(tmp_path / "fig" / "rank_importance.png") > 1000
    assert os.path.getsize(tmp_path / "fig" / "pruning.png") > 1000
    for pts in curves.values():  # removing half the ranks changes the held-out loss
        assert pts[0]["loss"] != pts[1]["loss"]


def test_code_hash_ignores_docstrings_and_comments_not_code(tmp_path, monkeypatch):
    """A run's key follows what the code does: a reworded docstring or comment keeps it, a changed line does not."""
    import compare
    monkeypatch.setattr(compare, "ROOT", str(tmp_path))
    src = tmp_path / "m.py"

    def key(text):
        src.write_text(text)
        return compare.code_hash(extra=())
    base = key('"""Module doc."""\nX = 1  # one\n\n\ndef f():\n    """Doc."""\n    return X\n')
    assert key('"""Reworded."""\nX = 1  # uno\n\n\ndef f():\n    """Other."""\n    return X\n') == base
    assert key('"""Module doc."""\nX = 2  # one\n\n\ndef f():\n    """Doc."""\n    return X\n') != base
    assert key('"""Module doc."""\nX = 1  # one\n\n\ndef f():\n    """Doc."""\n    return -X\n') != base
    assert key('X = 1\n\n\ndef f():\n    return X\n') == base  # no docstrings at all
    assert (key('X = 1\n\n\ndef f():\n    Y = 0\n    "a string after a statement is code"\n    return X\n')
            != key('X = 1\n\n\ndef f():\n    Y = 0\n    return X\n'))


def test_compare_bad_methods(tmp_path, capsys):
    import compare
    import train
    for methods, msg in (("lora,nosuch", "nosuch"), ("lora,beamlora:r=x", "--r: expected int"), ("lora,lora", "twice")):
        with pytest.raises(ValueError, match=msg):
            compare.main([f"--out_dir={tmp_path}", f"--methods={methods}", "--base=nowhere"])
    assert not os.listdir(tmp_path)  # failed before anything was built or run
    missing = [m for m in compare.TABLE.split(",") if not compare.knows(train, m)]
    assert "lora" not in missing and "beamlora_no_expand" not in missing
    # an option that depends on the rank is checked at the ranks the runs use, not at train.py's default r = 64
    settings = compare.method_settings("adalora:init_r=8", train.DEFAULTS)
    compare.check_method(train, "adalora:init_r=8", settings, [4, 8])
    with pytest.raises(ValueError, match="init_r=8: must be at least --r=16"):
        compare.check_method(train, "adalora:init_r=8", settings, [8, 16])
    compare.check_method(train, "lora:r=16", compare.method_settings("lora:r=16", train.DEFAULTS), [8])  # its own r


def test_demo_seeds_table(tmp_path):
    # the seeds-by-torch table from results gathered over several invocations: hand-computed mean, range, distance
    import demo_seeds
    results = [{"torch": "2.13.0+cpu", "seed": 0, "accuracy": 0.96},
               {"torch": "2.13.0+cpu", "seed": 1, "accuracy": 0.90},
               {"torch": "2.14.1", "seed": 0, "accuracy": 0.99}]
    md = demo_seeds.table(results, str(tmp_path))
    assert "| 2.13.0+cpu | 96.0% | 90.0% |" in md and "| 2.14.1 | 99.0% | - |" in md
    # mean (96 + 90 + 99) / 3 = 95.0; the farthest, 90.0, is 5.0 points from it
    assert "mean 95.0%, range 90.0-99.0%, largest distance from the mean 5.0 points (3 runs)" in md
    assert (tmp_path / "table.md").read_text() == md + "\n"


def test_demo_seeds_runs(tmp_path):
    # end to end at the tiny size: one run through python demo.py, its accuracy, commit and threads in results.json;
    # a second invocation keeps the other rows and replaces the same torch and seed
    import demo_seeds
    from compare import git_commit
    out = tmp_path / "seeds"
    out.mkdir()
    (out / "results.json").write_text(json.dumps([{"torch": "0.0-other", "seed": 0, "accuracy": 0.5},
                                                  {"torch": torch.__version__, "seed": 0, "accuracy": 0.0}]))
    args = " ".join([f"--data_dir={tmp_path / 'data'}"] + [f"--{k}={v}" for k, v in TINY.items()])
    results, md = demo_seeds.main([f"--out_dir={out}", "--seeds=0", "--threads=1", f"--demo_args={args}"])
    (mine,) = [x for x in results if x["torch"] == torch.__version__]
    summary = json.loads((out / f"{torch.__version__}_s0" / "beamlora" / "eval" / "gsm8k_summary.json").read_text())
    assert mine["accuracy"] == summary["accuracy"] and mine["threads"] == 1 and mine["commit"] == git_commit()
    assert json.loads((out / "results.json").read_text()) == results and len(results) == 2
    assert "| 0.0-other | 50.0% |" in md


def test_base_probe(demo_run, tmp_path, capsys):
    import base_probe
    answer = "2 boxes of 3 make 2*3=<<2*3=6>>6.\nHe gives 1, so he has 6-1=<<6-1=5>>5 left.\n#### 5"
    assert base_probe.done("2 boxes of 3 make 2*3=<<2*3=6>>6.\nHe has 6-1=<<6-1=5>>5 left.\nMore text", answer)
    assert not base_probe.done("2*3=<<2*3=6>>6.\nHe has 6-2=<<6-2=4>>4 left.", answer)  # wrong number
    assert not base_probe.done("2*3=<<2*3=6>>6.", answer)  # stops after one of two steps
    assert not base_probe.done("2*3=<<2*3=6>>6.\nstill going\n6-1=<<6-1=5>>5", answer)  # right number, a line late
    # on the demo's tiny base, through the real generate: the fraction it prints is the count it finished
    _, argv, tmp = demo_run
    data = str(tmp / "data" / "test.jsonl")
    frac = base_probe.main([f"--model={only_base(tmp)}", f"--data={data}", "--max_new_tokens=8"])
    assert f"of {TINY['n_test']} held-out problems" in capsys.readouterr().out and 0 <= frac <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no steps"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs question and answer"):
        base_probe.main([f"--model={only_base(tmp)}", f"--data={bad}"])


def test_misses(tmp_path, capsys):
    import misses
    q = ("Below is an instruction.\n\n### Instruction:\n"
         "Anna has 9 boxes with 2 eggs in each box. She gives 32 eggs away.")
    rows = [  # (output, correct) -> the kind a hand reading gives
        ("9*2=<<9*2=18>>18 eggs.\n18-32 ...", True),  # right: not a miss, whatever it says
        ("9*2=<<9*2=18>>18 eggs.\n18+18=<<18+18=36>>36.\n36-30=<<36-30=6>>6", False),  # 30: in neither -> copy
        ("9*2=<<9*2=18>>18 eggs.\n18+32=<<18+32=51>>51", False),  # 18 + 32 is 50 -> arithmetic
        ("9*2=<<9*2=19>>19.\n19-7=<<19-7=12>>12", False),  # the first fault is the arithmetic, 7 comes after
        ("9*2=<<9*2=18>>18.\n18+18=<<18+18=36>>36.\n36/4=<<36/4=9>>9", False),  # 4: not in the prompt -> copy
        ("9*2=<<9*2=18>>18 eggs.\nThe answer is: 18", False),  # every step sound: a wrong plan -> other
        ("9*2=<<9*2=18>>18 eggs.\n18+32=<<18+32=50>>50 eggs.\nThe answer isThe 50", False),  # no answer read -> format
        # not the last result -> answer
        ("9*2=<<9*2=18>>18 eggs.\n18+32=<<18+32=50>>50 eggs.\nThe answer is: 51", False),
        ("9*2=<<9**2=81>>81", False),  # not + - * /: not checkable -> arithmetic (the step is not sound)
    ]
    path = tmp_path / "gsm8k_samples.jsonl"
    def extracted(o):  # as eval.py's scorer reads it: the number after "The answer is:", None when there is none
        return o.rsplit("The answer is: ", 1)[1] if "The answer is: " in o else None
    path.write_text("".join(json.dumps({"prompt": q, "output": o, "correct": c, "gold": "4", "valid": "isThe" not in o,
                                        "extracted": extracted(o)}) + "\n" for o, c in rows) + "\n")
    assert [misses.kind(q, o, "isThe" not in o, extracted(o)) for o, c in rows[1:]] == [
        "copy", "arithmetic", "arithmetic", "copy", "other", "format", "answer", "arithmetic"]
    assert misses.value("9*2-4/2") == 16 and misses.value("__import__('os')") is None and misses.value("3/0") is None
    (c,) = misses.main([str(path)])
    assert c == dict(n=9, correct=1, arithmetic=3, copy=2, format=1, answer=1, other=1)
    assert "1 of 9 right; misses: arithmetic 3, copy 2, format 1, answer 1, other 1" in capsys.readouterr().out
    path.write_text('{"prompt": "q"}\n')
    with pytest.raises(ValueError, match="gsm8k_samples.jsonl:1: not an eval.py sample"):
        misses.main([str(path)])
