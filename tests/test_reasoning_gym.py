# reasoning-gym's problems as chat data (data/reasoning_gym/prepare.py) and eval.py's rgym task: the held-out
# problems never trained on (seed ranges apart, questions deduplicated, counted), every gold recomputed (the
# library's two-term division refused), the answer read from hand-made replies, the verdict the library's own
# score_answer (full and partial credit), prompted in the model's chat template. reasoning-gym is a test and
# data-preparation dependency (requirements-test.txt): the tests that need it skip without it.
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import eval as ev
import train
from configurator import ConfigError
from conftest import ROOT
from test_chat import make_chat_model, write_jsonl

spec = importlib.util.spec_from_file_location("rg_prepare", os.path.join(ROOT, "data", "reasoning_gym", "prepare.py"))
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)
HAS_RG = importlib.util.find_spec("reasoning_gym") is not None
needs_rg = pytest.mark.skipif(not HAS_RG, reason="needs reasoning-gym: pip install reasoning-gym==0.1.25")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_model(str(tmp_path_factory.mktemp("chatml")))


# replies written by hand: what the extraction reads, and why
REPLIES = [("-7", "-7", "the fine-tuned form: the answer alone"),
           ("The answer is 42.", "42", "a sentence: the last number, without the full stop"),
           ("To calculate 67 - 74, we subtract.\n\n67 - 74 = -7\n\nSo it is -7.", "-7", "worked, then restated"),
           ("28 + 47 = 75", "75", "an equation: its right side"),
           ("74-3 is 71", "71", "a minus between digits is no sign"),
           ("The total is 1,450 legs.", "1450", "thousands separators dropped"),
           ("I think <answer>75</answer> but maybe 76", "75", "reasoning-gym's answer tags win"),
           ("<answer>\n12\n</answer>", "12", "tags with newlines, as its extract_answer strips them"),
           ("I don't know.", None, "no number: no answer"),
           ("", None, "an empty reply")]


@pytest.mark.parametrize("reply, want, why", REPLIES, ids=[r[2] for r in REPLIES])
def test_extract_answer_from_hand_made_replies(reply, want, why):
    assert ev.extract_rgym(reply, "5") == want
    if HAS_RG and want is not None:  # the same as reasoning-gym's own reader where the reply has tags
        from reasoning_gym.utils import extract_answer
        assert extract_answer(reply) in (None, want)


def test_extract_answer_non_numeric_gold():
    assert ev.extract_rgym("Let me see.\nParis\n", "Paris") == "Paris"  # the last line
    assert ev.extract_rgym("  \n", "Paris") is None


@needs_rg
def test_verdict_is_the_librarys_score_answer():
    entry = {"question": "Solve the following multiplication: 12 * 13.", "answer": "156",
             "metadata": {"source_dataset": "products", "expression": "12 * 13"}}
    ex = {"prompt": entry["question"], "gold": "156", "metadata": entry["metadata"]}
    full = ev.score("rgym", "12 * 13 = 156.", ex)
    assert full == {"extracted": "156", "correct": True, "credit": 1.0, "valid": True}
    # "1156" holds the gold: the library's partial credit (3 of 4 characters), not correct
    partial = ev.score("rgym", "The answer is 1156", ex)
    assert partial["credit"] == pytest.approx(0.75) and not partial["correct"]
    assert ev.score("rgym", "no idea", ex) == {"extracted": None, "correct": False, "credit": 0.0, "valid": False}
    import reasoning_gym
    assert ev.rg_score("products", "156", entry) == reasoning_gym.create_dataset("products").score_answer("156", entry)


@needs_rg
def test_prepare_holds_out_and_checks_golds(tmp_path):
    meta = prep.prepare(out_dir=str(tmp_path), tasks="chain_sum_3x1,products_2x2", n_train=300, n_test=40, seed=3)
    rows = {name: [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")] for name in ("train", "test")}
    assert len(rows["train"]) == 600 and len(rows["test"]) == 80
    for task in ("chain_sum_3x1", "products_2x2"):
        train_q = [r["messages"][0]["content"] for r in rows["train"] if r["task"] == task]
        test_q = [r["messages"][0]["content"] for r in rows["test"] if r["task"] == task]
        assert len(set(train_q)) == len(train_q) == 300 and len(set(test_q)) == len(test_q) == 40
        assert not set(train_q) & set(test_q)
        m = meta["tasks"][task]
        assert m["train"]["seed_range"][1] <= m["test"]["seed_range"][0]  # disjoint generator seeds
        assert m["train"]["seeds"] == 300 + m["train"]["repeats"] + m["train"]["held_out_skipped"]
    # one-digit chains repeat often: the counts show it, and held-out questions were met and skipped
    assert meta["tasks"]["chain_sum_3x1"]["train"]["repeats"] > 0
    for r in rows["train"] + rows["test"]:  # gold = Python's value of the expression, the reply is the gold
        assert r["answer"] == str(eval(r["metadata"]["expression"])) == r["messages"][1]["content"]
    # the held-out set does not depend on how much is trained
    again = prep.prepare(out_dir=str(tmp_path / "more"), tasks="chain_sum_3x1,products_2x2", n_train=500, n_test=40,
                         seed=3)
    assert (tmp_path / "more" / "test.jsonl").read_text() == (tmp_path / "test.jsonl").read_text()
    assert again["tasks"]["chain_sum_3x1"]["train"]["rows"] == 500


@needs_rg
def test_wrong_golds_are_refused(monkeypatch):
    # the case: basic_arithmetic's simple form (two terms, no parentheses) with '/': "Calculate 5 / 33." -> 260
    monkeypatch.setitem(prep.TASKS, "divide", ("basic_arithmetic", dict(min_terms=2, max_terms=2, min_digits=1,
                                                                         max_digits=2, allow_parentheses=False,
                                                                         allow_negation=False), prep.expression_gold))
    entries, _ = prep.generate("divide", 100, 0)
    wrong = [e for e in entries if prep.expression_gold(e) != e["answer"]]
    assert ("Calculate 5 / 33.", "260") in [(e["question"], e["answer"]) for e in wrong]
    assert all(" / " in e["question"] for e in wrong)  # '+', '-' and '*' are right
    with pytest.raises(ConfigError, match=rf"^divide: {len(wrong)} of 100 gold answers are wrong, e\.g\. "
                                          r"'Calculate \d+ / \d+\.' -> '-?\d+', recomputed None; not written$"):
        prep.check_golds("divide", entries)
    assert prep.expression_value("( 56 + -33 ) - 84") == -61 and prep.expression_value("5 / 33") * 33 == 5
    with pytest.raises(ValueError):
        prep.expression_value("__import__('os')")


def test_prepare_bad_options_one_line(tmp_path):
    for args, want in ((["--tasks=chain_sum_3x1,nope"], "--tasks: unknown task 'nope'"),
                       (["--n_test=0"], "--n_train=2000, --n_test=0"), (["--seed=-1"], "--seed=-1"),
                       (["--n_train=x"], "--n_train: expected int")):
        p = subprocess.run([sys.executable, os.path.join("data", "reasoning_gym", "prepare.py"),
                            f"--out_dir={tmp_path}", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1 and p.stderr.startswith(f"error: {want}") and p.stderr.count("\n") == 1, p.stderr
    assert not os.listdir(tmp_path)


@needs_rg
def test_eval_rgym_prompts_in_the_chat_template(chat_model, tiny_checkpoint, tmp_path):
    from generate import generate
    from model import Transformer
    from tokenizer import Tokenizer, encode_chat
    prep.prepare(out_dir=str(tmp_path / "data"), tasks="chain_sum_3x1,chain_sum_2x2", n_train=20, n_test=3)
    data = str(tmp_path / "data" / "test.jsonl")
    summary = ev.main([f"--model={chat_model}", "--task=rgym", f"--data={data}", "--max_new_tokens=6", "--device=cpu",
                       f"--out={tmp_path / 'eval'}"])
    assert summary["n"] == 6 and set(summary["by_task"]) == {"chain_sum_3x1", "chain_sum_2x2"}
    assert 0 <= summary["accuracy"] <= summary["partial_credit"] <= 1
    samples = [json.loads(line) for line in open(tmp_path / "eval" / "rgym_samples.jsonl")]
    model, tok = Transformer.from_pretrained(chat_model), Tokenizer(chat_model)
    rows = [json.loads(line) for line in open(data)]
    for s, row in zip(samples, rows):  # the prompt: the user turn in the template, as train.py trains it
        want = tok.decode(generate(model, [encode_chat(tok, row["messages"][:1])], 6, stop_ids=tok.stop_ids)[0])
        assert s["output"] == want and s["prompt"] == row["messages"][0]["content"] and s["gold"] == row["answer"]
    with pytest.raises(ev.EvalError, match="this tokenizer has none"):
        ev.main([f"--model={tiny_checkpoint}", "--task=rgym", f"--data={data}", "--device=cpu",
                 f"--out={tmp_path / 'eval2'}"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "1 + 1 ="}], "answer": "2",
                                                "metadata": {"source_dataset": "no_such_set"}}])
    with pytest.raises(ev.EvalError, match=r"bad\.jsonl:1: 'metadata' names no reasoning-gym dataset"):
        ev.main([f"--model={chat_model}", "--task=rgym", f"--data={bad}", f"--out={tmp_path / 'eval3'}"])


@needs_rg
def test_the_training_file_trains(chat_model, tmp_path):
    """prepare.py's train.jsonl is --data_format=chat data (and its test.jsonl a --val_data)."""
    prep.prepare(out_dir=str(tmp_path / "data"), tasks="chain_sum_3x1", n_train=8, n_test=4)
    cfg = dict(train.DEFAULTS, init_from=chat_model, data=str(tmp_path / "data" / "train.jsonl"),
               val_data=str(tmp_path / "data" / "test.jsonl"), data_format="chat", out_dir=str(tmp_path / "out"),
               method="lora", r=2, batch_size=4, micro_batch_size=4, max_steps=2, dtype="float32", device="cpu",
               max_len=128)
    result = train.train(cfg)
    assert result["steps"] == 2 and result["val_loss"] > 0
