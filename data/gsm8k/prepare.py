"""
GSM8K (Cobbe et al. 2021), grade-school math word problems: the test set scores math fine-tuning,
the train set is there for completeness (MetaMathQA already augments it).

    python data/gsm8k/prepare.py            # -> data/gsm8k/train.jsonl (7,473), test.jsonl (1,319)
    python data/gsm8k/prepare.py --only=test.jsonl --src=test.jsonl   # offline, a file fetched by hand

Source: openai/grade-school-math at a pinned commit, MIT licence. Fields kept as they are:
question, answer (the reasoning, with <<calculator>> annotations, then "#### <final answer>").
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

COMMIT = "3101c7d5072418e28b9008a6636bde82a006892c"
BASE = f"https://raw.githubusercontent.com/openai/grade-school-math/{COMMIT}/grade_school_math/data"
FILES = {
    "train.jsonl": (f"{BASE}/train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "test.jsonl": (f"{BASE}/test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
}


def convert(records):
    return common.pick(records, "question", "answer")


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
