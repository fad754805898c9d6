import ast
import importlib.util
import json
import operator
import os
import re
import time

import pytest
import sentencepiece as spm

import eval as eval_lib
from tokenizer import Tokenizer

# data/demo/prepare.py under its own name: other data/<name>/prepare.py are modules called prepare too
PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "demo", "prepare.py")
spec = importlib.util.spec_from_file_location("demo_prepare", PATH)
prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare)

FILES = ["pretrain.txt", "train.jsonl", "test.jsonl", "tokenizer.model", "meta.json"]
SMALL = dict(n_train=300, n_test=50, n_pretrain=2000, vocab_size=768)
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
ANNOTATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def safe_eval(expr):  # + - * / on numbers only; the generator's calc() is not trusted here
    def ev(n):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in OPS:
            return OPS[type(n.op)](ev(n.left), ev(n.right))
        raise ValueError(f"not arithmetic: {expr!r}")
    return ev(ast.parse(expr, mode="eval").body)


def read(d, name):
    with open(os.path.join(d, name), "rb") as f:
        return f.read()


def rows(d, name):
    return [json.loads(line) for line in read(d, name).decode().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return prepare.prepare(str(tmp_path_factory.mktemp("demo")), seed=3, **SMALL)


def test_deterministic_per_seed(built, tmp_path):
    again = prepare.prepare(str(tmp_path / "again"), seed=3, **SMALL)
    other = prepare.prepare(str(tmp_path / "other"), seed=4, **SMALL)
    for name in FILES:  # tokenizer.model too: same sentences in the same order, one thread
        assert read(built, name) == read(again, name), name
        assert read(built, name) != read(other, name), name


def test_annotations_and_answers(built):
    for row in rows(built, "train.jsonl") + rows(built, "test.jsonl"):
        values = []
        for expr, value in ANNOTATION.findall(row["answer"]):
            assert safe_eval(expr) == int(value), (expr, value, row["answer"])
            values.append(int(value))
        steps, final = row["answer"].rsplit("\n#### ", 1)
        assert len(values) in (2, 3) and 0 <= values[-1] == int(final) < 200, row
        assert all(v >= 0 for v in values)
        assert re.search(rf"<<[^<>]*={final}>>{final} \w+", steps.splitlines()[-1])  # last step is the answer
        assert row["query"] == row["question"]
        # MetaMathQA's form after eval.py's "Let's think step by step.", scored as eval.py scores a generation
        assert row["response"] == f"Let's think step by step.\n{steps}\nThe answer is: {final}"
        assert eval_lib.gsm8k_correct(eval_lib.extract_gsm8k(row["response"]), final)


def test_pretrain_is_plain_text(built):
    text = read(built, "pretrain.txt").decode()
    lines = text.splitlines()
    questions = [line for line in lines if line.endswith("?")]  # a worked problem: its question, then its steps
    assert 0.5 * SMALL["n_pretrain"] < len(questions) < 0.7 * SMALL["n_pretrain"]
    test_questions = {r["question"] for r in rows(built, "test.jsonl")}
    assert not test_questions & set(questions)  # never a held-out problem
    for q in questions[:50]:  # each is followed by its solution steps, as in the answers
        steps = lines[lines.index(q) + 1]
        assert ANNOTATION.search(steps), (q, steps)
    for marker in ("The answer is", "####", "### Instruction", "Response:", "step by step"):  # left to fine-tuning
        assert marker not in text
    for expr, value in ANNOTATION.findall(text):
        assert safe_eval(expr) == int(value)
    for x, op, y, r in re.findall(r"^(\d+)([-+*/])(\d+)=(\d+)$", text, re.M):
        assert safe_eval(f"{x}{op}{y}") == int(r)


def test_answer_form(built, tmp_path):
    # bench/compare.py's base: a share of the worked problems in the response's form, each answer line the value of
    # its last step; the train and test problems as at 0 (built)
    out = prepare.prepare(str(tmp_path / "form"), seed=3, answer_form=0.3, **SMALL)
    lines = read(out, "pretrain.txt").decode().splitlines()
    worked = [i for i, line in enumerate(lines) if line.endswith("?") or line.endswith("? " + prepare.COT)]
    formed = [i for i in worked if lines[i].endswith(prepare.COT)]
    assert 0.2 * len(worked) < len(formed) < 0.4 * len(worked)
    for i in formed:
        j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("The answer is: "))
        assert all(ANNOTATION.search(step) for step in lines[i + 1:j]) and 2 <= j - i - 1 <= 3, lines[i:j + 1]
        assert lines[j] == f"The answer is: {ANNOTATION.findall(lines[j - 1])[-1][1]}"
    assert sum(line.startswith("The answer is: ") for line in lines) == len(formed)
    assert read(out, "train.jsonl") == read(built, "train.jsonl")
    assert read(out, "test.jsonl") == read(built, "test.jsonl")
    assert json.loads(read(out, "meta.json"))["answer_form"] == 0.3
    with pytest.raises(prepare.ConfigError, match="answer_form=1.5"):
        prepare.prepare(str(tmp_path / "bad"), seed=3, answer_form=1.5, **SMALL)


def test_train_test_disjoint(built):
    train = {r["question"] for r in rows(built, "train.jsonl")}
    test = {r["question"] for r in rows(built, "test.jsonl")}
    assert len(train) == SMALL["n_train"] and len(test) == SMALL["n_test"]
    assert not train & test


def test_tokenizer_round_trip_and_digits(built):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(built, "tokenizer.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.get_piece_size() == json.loads(read(built, "meta.json"))["n_vocab"]
    row = rows(built, "test.jsonl")[0]
    prompt = prepare.TEMPLATE.replace("Instruction:\n", "Instruction:\n" + row["question"])
    data = [row["question"], row["answer"], row["response"], prompt]
    texts = data + [" two  spaces\n\n\ttab é 漢 ", "\n", "a\n\nb\n"]
    for s in texts:
        assert sp.decode(sp.encode(s)) == s, repr(s)
        # every newline is the "\n" piece, alone (the leading "▁" of sp.encode("\n") is the dummy prefix)
        assert [p for p in sp.encode(s, out_type=str) if "\n" in p] == ["\n"] * s.count("\n"), repr(s)
    for s in data:  # everything the generator writes has pieces of its own, no byte fallback
        assert not any(sp.is_byte(i) or sp.is_unknown(i) for i in sp.encode(s)), repr(s)
    pieces = [sp.id_to_piece(i) for s in texts for i in sp.encode(s) if not sp.is_byte(i)]  # not "<0xE6>"
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)  # "27" is "2", "7"
    assert sp.encode("1234567890", out_type=str)[-10:] == list("1234567890")


def test_tiny_is_fast_and_reused(tmp_path):
    tiny = dict(seed=0, n_train=20, n_test=5, n_pretrain=100, vocab_size=512)
    t0 = time.time()
    d = prepare.prepare(str(tmp_path), **tiny)
    assert time.time() - t0 < 3
    assert all(os.path.isfile(os.path.join(d, name)) for name in FILES)
    mtime = os.path.getmtime(os.path.join(d, "train.jsonl"))
    prepare.prepare(d, **tiny)  # same settings: nothing rewritten
    assert os.path.getmtime(os.path.join(d, "train.jsonl")) == mtime
    prepare.prepare(d, **{**tiny, "n_test": 7})  # other settings: rebuilt
    assert len(rows(d, "test.jsonl")) == 7


def test_fits_train_and_eval_prompts(built, tmp_path):
    # train.py's metamathqa examples against eval.py's GSM8K prompt, both through the real code: the eval prompt
    # must be a token prefix of each training sequence, and everything after it trained and scored correct
    dataset = pytest.importorskip("dataset")
    tok = Tokenizer(built)
    path = os.path.join(built, "test.jsonl")
    examples = dataset.tokenize_file(path, tok, {"data_format": "metamathqa", "max_len": 512, "out_dir": str(tmp_path)})
    assert prepare.TEMPLATE == eval_lib.METAMATH.format(instruction="")
    assert len(examples) == SMALL["n_test"]
    for n, ((ids, labels), row) in enumerate(zip(examples, rows(built, "test.jsonl")), 1):
        ex = eval_lib.make_example("gsm8k", row, path, n)
        prompt = tok.encode(ex["prompt"], bos=True)
        assert ids[:len(prompt)] == prompt, row["question"]
        assert ids[-1] == tok.eos_id and -100 not in labels[len(prompt):]
        continuation = tok.decode(ids[len(prompt):-1])
        assert eval_lib.score("gsm8k", continuation, ex)["correct"], continuation
        # the steps are the very tokens that follow the question in the pretraining text (a new line each)
        steps = row["answer"].rsplit("\n#### ", 1)[0]
        plain = tok.encode(row["question"] + "\n" + steps)
        n_steps = len(plain) - len(tok.encode(row["question"])) - 1  # the tokens after the question's line break
        assert ids[len(prompt):len(prompt) + n_steps + 1] == plain[-n_steps - 1:], row["question"]
