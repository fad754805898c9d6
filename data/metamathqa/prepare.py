"""
MetaMathQA (Yu et al. 2023): 395K question/answer pairs bootstrapped from the GSM8K and MATH
train sets (rephrased, self-verified and backward questions). The paper's math training set.

    python data/metamathqa/prepare.py                            # -> data/metamathqa/train.jsonl
    python data/metamathqa/prepare.py --src=MetaMathQA-395K.json     # offline, a file fetched by hand

Source: the Hugging Face dataset meta-math/MetaMathQA, file MetaMathQA-395K.json (one JSON array,
about 400 MB, read into memory whole), at a pinned revision, MIT licence. Fields kept: query,
response (ends with "The answer is: <answer>"), type (GSM_Rephrased, MATH_FOBAR, ...).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

REVISION = "aa4f34d3d2d3231299b5b03d9b3e5a20da45aa18"
FILES = {
    "train.jsonl": (f"https://huggingface.co/datasets/meta-math/MetaMathQA/resolve/{REVISION}/MetaMathQA-395K.json",
                    "fb39a5d8c05c042ece92eae37dfd5ea414a5979df2bf3ad3b86411bef8205725"),
}


def convert(records):
    return common.pick(records, "query", "response", "type")


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
