# The offline demo (python train.py with no arguments) end to end at a minimum size, then the
# miniature comparison and the figures on its base.
import json
import os
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


def test_demo_end_to_end(demo_run, capsys):
    import demo
    import train
    res, argv, tmp = demo_run
    base = tmp / "out" / "base" / "model"
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


def test_compare_and_figures(demo_run, tmp_path):
    import compare
    _, _, tmp = demo_run
    data = tmp / "data"
    argv = [f"--out_dir={tmp_path / 'cmp'}", f"--base={tmp / 'out' / 'base' / 'model'}",
            f"--data={data / 'train.jsonl'}", f"--test={data / 'test.jsonl'}", "--ranks=2,4", "--seeds=1",
            "--steps=8", "--batch_size=8", "--eval_limit=2", "--max_new_tokens=4", "--score_log_interval=2"]
    md = compare.main(argv)
    rows = [json.loads(line) for line in open(tmp_path / "cmp" / "results.jsonl")]
    assert len(rows) == 12 and {r["method"] for r in rows} == set(compare.METHODS)
    assert all(r["operations"] > 0 for r in rows if r["method"] != "LoRA")
    for m in compare.METHODS:
        assert f"| {m} |" in md
    assert open(tmp_path / "cmp" / "table.md").read().strip() == md.strip()
    assert compare.main(argv) == md  # finished runs are reused, not retrained
    pytest.importorskip("matplotlib")
    import figures
    runs = f"{tmp_path / 'cmp' / 'LoRA_r4_s0'},{tmp_path / 'cmp' / 'BeamLoRA_r4_s0'}"
    curves = figures.main([f"--runs={runs}", f"--out_dir={tmp_path / 'fig'}", "--fractions=0,0.5", "--eval_limit=2",
                           "--max_new_tokens=4"])
    assert os.path.getsize(tmp_path / "fig" / "rank_importance.png") > 1000
    assert os.path.getsize(tmp_path / "fig" / "pruning.png") > 1000
    for pts in curves.values():  # removing half the ranks changes the held-out loss
        assert pts[0]["loss"] != pts[1]["loss"]
