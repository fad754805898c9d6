# The rank benchmark (bench/rankbench.py, data/rankbench/generate.py) at tiny sizes: the generator is
# deterministic, held-out questions never occur in training or pretraining, every asked price is taught, and the
# scorers (eval.py's gsm8k decision and the generator's recall) on hand-made replies.
import importlib.util
import json
import os
import re

import pytest

from conftest import ROOT

TINY = dict(seed=3, n_stalls=24, rounds=3, lookups=2, n_val=20, n_test=30, n_pretrain=300)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    return load("data/rankbench/generate.py", "rankbench_generate")


@pytest.fixture(scope="module")
def rb():
    return load("bench/rankbench.py", "rankbench")


def cfg(gen, **kw):
    return {**gen.DEFAULTS, **TINY, **kw}


def test_build_is_deterministic_and_seeded(gen):
    a, b = gen.build(cfg(gen)), gen.build(cfg(gen))
    assert a == b
    other = gen.build(cfg(gen, seed=4))
    assert other[4] != a[4] and other[0] != a[0]  # another seed: another table, other problems


def test_files_are_deterministic(gen, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    gen.prepare(out_dir=one, **TINY)
    gen.prepare(out_dir=two, **TINY)
    for name in ("pretrain.txt", "train.jsonl", "val.jsonl", "test.jsonl", "table.json", "tokenizer.model",
                 "meta.json"):
        with open(os.path.join(one, name), "rb") as f, open(os.path.join(two, name), "rb") as g:
            assert f.read() == g.read(), name
    mtime = os.path.getmtime(os.path.join(one, "train.jsonl"))
    gen.prepare(out_dir=one, **TINY)  # up to date: not rewritten
    assert os.path.getmtime(os.path.join(one, "train.jsonl")) == mtime


def test_pretraining_is_the_same_for_every_table(gen, tmp_path):
    # one base serves every table size: its corpus and tokenizer do not depend on n_stalls, rounds or the splits
    a, b = gen.build(cfg(gen)), gen.build(cfg(gen, n_stalls=48, rounds=5, n_val=7, n_test=9))
    assert a[3] == b[3] and a[4] != b[4]
    one = gen.prepare(out_dir=str(tmp_path / "one"), **TINY)
    two = gen.prepare(out_dir=str(tmp_path / "two"), **dict(TINY, n_stalls=48, rounds=5))
    for name in ("pretrain.txt", "tokenizer.model"):
        with open(os.path.join(one, name), "rb") as f, open(os.path.join(two, name), "rb") as g:
            assert f.read() == g.read(), name


def test_splits_do_not_overlap_and_pretraining_has_no_held_out_question(gen):
    train, val, test, lines, table = gen.build(cfg(gen))
    q = {name: [r["question"] for r in rows] for name, rows in (("train", train), ("val", val), ("test", test))}
    assert len(set(q["val"])) == len(q["val"]) and len(set(q["test"])) == len(q["test"])
    assert not set(q["train"]) & set(q["val"]) and not set(q["train"]) & set(q["test"])
    assert not set(q["val"]) & set(q["test"])
    text = "\n".join(lines)
    assert not any(x in text for x in q["train"] + q["val"] + q["test"])
    assert "### Instruction:\n" in text and "The answer is: " in text  # the template and the answer line trained


def test_templated_pieces_are_what_eval_prompts_and_train_trains(gen, tmp_path):
    import eval as eval_lib
    from tokenizer import Tokenizer
    out = gen.prepare(out_dir=str(tmp_path), **TINY)
    with open(os.path.join(out, "pretrain.txt")) as f:
        text = f.read()
    piece = text[text.index("Below is"):]
    q = piece.split("### Instruction:\n")[1].split("\n")[0]
    assert piece.startswith(eval_lib.METAMATH.format(instruction=q) + "\n")  # eval's prompt, word for word
    prompt = eval_lib.ALPACA.format(instruction=q)  # train.py's template (dataset.PROMPT; no torch imported here)
    assert piece.startswith(prompt + " Let's think step by step.\n")
    response = piece[len(prompt) + 1:].split("The answer is: ")[0]
    # the tokens pretraining sees are those of a fine-tune's example (its prompt and response encoded apart)
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    assert tok.encode(prompt, bos=True) + tok.encode(response) == tok.encode(prompt + " " + response, bos=True)


def test_every_price_is_taught_rounds_times_and_asked_ones_are_in_the_table(gen):
    c = cfg(gen)
    train, val, test, lines, table = gen.build(c)
    assert len(table) == c["n_stalls"] and len(train) == c["rounds"] * len(table) // c["lookups"]
    assert all(c["price_min"] <= p <= c["price_max"] and 100 <= s <= 999 for s, p in table.items())
    counts = {}
    for row in train:
        for s in gen.ASKED.findall(row["question"]):
            counts[int(s)] = counts.get(int(s), 0) + 1
    assert counts == {s: c["rounds"] for s in table}
    for row in val + test:
        stalls = [int(s) for s in gen.ASKED.findall(row["question"])]
        assert len(stalls) == c["lookups"] == len(set(stalls)) and all(s in table for s in stalls)


def test_solutions_are_right_and_use_the_table(gen):
    train, val, test, lines, table = gen.build(cfg(gen))
    for row in train + test:
        stated = {int(s): int(p) for s, p in gen.STEP.findall(row["response"])}
        assert len(stated) == 2 and all(table[s] == p for s, p in stated.items())
        total = sum(int(c) * table[int(s)] for c, s in re.findall(r"(\d+) bags at stall (\d+)", row["question"]))
        assert row["answer"].endswith(f"#### {total}") and row["response"].endswith(f"The answer is: {total}")
        assert row["response"].startswith("Let's think step by step.\n")
        assert gen.recall(row["response"], row["question"], table) == 1.0


def test_pretraining_prices_are_not_the_table(gen):
    # every pretraining price is drawn afresh: about 1 in 11 agrees with the table, by chance
    train, val, test, lines, table = gen.build(cfg(gen, n_pretrain=3000))
    stated = [(int(s), int(p)) for line in lines for s, p in gen.STEP.findall(line)]
    in_table = [(s, p) for s, p in stated if s in table]
    assert len(stated) > 2000 and len(in_table) > 50
    assert sum(table[s] == p for s, p in in_table) / len(in_table) < 0.2


def test_bad_settings(gen):
    with pytest.raises(gen.ConfigError, match="n_stalls"):
        gen.build(cfg(gen, n_stalls=901))
    with pytest.raises(gen.ConfigError, match="lookups"):
        gen.build(cfg(gen, n_stalls=9, lookups=2))


QUESTION = "Tom buys 3 bags at stall 347 and 2 bags at stall 125. How many dollars does he pay?"
TABLE = {347: 7, 125: 4, 126: 5}
RIGHT = ("3 bags at stall 347 cost 3*7=21 dollars.\n2 bags at stall 125 cost 2*4=8 dollars.\n"
         "In all he pays 21+8=29 dollars.\nThe answer is: 29")


@pytest.mark.parametrize("output, correct, valid, recall", [
    (RIGHT, True, True, 1.0),
    (RIGHT.replace("2*4=8", "2*5=10").replace("21+8=29", "21+10=31").replace("is: 29", "is: 31"),
     False, True, 0.5),  # one price wrong: the answer wrong, half the prices right
    (RIGHT.replace("21+8=29", "21+8=28").replace("is: 29", "is: 28"), False, True, 1.0),  # prices right, sum wrong
    (RIGHT.replace("The answer is: 29", ""), False, False, 1.0),  # no answer line: invalid
    (RIGHT.replace("is: 29", "is: 29 dollars"), True, True, 1.0),
    ("2 bags at stall 125 cost 2*4=8 dollars.\nThe answer is: 29", True, True, 0.5),  # one price not used
    ("2 bags at stall 126 cost 2*4=8 dollars.\nThe answer is: 12", False, True, 0.0),  # another stall's
    ("3 bags at stall 347 cost 21 dollars.\nThe answer is: 29", True, True, 0.0),  # no product: no price read
    ("", False, False, 0.0),
])
def test_scorers_on_hand_made_replies(gen, output, correct, valid, recall):
    import eval as eval_lib
    s = eval_lib.score("gsm8k", output, {"gold": "29"})
    assert (s["correct"], s["valid"]) == (correct, valid)
    assert gen.recall(output, QUESTION, TABLE) == recall


def test_summary_pairs_by_seed(rb):
    rows = [{"label": "lora", "r": r, "seed": s, "accuracy": a, "recall": a, "total_s": 10.0, "train_s": 8.0}
            for r, accs in ((2, (0.30, 0.40, 0.35)), (32, (0.50, 0.62, 0.53))) for s, a in enumerate(accs)]
    rows += [{"label": "base", "r": None, "seed": s, "accuracy": 0.01, "recall": 0.1, "total_s": 5.0, "train_s": 0.0}
             for s in range(3)]
    cells, diffs = rb.summarize(rows, ["lora_r32-lora_r2", "lora_r32-base", "lora_r16-lora_r2"])
    assert set(cells) == {"lora_r2", "lora_r32", "base"} and cells["lora_r2"]["n"] == 3
    d = diffs["lora_r32-lora_r2"]  # differences 0.20, 0.22, 0.18: mean 0.20, sd 0.02, t(0.975, 2) = 4.303
    assert d["accuracy"] == pytest.approx(0.20) and d["accuracy_hw"] == pytest.approx(4.303 * 0.02 / 3 ** 0.5, rel=1e-3)
    assert "lora_r16-lora_r2" not in diffs  # a cell with no runs: no contrast
    md = rb.table(cells, diffs, 1000, "test")
    assert "| lora_r32-lora_r2 | 3 | +20.0 [+15.0, +25.0] |" in md


def test_driver_help_and_bad_input(rb, tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "bench/rankbench.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "--contrasts=" in p.stdout
    p = subprocess.run([sys.executable, "bench/rankbench.py", "--split=train", f"--out_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip() == "error: --split=train: test or val"
    assert json.dumps(rb.QUICK)  # the quick settings are plain values
