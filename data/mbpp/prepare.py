"""
MBPP (Austin et al. 2021), Mostly Basic Python Problems: a one-line task description plus three
assert statements per problem. The paper's second code benchmark; we keep the test split.

    python data/mbpp/prepare.py                     # -> data/mbpp/test.jsonl (500 rows)
    python data/mbpp/prepare.py --src=mbpp.jsonl    # offline, a file fetched by hand

Source: google-research/google-research mbpp/mbpp.jsonl (all 974 problems) at a pinned commit
(an Apache-2.0 repository). Its README: task ids 11-510 are for evaluation, 1-10 for few-shot
prompts (the paper's 3-shot used 2, 3, 4), the rest for training. Fields kept: task_id, text,
code (reference solution), test_list (asserts), test_setup_code (usually empty).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

COMMIT = "8dadc6c56e2c2e51a9dd7e0d4bf2840922b4b6c0"
FILES = {
    "test.jsonl": (f"https://raw.githubusercontent.com/google-research/google-research/{COMMIT}/mbpp/mbpp.jsonl",
                   "ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f"),
}
TEST_IDS = range(11, 511)


def convert(records):
    test = [r for r in records if r["task_id"] in TEST_IDS]
    return common.pick(test, "task_id", "text", "code", "test_list", "test_setup_code")


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
