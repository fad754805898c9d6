"""eval.py: answer extraction and scoring, the code sandbox, the CLI end to end on a tiny random Llama."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED
import eval as ev

GSM8K_TEST = os.path.join(SHARED, "data", "gsm8k", "test.jsonl")


# -----------------------------------------------------------------------------
# answer extraction

GSM8K_CASES = [  # (output, gold, valid, correct)
    ("She has 18 eggs left, so 18 dollars.", "18", False, False),  # no "The answer is: "
    ("the answer is: 18", "18", False, False),  # the phrase is case sensitive, as in MetaMath
    ("The answer is: twelve", "12", False, False),
    ("The answer is: 1,200,000", "1200000", True, True),  # MetaMath's own regex would read 1,200
    ("The answer is: $18.", "18", True, True),
    ("The answer is: $18.00 per day", "18", True, True),
    ("The answer is: -3", "-3", True, True),
    ("The answer is: -3", "3", True, False),
    ("The answer is: 3/4", "0.75", True, True),
    ("The answer is: 6/8", "3/4", True, True),  # fractions compare by value
    ("The answer is: 5/0", "5", False, False),
    ("The answer is: 18.5", "18", True, False),
    ("The answer is: 10 apples and 3 oranges", "10", True, True),
    ("The answer is: 5.\nWait, no.\nThe answer is: 7", "7", True, True),  # the last one counts
    ("The answer is: 5.\nWait, no.\nThe answer is: 7", "5", True, False),
    ("Total 1,000 + 200 = 1,200\nThe answer is: 1200", "1,200", True, True),
]


@pytest.mark.parametrize("output,gold,valid,correct", GSM8K_CASES)
def test_gsm8k_extraction(output, gold, valid, correct):
    pred = ev.extract_gsm8k(output)
    assert (pred is not None and ev.to_fraction(pred) is not None) == valid
    assert ev.gsm8k_correct(pred, gold) == correct


MATH_CASES = [  # (output, gold, valid, strict, lenient)
    ("so x = 1/2. \\boxed{\\frac12}", "\\frac{1}{2}", False, False, False),  # a box is not "The answer is: "
    ("The answer is: \\frac12", "\\frac{1}{2}", True, True, True),
    ("The answer is: 0.5", "\\frac{1}{2}", True, True, True),  # MetaMath's one decimal rule
    ("The answer is: 0.25", "\\frac{1}{4}", True, False, True),  # only sympy sees this one
    ("The answer is: \\dfrac{3}{4}.", "\\frac{3}{4}", True, True, True),  # trailing dot, dfrac
    ("The answer is: 3/4", "\\frac{3}{4}", True, True, True),
    ("The answer is: 5 \\text{ cm}.\nDone", "5", True, True, True),  # units, text after ".\n"
    ("The answer is: x = 5", "5", True, True, True),
    ("The answer is: 10\\%", "10", True, True, True),
    ("The answer is: 90^\\circ", "90", True, True, True),
    ("The answer is: \\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True, True, True),
    ("The answer is: (2, 1)", "(1,2)", True, False, False),
    ("The answer is: \\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True, False, True),
    ("The answer is: 2(x+1)", "2x+2", True, False, True),
    ("The answer is: 1,000", "1000", True, False, True),
    ("The answer is: 2.\nThe answer is: 3.\n", "3", True, True, True),
    ("The answer is: 3", "4", True, False, False),
    ("The answer is: __import__('os').system('echo x')", "0", True, False, False),  # never evaluated
    ("The answer is: 10^{10^{10}}", "1", True, False, False),  # refused quickly, not computed
]


@pytest.mark.parametrize("output,gold,valid,strict,lenient", MATH_CASES)
def test_math_extraction(output, gold, valid, strict, lenient):
    pred = ev.extract_math(output)
    assert (pred is not None) == valid
    assert (pred is not None and ev.normalize_math(pred) == ev.normalize_math(gold)) == strict
    assert ev.math_equal(pred, gold) == lenient


def test_math_gold_from_boxed():
    sol = "First \\boxed{2}. Then $y = \\boxed{\\frac{1}{\\sqrt{2}}}$, so the answer is that."
    assert ev.last_boxed(sol) == "\\frac{1}{\\sqrt{2}}"
    assert ev.last_boxed("\\boxed{\\text{(A)}} and \\fbox{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert ev.last_boxed("so it is $\\boxed 5$.") == "5"
    assert ev.last_boxed("no box") is None and ev.last_boxed("\\boxed{unclosed") is None
    ex = [ev.make_example("math", row, "f", 1) for row in ({"problem": "p", "solution": sol}, {"problem": "q", "answer": "7"})]
    assert [e["gold"] for e in ex] == ["\\frac{1}{\\sqrt{2}}", "7"]
    assert ex[0]["prompt"].endswith("### Instruction:\np\n\n### Response: Let's think step by step.")


COMMONSENSE_CASES = [  # (task, output, prediction, gold)
    ("boolq", "the answer is false, it is not true", "false", "false"),
    ("boolq", "True", None, "true"),  # lower case only, as LLM-Adapters
    ("piqa", "solution2 is better than solution1", "solution2", "solution1"),
    ("piqa", "solution3", None, "solution1"),
    ("social_i_qa", "the correct answer is answer5", "answer5", "answer5"),
    ("ARC-Easy", "answer1 answer2", "answer1", "answer2"),
    ("ARC-Challenge", "answer4", "answer4", "answer4"),
    ("openbookqa", "I think answer3.", "answer3", "answer3"),
    ("hellaswag", "ending5 or ending2", "ending2", "ending2"),
    ("winogrande", "option2", "option2", "option2"),
    ("winogrande", "I don't know", None, "option1"),
]


@pytest.mark.parametrize("task,output,pred,gold", COMMONSENSE_CASES)
def test_commonsense_extraction(task, output, pred, gold):
    assert ev.extract_commonsense(task, output) == pred
    assert ev.score(task, output, {"gold": gold}) == {"extracted": pred, "correct": pred == gold, "valid": pred is not None}
    ex = ev.make_example(task, {"instruction": "Q?", "input": "", "output": "x", "answer": gold}, "f", 1)
    assert ex["gold"] == gold and ex["prompt"].endswith("### Instruction:\nQ?\n\n### Response:\n")


def test_extract_code():
    assert ev.extract_code("Here:\n```python\ndef f():\n    return 1\n```\nThen ```python\nx\n```") == \
        "def f():\n    return 1\n"
    assert ev.extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert ev.extract_code("```Python\nprint(1)") == "print(1)\n"  # unclosed block
    assert ev.extract_code("    return a + b\n\n") == "    return a + b\n"  # indentation kept


# -----------------------------------------------------------------------------
# GSM8K gold solutions in MetaMath's response form score 100%, deranged ones about 0%

def gsm8k_rows(n=None):
    if not os.path.isfile(GSM8K_TEST):
        pytest.skip("shared GSM8K data not present")
    return ev.read_jsonl(GSM8K_TEST)[:n]


def as_metamath(answer):
    body, final = answer.split("####")
    return re.sub(r"<<[^>]*>>", "", body).strip() + "\nThe answer is: " + final.strip()


def test_gsm8k_gold_solutions():
    rows = gsm8k_rows()
    examples = [ev.make_example("gsm8k", row, GSM8K_TEST, i) for i, row in rows]
    responses = [as_metamath(row["answer"]) for _, row in rows]
    assert all(ev.score("gsm8k", r, ex)["correct"] for r, ex in zip(responses, examples))
    rng = random.Random(0)
    perm = list(range(len(rows)))
    while any(i == p for i, p in enumerate(perm)):  # a derangement: nobody keeps their own solution
        rng.shuffle(perm)
    wrong = sum(ev.score("gsm8k", responses[p], ex)["correct"] for p, ex in zip(perm, examples))
    assert wrong / len(rows) < 0.03


# -----------------------------------------------------------------------------
# the code sandbox, through score() as eval.py calls it

MBPP_EX = {"gold": 1, "test_setup_code": "", "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}


def mbpp(body, timeout=2.0):
    return ev.score("mbpp", f"Sure:\n```python\ndef add(a, b):\n{body}\n```\n", MBPP_EX, timeout=timeout)


def test_sandbox_pass_fail_loop():
    assert mbpp("    return a + b")["status"] == "passed"
    assert mbpp("    return a - b")["status"] == "failed"
    assert mbpp("    return a +")["status"] == "failed"  # syntax error
    r = mbpp("    while True:\n        pass")
    assert r["status"] == "timeout" and not r["correct"]


def test_sandbox_refuses_writes_outside(tmp_path):
    target = tmp_path / "escaped.txt"
    for attempt in [f"open({str(target)!r}, 'w').write('x')", f"import pathlib; pathlib.Path({str(target)!r}).touch()",
                    f"import os; os.system('touch {target}')", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                    f"import subprocess; subprocess.run(['touch', {str(target)!r}])",
                    f"import os; os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))"]:
        r = mbpp(f"    {attempt}\n    return a + b")
        assert r["status"] == "failed", attempt
        assert not target.exists() and tmp_path.exists(), attempt
    # writing inside its own scratch dir is fine
    assert mbpp("    open('scratch.txt', 'w').write('x'); import os; os.remove('scratch.txt')\n    return a + b")["correct"]


def test_sandbox_no_network():
    r = mbpp("    import socket; socket.create_connection(('127.0.0.1', 9)); return a + b")
    assert r["status"] == "failed"
    r = ev.run_program("import _socket\n_socket.socket()\n", timeout=2)
    assert r["status"] == "failed" and "PermissionError" in r["log"]


def test_sandbox_memory_limit():
    r = ev.run_program("x = bytearray(8 << 30)\n", timeout=5, memory_mb=1024)
    assert r["status"] == "failed" and "MemoryError" in r["log"]


def test_humaneval_program():
    ex = {"gold": "HumanEval/0", "code_prompt": 'def inc(x: int) -> int:\n    """x + 1"""\n', "entry_point": "inc",
          "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"}
    assert ev.score("humaneval", "    return x + 1\n", ex)["correct"]  # a bare body continues the prompt
    assert ev.score("humaneval", "```python\ndef inc(x):\n    return x + 1\n```", ex)["correct"]  # a full def
    assert not ev.score("humaneval", "    return x\n", ex)["correct"]


# -----------------------------------------------------------------------------
# the command line: bad input gives one line on stderr and a non-zero exit

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def one_line_error(p, code, *words):
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_inputs(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    data = tmp_path / "data.jsonl"
    one_line_error(run_cli("--model=x", "--task=gsm8k", "--data=y", "--bogus=1"), 2, "--bogus", "--model", "--limit")
    one_line_error(run_cli(f"--model={ckpt}", "--task=gsm8k", f"--data={data}", "--limit=many"), 2, "--limit")
    one_line_error(run_cli(f"--model={ckpt}", "--task=gsm9k", f"--data={data}"), 2, "--task", "gsm8k")
    one_line_error(run_cli(f"--model={tmp_path / 'nope'}", "--task=gsm8k", f"--data={data}"), 1, "nope")
    one_line_error(run_cli(f"--model={ckpt}", "--task=gsm8k", f"--data={data}"), 1, str(data), "not found")
    data.write_text("\n")
    one_line_error(run_cli(f"--model={ckpt}", "--task=gsm8k", f"--data={data}"), 1, str(data), "no examples")
    data.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": \n')
    one_line_error(run_cli(f"--model={ckpt}", "--task=gsm8k", f"--data={data}"), 1, f"{data}:2", "malformed")
    data.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    one_line_error(run_cli(f"--model={ckpt}", "--task=gsm8k", f"--data={data}"), 1, f"{data}:2", "'answer'")
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    one_line_error(run_cli(f"--model={ckpt}", "--task=gsm8k", f"--data={data}"), 1, str(ckpt))  # no weights
