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

# GSM8K. Each official decision written down by reading MetaMath's eval_gsm8k.py (extract_answer_number:
# regex [\-+]?\d*[\.,/]?\d+ on what follows the last "The answer is: ", fractions through the `fraction`
# package, round() to an int, compared as float(pred) == float(int(gold))), not by running anything.
# (output, gold, MetaMath's prediction, MetaMath's decision, strict decision)
A = "The answer is: "
GSM8K_CASES = [
    ("She has 18 eggs left.", "18", None, False, False),  # no "The answer is: "
    ("the answer is: 18", "18", None, False, False),  # case sensitive
    (A + "twelve", "12", None, False, False),
    ("The answer is:18", "18", None, False, False),  # the space is part of the phrase
    (A + "18", "18", 18, True, True),
    (A + "17.5", "18", 18, True, False),  # rounded
    (A + "16.5", "16", 16, True, False),  # round() ties to even
    (A + "16.5", "17", 16, False, False),
    (A + "2.5", "3", 2, False, False),
    (A + "3.5", "4", 4, True, False),
    (A + "0.1", "0", 0, True, False),
    (A + ".5", "0", 0, True, False),
    (A + "-.5", "0", 0, True, False),  # round(-0.5) is -0, equal to 0.0
    (A + "1,450,000", "1450000", 1450, False, True),  # one separator at most: "1,450"
    (A + "1,450,000", "1450", 1450, True, False),
    (A + "1,000,000", "1000000", 1000, False, True),
    (A + "1,200", "1200", 1200, True, True),
    (A + "12,00", "1200", 1200, True, False),  # strict: "12" (a separator needs three digits after it)
    (A + "2,5", "25", 25, True, False),
    (A + "1 000", "1000", 1, False, False),
    (A + "1e3", "1000", 1, False, False),
    (A + "3/4", "1", 1, True, False),  # round(0.75)
    (A + "1/2", "0", 0, True, False),
    (A + "3/2", "2", 2, True, False),
    (A + "5/2", "2", 2, True, False),
    (A + "-7/2", "-4", -4, True, False),
    (A + "6/3", "2", 2, True, True),
    (A + "7/2 hours", "4", 4, True, False),
    (A + "5/0", "5", 5, True, False),  # denominator "0": the numerator; strict: no value
    (A + "0/0", "0", 0, True, False),
    (A + "5/00", "5", None, False, False),  # the fraction package raises (their script stops): no answer
    (A + "/4", "4", None, False, True),  # empty numerator: not a number; strict reads the 4
    (A + "12/0.5", "12", 12, True, False),  # the regex stops at "12/0"
    (A + "1.5/2", "2", 2, True, False),  # "1.5"; strict: 1.5/2
    (A + "-3", "-3", -3, True, True),
    (A + "-3", "3", -3, False, False),
    (A + "+7", "7", 7, True, True),
    (A + "$18.", "18", 18, True, True),
    (A + "$18.00 per day", "18", 18, True, True),
    (A + "x = 42", "42", 42, True, True),
    (A + "42%", "42", 42, True, True),
    (A + "7:30 pm", "7", 7, True, True),
    (A + "123456789", "123456789", 123456789, True, True),
    (A + "10 apples and 3 oranges", "10", 10, True, True),  # several numbers: the first
    (A + "18 (or 17.5)", "18", 18, True, True),
    (A + "5.\nWait, no.\n" + A + "7", "7", 7, True, True),  # several answers: the last phrase
    (A + "5.\nWait, no.\n" + A + "7", "5", 7, False, False),
    (A + "18\n" + A, "18", None, False, False),  # the last phrase has no number
    (A + "5.", "5", 5, True, True),
    ("Total 1,000 + 200 = 1,200\n" + A + "1200", "1,200", 1200, True, True),
]


@pytest.mark.parametrize("output,gold,pred,official,strict", GSM8K_CASES)
def test_gsm8k_metamath_decisions(output, gold, pred, official, strict):
    assert ev.metamath_gsm8k(output) == pred
    r = ev.score("gsm8k", output, {"gold": gold})
    assert (r["correct"], r["correct_strict"], r["valid"], r["disagree"]) == (official, strict, pred is not None,
                                                                             official != strict)


# MATH. Official decisions by reading MetaMath's eval_math.py (process_results: after the last "The answer is: ",
# up to the first ".\n", a final "." dropped) and util.is_equiv (strip_string on both, equal; if strip_string
# raises, the raw strings compared). Lenient: that, or our sympy check. (output, gold, official, lenient)
MATH_CASES = [
    ("so x = 1/2. \\boxed{\\frac12}", "\\frac{1}{2}", False, False),  # a box is not "The answer is: "
    (A + "\\frac12", "\\frac{1}{2}", True, True),
    (A + "\\frac1{72}", "\\frac{1}{72}", True, True),
    (A + "\\frac{72}1", "\\frac{72}{1}", False, False),  # "\frac{72}1" is left alone
    (A + "\\dfrac{3}{4}.", "\\frac{3}{4}", True, True),  # dfrac, the final "."
    (A + "\\tfrac{1}{3}", "\\frac13", True, True),
    (A + "3/4", "\\frac{3}{4}", True, True),  # a/b of two ints
    (A + "0.5", "\\frac{1}{2}", True, True),  # its one decimal rule
    (A + ".5", "\\frac{1}{2}", True, True),  # a leading "." gets its 0
    (A + "0.50", "\\frac{1}{2}", False, True),
    (A + "0.25", "\\frac{1}{4}", False, True),
    (A + "5 \\text{ cm}.\nDone", "5", True, True),  # units, the text after ".\n"
    (A + "6\\text{ sq. units}", "6", True, True),
    (A + "\\frac{1}{3}\\text{ inches}", "\\frac{1}{3}", True, True),
    (A + "3 \\text{ cm} \\times 4 \\text{ cm}", "3", False, False),  # "\text{ " twice: it raises, raw strings differ
    (A + "\\text{(A)}", "\\text{(A)}", True, True),
    (A + "x / 2", "x/2", False, True),  # int("x") raises: raw "x / 2" != "x/2"
    (A + "x/2", "x/2", True, True),  # raises on both, raw strings equal
    (A + "2 / 3x", "2/3x", False, True),
    (A + "1.5/2", "\\frac{3}{4}", False, True),  # int("1.5") raises
    (A + "\\frac{3}{4}\\frac", "\\frac{3}{4}", False, False),  # "\frac" at the end raises
    (A + "5\\sqrt", "5\\sqrt", True, True),  # raises on both, raw equal
    (A + "\\sqrt3", "\\sqrt{3}", True, True),
    (A + "\\sqrt 3", "\\sqrt{3}", False, False),  # the space is braced before spaces go: "\sqrt{}3"
    (A + "x = 5", "5", True, True),
    (A + "k = 3", "3", True, True),
    (A + "y = 2x + 3", "2x+3", True, True),
    (A + "xyz = 6", "6", False, False),  # only 1-2 characters before "=" go
    (A + "a=1, b=2", "1,2", False, False),  # two "=": kept
    (A + "10\\%", "10", True, True),
    (A + "4\\%", "4", True, True),
    (A + "90^\\circ", "90", True, True),
    (A + "90^{\\circ}", "90", True, True),
    (A + "\\$18.90", "18.90", True, True),
    (A + "$18.90", "18.90", False, True),  # a bare "$" stays
    (A + "1\\!000", "1000", True, True),
    (A + "1,000", "1000", False, True),
    (A + "\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True, True),
    (A + "\\left[ -2, 3 \\right)", "[-2,3)", True, True),
    (A + "(-\\infty, 3]", "(-\\infty,3]", True, True),
    (A + "[-2, 3]", "[-2,3)", False, False),
    (A + "(2, 1)", "(1,2)", False, False),
    (A + "\\leftarrow", "arrow", True, True),  # "\left" goes wherever it appears
    (A + "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", False, True),
    (A + "2(x+1)", "2x+2", False, True),
    (A + "1\n2", "12", True, True),  # newlines go
    (A + "2.\n" + A + "3.\n", "3", True, True),  # the last phrase
    (A + "3", "4", False, False),
    (A + ".\n", "0", False, False),  # an empty answer
    (A + "__import__('os').system('echo x')", "0", False, False),  # never evaluated
    (A + "10^{10^{10}}", "1", False, False),  # refused quickly, not computed
]


@pytest.mark.parametrize("output,gold,official,lenient", MATH_CASES)
def test_math_metamath_decisions(output, gold, official, lenient):
    r = ev.score("math", output, {"gold": gold})
    assert (r["correct"], r["correct_lenient"], r["disagree"]) == (official, lenient, official != lenient)
    assert r["valid"] == ("The answer is: " in output)


def test_math_gold_as_metamath_reads_it():
    # MetaMath's gold is remove_boxed(last_boxed_only_string(solution)): the last "\boxed" (an "\fbox" only when
    # there is none), braces balanced, and None unless it reads "\boxed{...}"; a None gold is never matched
    assert ev.metamath_gold("First \\boxed{2}. Then $\\boxed{\\frac{1}{\\sqrt{2}}}$.") == "\\frac{1}{\\sqrt{2}}"
    assert ev.metamath_gold("\\fbox{3} and \\boxed{4}") == "4"
    assert ev.metamath_gold("only \\fbox{3}") is None
    assert ev.metamath_gold("so it is $\\boxed 5$.") is None
    assert ev.metamath_gold("\\boxed{unclosed") is None and ev.metamath_gold("no box") is None
    row = {"problem": "p", "solution": "so it is $\\boxed 5$.", "answer": "5"}  # data/math/prepare.py reads 5
    ex = ev.make_example("math", row, "f", 1)
    assert (ex["gold"], ex["gold_metamath"]) == ("5", None)
    r = ev.score("math", "The answer is: 5", ex)
    assert (r["correct"], r["correct_lenient"], r["disagree"]) == (False, True, True)


def test_math_gold_from_boxed():
    sol = "First \\boxed{2}. Then $y = \\boxed{\\frac{1}{\\sqrt{2}}}$, so the answer is that."
    assert ev.last_boxed(sol) == "\\frac{1}{\\sqrt{2}}"
    assert ev.last_boxed("\\boxed{\\text{(A)}} and \\fbox{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert ev.last_boxed("so it is $\\boxed 5$.") == "5"
    assert ev.last_boxed("no box") is None and ev.last_boxed("\\boxed{unclosed") is None
    ex = [ev.make_example("math", row, "f", 1)
          for row in ({"problem": "p", "solution": sol}, {"problem": "q", "answer": "7"})]
    assert [e["gold"] for e in ex] == ["\\frac{1}{\\sqrt{2}}", "7"]
    assert ex[0]["prompt"].endswith("### Instruction:\np\n\n### Response: Let's think step by step.")


# Commonsense. Official decisions by reading LLM-Adapters' commonsense_evaluate.py: the decoded text between the
# first and a second "### Response:", stripped; re.findall of the set's pattern, the first hit, compared with
# the label as it is ("" when there is none). (task, generated text, label, prediction, decision)
COMMONSENSE_CASES = [
    ("boolq", "true", "true", "true", True),
    ("boolq", "false", "true", "false", False),
    ("boolq", "True", "true", None, False),  # lower case only
    ("boolq", "the answer is false, it is not true", "false", "false", True),
    ("boolq", "untrue", "true", "true", True),  # a substring counts
    ("boolq", "falsetrue", "true", "false", False),
    ("boolq", "It is False; true.", "true", "true", True),
    ("boolq", "", "false", None, False),
    ("boolq", "yes", "true", None, False),
    ("boolq", "false### Response: true", "true", "false", False),  # only up to a second "### Response:"
    ("boolq", "### Response: true", "true", None, False),
    ("boolq", "true", "true ", "true", False),  # the label is compared as it is
    ("piqa", "solution1", "solution1", "solution1", True),
    ("piqa", "solution2 is better than solution1", "solution1", "solution2", False),
    ("piqa", "solution3", "solution1", None, False),
    ("piqa", "Solution1", "solution1", None, False),
    ("piqa", "solution12", "solution1", "solution1", True),
    ("piqa", "solution 1", "solution1", None, False),
    ("piqa", "  solution2  ", "solution2", "solution2", True),
    ("social_i_qa", "answer5", "answer5", "answer5", True),  # five answers allowed though the set has three
    ("social_i_qa", "the correct answer is answer2", "answer2", "answer2", True),
    ("social_i_qa", "answer 2", "answer2", None, False),
    ("social_i_qa", "answer1answer2", "answer1", "answer1", True),
    ("ARC-Easy", "answer1 answer2", "answer2", "answer1", False),
    ("ARC-Easy", "answer4", "answer4", "answer4", True),
    ("ARC-Easy", "answer2### Response:answer1", "answer1", "answer2", False),
    ("ARC-Challenge", "answer3\n\n### Instruction:\nanswer1", "answer3", "answer3", True),  # no cut there
    ("ARC-Challenge", "I think it is answer10", "answer1", "answer1", True),
    ("ARC-Challenge", "\n\nanswer2", "answer2", "answer2", True),
    ("openbookqa", "I think answer3.", "answer3", "answer3", True),
    ("openbookqa", "answer6", "answer1", None, False),
    ("openbookqa", "answer5", "answer5", "answer5", True),
    ("hellaswag", "ending5 or ending2", "ending2", "ending2", True),  # four endings
    ("hellaswag", "ending4", "ending4", "ending4", True),
    ("hellaswag", "ending1ending2", "ending2", "ending1", False),
    ("hellaswag", "the ending is ending3.", "ending3", "ending3", True),
    ("winogrande", "option2", "option2", "option2", True),
    ("winogrande", "I don't know", "option1", None, False),
    ("winogrande", "Option1", "option1", None, False),
    ("winogrande", "option1 or option2", "option2", "option1", False),
    ("winogrande", "option", "option1", None, False),
]


@pytest.mark.parametrize("task,text,label,pred,correct", COMMONSENSE_CASES)
def test_commonsense_llm_adapters_decisions(task, text, label, pred, correct):
    output = ev.cut(text, ev.COMMONSENSE_STOPS)  # what generate_all keeps of the generated text
    assert ev.extract_commonsense(task, output) == pred
    assert ev.score(task, output, {"gold": label}) == {"extracted": pred, "correct": correct, "valid": pred is not None}


def test_commonsense_prompt_is_llm_adapters():
    # their generate_prompt(instruction) with no input, written out: the f-string keeps the indentation of the
    # source, and "request." is followed by a space
    ex = ev.make_example("piqa", {"instruction": "Q?", "input": "", "output": "x", "answer": "solution2"}, "f", 1)
    assert ex["prompt"] == ("Below is an instruction that describes a task. Write a response that appropriately "
                            "completes the request. \n\n                ### Instruction:\n                Q?\n\n"
                            "                ### Response:\n                ")
    assert ex["gold"] == "solution2" and ev.NUM_BEAMS["piqa"] == 4 and ev.MAX_NEW["piqa"] == 32


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
    scores = [ev.score("gsm8k", r, ex) for r, ex in zip(responses, examples)]
    assert all(s["correct_strict"] for s in scores)
    # MetaMath's regex takes one separator at most: a gold with two ("1,450,000") is read short, whatever the model
    two_separators = [ex["gold"].count(",") >= 2 for ex in examples]
    assert [not s["correct"] for s in scores] == two_separators and sum(two_separators) == 1
    rng = random.Random(0)
    perm = list(range(len(rows)))
    while any(i == p for i, p in enumerate(perm)):  # a derangement: nobody keeps their own solution
        rng.shuffle(perm)
    wrong = sum(ev.score("gsm8k", responses[p], ex)["correct"] for p, ex in zip(perm, examples))
    assert wrong / len(rows) < 0.03


# -----------------------------------------------------------------------------
# every task end to end on a tiny random checkpoint: batch sizes 1 and 8 give the same outputs

E2E_ROWS = {
    "gsm8k": [{"question": f"Tom has {i} apples and buys 3. How many?", "answer": f"{i}+3={i + 3}\n#### {i + 3}"}
              for i in range(3)],
    "math": [{"problem": f"What is ${i}+1$?", "solution": f"It is $\\boxed{{{i + 1}}}$.", "answer": str(i + 1)}
             for i in range(3)],
    "humaneval": [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"x + {i}\"\"\"\n",
                   "test": f"def check(c):\n    assert c(1) == {i + 1}\n", "entry_point": f"f{i}"} for i in range(3)],
    "mbpp": [{"task_id": i, "text": f"Write a function that adds {i}.", "test_list": [f"assert g(1) == {i + 1}"]}
             for i in range(3)],
    **{task: [{"instruction": f"Question {i} for {task}? Answer format: {ev.COMMONSENSE[task].replace('|', '/')}",
               "input": "", "output": "x", "answer": ev.COMMONSENSE[task].split("|")[i % 2]} for i in range(2)]
       for task in ev.COMMONSENSE},
    "ppl": [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i} {i}"} for i in range(3)],
}


# rgym prompts in the model's chat template, which this tokenizer lacks: tests/test_reasoning_gym.py runs it
@pytest.mark.parametrize("task", [t for t in ev.TASKS if t != "rgym"])
def test_every_task_end_to_end(task, tiny_checkpoint, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in E2E_ROWS[task]))
    runs = {}
    for bs in (1, 8):
        out = tmp_path / f"bs{bs}"
        summary = ev.main([f"--model={tiny_checkpoint}", f"--task={task}", f"--data={data}", f"--out={out}",
                           f"--batch_size={bs}", "--max_new_tokens=6", "--timeout=5", "--device=cpu"])
        with open(out / f"{task}_summary.json") as f:
            assert json.load(f)["settings"]["batch_size"] == bs
        with open(out / f"{task}_samples.jsonl") as f:
            runs[bs] = (summary, [json.loads(line) for line in f])
    (s1, samples1), (s8, samples8) = runs[1], runs[8]
    if task == "ppl":
        assert s1["tokens"] == s8["tokens"] > 0 and abs(s1["loss"] - s8["loss"]) < 1e-5 and samples1 == []
        return
    assert [s["output"] for s in samples1] == [s["output"] for s in samples8]
    assert [s["correct"] for s in samples1] == [s["correct"] for s in samples8]
    assert s1["n"] == len(E2E_ROWS[task]) and 0 <= s1["accuracy"] <= 1
    assert s1["settings"]["num_beams"] == (4 if task in ev.COMMONSENSE else 1)
    second = {"gsm8k": "accuracy_strict", "math": "accuracy_lenient"}.get(task)
    if second:  # two scores, and where they disagree
        assert second in s1 and "disagree" in s1 and all("disagree" in s for s in samples1)
    if task in ("humaneval", "mbpp"):
        assert s1["status"]["passed"] + s1["status"]["failed"] + s1["status"]["timeout"] == s1["n"]


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


def test_compile_decodes_the_same(tiny_checkpoint, tmp_path, monkeypatch):
    # --compile: the static KV cache and the compiled one-token step (traced by aot_eager here, inductor and CUDA
    # graphs on a GPU: tests/test_cuda.py); batches of 2 then 1, the second in the first's cache
    import functools

    import torch
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in E2E_ROWS["gsm8k"]))
    outputs = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"run{len(extra)}"
        summary = ev.main([f"--model={tiny_checkpoint}", "--task=gsm8k", f"--data={data}", f"--out={out}",
                           "--batch_size=2", "--max_new_tokens=12", "--device=cpu", *extra])
        assert summary["settings"]["compile"] == bool(extra)
        with open(out / "gsm8k_samples.jsonl") as f:
            outputs.append([json.loads(line)["output"] for line in f])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3 and any(outputs[0])
