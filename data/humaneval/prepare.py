"""
HumanEval (Chen et al. 2021): 164 hand-written Python functions to complete, scored by running
their unit tests (pass@1). One of the paper's two code benchmarks.

    python data/humaneval/prepare.py                    # -> data/humaneval/test.jsonl (164 rows)
    python data/humaneval/prepare.py --src=HumanEval.jsonl.gz     # offline, a file fetched by hand

Source: openai/human-eval data/HumanEval.jsonl.gz at a pinned commit, MIT licence. Fields kept:
task_id, prompt (signature + docstring, the model continues it), canonical_solution,
test (defines check(candidate)), entry_point (the function name to pass to check).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

COMMIT = "6d43fb980f9fee3c892a914eda09951f772ad10d"
FILES = {
    "test.jsonl": (f"https://raw.githubusercontent.com/openai/human-eval/{COMMIT}/data/HumanEval.jsonl.gz",
                   "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),
}


def convert(records):
    return common.pick(records, "task_id", "prompt", "canonical_solution", "test", "entry_point")


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
