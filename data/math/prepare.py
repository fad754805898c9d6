"""
MATH (Hendrycks et al. 2021): 5,000 competition problems (algebra ... precalculus, levels 1-5),
the harder of the paper's two math benchmarks, scored by exact match of the final answer.

    python data/math/prepare.py                          # -> data/math/test.jsonl (5,000 rows)
    python data/math/prepare.py --src=MATH_test.jsonl    # offline, a file fetched by hand

Source: the copy MetaMath evaluates on (the BeamLoRA authors' math_infer.py reads a file of the
same name), meta-math/MetaMath data/test/MATH_test.jsonl at a pinned commit: the hendrycks test
set with problem / solution named instruction / output. A hendrycks-style file (problem,
solution; competition_math exported to JSON or JSONL) converts too. Fields written: problem,
solution, answer (the content of the last \\boxed{...} in the solution, as MATH's scorer takes it).
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

COMMIT = "7aac7eead1fc99ae5580805192f28c3e6cc8ebd9"
FILES = {
    # no sha256 published anywhere we could check; the run prints the one it downloaded
    "test.jsonl": (f"https://raw.githubusercontent.com/meta-math/MetaMath/{COMMIT}/data/test/MATH_test.jsonl", None),
}
BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(solution):
    starts = [m.end() for m in BOXED.finditer(solution)]
    if not starts:
        return None
    i = starts[-1]
    if solution[i:i + 1] != "{":  # a few write "\boxed 5$" with no braces
        return solution[i:].split("$")[0].strip() or None
    depth = 0
    for j in range(i, len(solution)):  # braces nest: \boxed{\frac{1}{2}}
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0:
            return solution[i + 1:j]
    return None  # unbalanced braces


def convert(records):
    rows = []
    for r in records:
        problem = r["problem"] if "problem" in r else r["instruction"]
        solution = r["solution"] if "solution" in r else r["output"]
        rows.append({"problem": problem, "solution": solution, "answer": last_boxed(solution)})
    return rows


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
