# data/<name>/prepare.py: conversions on small records in each source's real layout, and the
# command line end to end on local files. Nothing here touches the network.
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

NAMES = ["metamathqa", "code_feedback", "commonsense170k", "gsm8k", "math", "commonsense", "humaneval", "mbpp"]
GSM8K_TEST = os.path.join(SHARED, "data", "gsm8k", "test.jsonl")


def load(name):
    path = os.path.join(ROOT, "data", name, "prepare.py")
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, *args):
    # no proxy: an unreachable URL must fail here, not be relayed somewhere
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    script = os.path.join("data", name, "prepare.py")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("name", NAMES)
def test_sources_pinned(name):
    # a moving branch (main, master) would let the data change under a fixed sha256
    for url, sha256 in load(name).FILES.values():
        assert url.startswith("https://") and re.search(r"/(resolve/)?[0-9a-f]{40}/", url), url
        assert sha256 is None or re.fullmatch(r"[0-9a-f]{64}", sha256)


def test_metamathqa():
    raw = [{"query": "What is 2+3?", "response": "2+3=5.\nThe answer is: 5", "type": "GSM_Rephrased",
            "original_question": "What is 2+3?"}]
    assert load("metamathqa").convert(raw) == [{"query": "What is 2+3?", "response": "2+3=5.\nThe answer is: 5",
                                                "type": "GSM_Rephrased"}]


def test_code_feedback():
    turns = [{"role": "user", "content": "Reverse a list."}, {"role": "assistant", "content": "xs[::-1]"},
             {"role": "user", "content": "In place?"}, {"role": "assistant", "content": "xs.reverse()"}]
    convert = load("code_feedback").convert
    assert convert([{"id": 7, "messages": turns}]) == [{"messages": turns}]
    # CodeFeedback-Python105K's single-turn layout
    assert convert([{"query": "Reverse a list.", "response": "xs[::-1]"}]) == [{"messages": turns[:2]}]


def test_commonsense170k_and_test_sets():
    raw = [{"instruction": "Please answer the following question with true or false, question: is the sky blue?"
                           "\n\nAnswer format: true/false",
            "input": "", "output": "the correct answer is true", "answer": "true"}]
    assert load("commonsense170k").convert(raw) == raw
    commonsense = load("commonsense")
    assert commonsense.convert(raw) == raw
    tasks = {name.split("/")[0] for name in commonsense.FILES}
    assert tasks == {"boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                     "openbookqa"}


def test_gsm8k():
    raw = [{"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3-1=<<3-1=2>>2\n#### 2"}]
    assert load("gsm8k").convert(raw) == raw


def test_math_answer_is_last_boxed():
    math = load("math")
    metamath_style = {"instruction": "Compute $\\frac{1}{4}+\\frac{1}{4}$.", "input": "",
                      "output": "We add: $\\boxed{1/4}+1/4 = \\boxed{\\frac{1}{2}}$."}
    hendrycks_style = {"problem": "What is $2^3$?", "level": "Level 1", "type": "Algebra",
                       "solution": "$2^3 = \\fbox{8}$."}
    rows = math.convert([metamath_style, hendrycks_style])
    assert rows[0] == {"problem": metamath_style["instruction"], "solution": metamath_style["output"],
                       "answer": "\\frac{1}{2}"}
    assert rows[1] == {"problem": "What is $2^3$?", "solution": "$2^3 = \\fbox{8}$.", "answer": "8"}
    assert math.last_boxed("so $\\boxed 5$.") == "5"
    assert math.last_boxed("no box here") is None
    assert math.last_boxed("\\boxed{\\frac{1}{2}") is None  # unbalanced


def test_humaneval():
    raw = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
            "canonical_solution": "    return a + b\n",
            "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
            "entry_point": "add"}]
    assert load("humaneval").convert(raw) == raw


def mbpp_record(task_id):
    return {"text": f"Write a function number {task_id}.", "code": f"def f():\n    return {task_id}",
            "task_id": task_id, "test_setup_code": "", "test_list": [f"assert f() == {task_id}"],
            "challenge_test_list": []}


def test_mbpp_keeps_test_split():
    rows = load("mbpp").convert([mbpp_record(i) for i in (10, 11, 510, 511)])
    assert [r["task_id"] for r in rows] == [11, 510]
    assert set(rows[0]) == {"task_id", "text", "code", "test_list", "test_setup_code"}


@pytest.mark.skipif(not os.path.isfile(GSM8K_TEST), reason="needs ../shared/data/gsm8k/test.jsonl")
def test_gsm8k_src_end_to_end(tmp_path):
    p = run("gsm8k", "--only=test.jsonl", f"--src={GSM8K_TEST}", f"--out={tmp_path}")
    assert p.returncode == 0, p.stderr
    assert "note:" not in p.stderr  # the shared copy is the pinned file, byte for byte
    assert read_jsonl(tmp_path / "test.jsonl") == read_jsonl(GSM8K_TEST)
    assert "1,319 rows" in p.stdout


@pytest.mark.skipif(not os.path.isfile(GSM8K_TEST), reason="needs ../shared/data/gsm8k/test.jsonl")
def test_gsm8k_download_checked_end_to_end(tmp_path):
    # the download path, from a file:// URL: the sha256 matches, so it converts
    p = run("gsm8k", "--only=test.jsonl", f"--url=file://{GSM8K_TEST}", f"--out={tmp_path}")
    assert p.returncode == 0, p.stderr
    assert len(read_jsonl(tmp_path / "test.jsonl")) == 1319


def test_mbpp_src_end_to_end(tmp_path):
    src = write(tmp_path / "mbpp.jsonl", "".join(json.dumps(mbpp_record(i)) + "\n" for i in (3, 11, 12, 600)))
    out = tmp_path / "out"
    p = run("mbpp", f"--src={src}", f"--out={out}")
    assert p.returncode == 0, p.stderr
    assert "not the pinned file" in p.stderr  # a hand-made file converts, with a note
    assert [r["task_id"] for r in read_jsonl(out / "test.jsonl")] == [11, 12]


def assert_one_line_error(p, *words, notes=0):
    # the error is one line, last; a file chosen with --src may add its "not the pinned file" note
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 + notes and lines[-1].startswith("error: "), p.stderr
    for word in words:
        assert word in lines[-1]


def test_offline_says_what_to_do(tmp_path):
    url = "http://127.0.0.1:9/HumanEval.jsonl.gz"
    p = run("humaneval", f"--url={url}", f"--out={tmp_path}")
    assert_one_line_error(p, url, "--src=FILE", "data/humaneval/prepare.py")
    assert os.listdir(tmp_path) == []


def test_checksum_mismatch_writes_nothing(tmp_path):
    bad = write(tmp_path / "test.jsonl", json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    out = tmp_path / "out"
    p = run("gsm8k", "--only=test.jsonl", f"--url=file://{bad}", f"--out={out}")
    assert_one_line_error(p, "sha256", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14")
    assert not out.exists()


def test_src_needs_only_when_several_files(tmp_path):
    p = run("commonsense", f"--src={tmp_path / 'test.json'}", f"--out={tmp_path}")
    assert_one_line_error(p, "--only=", "boolq/test.jsonl")


def test_bad_source_file_is_one_line(tmp_path):
    src = write(tmp_path / "mbpp.jsonl", "this is not json\n")
    p = run("mbpp", f"--src={src}", f"--out={tmp_path / 'out'}")
    assert_one_line_error(p, "not JSON", notes=1)
    src = write(tmp_path / "other.jsonl", json.dumps({"question": "q"}) + "\n")
    p = run("mbpp", f"--src={src}", f"--out={tmp_path / 'out'}")
    assert_one_line_error(p, "no field 'task_id'", notes=1)
    assert not (tmp_path / "out").exists()


def test_write_jsonl_is_atomic(tmp_path):
    common = load("gsm8k").common
    path = tmp_path / "test.jsonl"
    common.write_jsonl([{"a": "é"}], str(path))
    with pytest.raises(TypeError):  # a row that cannot be written, halfway through
        common.write_jsonl([{"a": 1}, {"b": {1, 2}}], str(path))
    assert os.listdir(tmp_path) == ["test.jsonl"]  # the old file stands, no temp file left
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n'  # UTF-8, not \u escapes
