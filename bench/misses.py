"""
Why did a run miss? Sorts the wrong answers of eval.py's GSM8K samples (gsm8k_samples.jsonl) by the first
thing that went wrong in the calculator annotations of the solution ("<<9*2=18>>18"):

    arithmetic  an annotation's result is not what its expression gives ("58-51=17")
    copy        an annotation uses a number that is neither in the prompt nor an earlier result
                ("gives 32" in the question, "36-30" in the solution)
    format      neither, and the scorer found no answer (eval.py's "invalid"): "The answer isThe 41"
    answer      neither, and the answer line does not repeat the last result ("...=10>>10 left.\nThe answer is: 11")
    other       none of these: a wrong plan, a missing step

    python bench/misses.py out/demo/beamlora/eval/gsm8k_samples.jsonl [more files ...]

On the demo these kinds tell a fine-tune that did not learn to read the question through the instruction template
(copy misses by the dozen) or to write the answer line (format: its tokens never occur in the base's pretraining text)
from one that only slips in arithmetic, which no setting removes at this size.
"""
import ast
import operator
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import cli  # noqa: E402  (standard library only, as this script)

ANNOTATION = re.compile(r"<<([^<>=]+)=(-?\d+(?:\.\d+)?)>>")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def value(expr):
    """An annotation's expression: numbers and + - * / only (parsed, never eval'd); None if anything else."""
    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            a, b = walk(node.left), walk(node.right)
            if a is None or b is None or (b == 0 and isinstance(node.op, ast.Div)):
                return None
            return OPS[type(node.op)](a, b)
        return None
    try:
        return walk(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        return None


def kind(prompt, output, valid=True, extracted=None):
    """'arithmetic', 'copy', 'format', 'answer' or 'other': the first annotation of output that goes wrong, in order;
    if none, whether the scorer read an answer (valid) and whether it (extracted) is the last result."""
    known, last = {float(n) for n in NUMBER.findall(prompt)}, None
    for expr, result in ANNOTATION.findall(output):
        if any(float(n) not in known for n in NUMBER.findall(expr)):
            return "copy"
        v = value(expr)
        if v is None or abs(v - float(result)) > 1e-9:
            return "arithmetic"
        known.add(float(result))
        last = float(result)
    if not valid:
        return "format"
    try:
        return "answer" if last is not None and extracted is not None and float(extracted) != last else "other"
    except (TypeError, ValueError):
        return "other"


def count(path):
    """{'n', 'correct', 'arithmetic', 'copy', 'format', 'answer', 'other'} of one samples file."""
    from eval import read_jsonl  # eval.py's reader: UTF-8, JSON objects, blank lines skipped, line numbers
    c = dict(n=0, correct=0, arithmetic=0, copy=0, format=0, answer=0, other=0)
    for n, row in read_jsonl(path):
        try:
            prompt, output, correct = row["prompt"], row["output"], row["correct"]
        except KeyError:
            raise ValueError(f"{path}:{n}: not an eval.py sample (needs prompt, output, correct)") from None
        c["n"] += 1
        c["correct" if correct else kind(prompt, output, row.get("valid", True), row.get("extracted"))] += 1
    return c


def main(paths):
    if not paths or paths[0] in ("-h", "--help"):
        print(__doc__.strip())
        return []
    out = []
    for p in paths:
        c = count(p)
        out.append(c)
        print(f"{p}: {c['correct']} of {c['n']} right; misses: arithmetic {c['arithmetic']}, copy {c['copy']}, "
              f"format {c['format']}, answer {c['answer']}, other {c['other']}")
    return out


if __name__ == "__main__":
    cli(main)
