"""
The eight commonsense test sets of LLM-Adapters (Hu et al. 2023), in the instruction format of
Commonsense170K (data/commonsense170k/prepare.py); accuracy is the answer word the model writes.

    python data/commonsense/prepare.py               # -> data/commonsense/<task>/test.jsonl, 8 tasks
    python data/commonsense/prepare.py --only=boolq/test.jsonl --src=test.json   # offline, one task

Source: AGI-Edgerunners/LLM-Adapters dataset/<task>/test.json (JSON arrays) at a pinned commit,
Apache-2.0. Rows: boolq 3,270, piqa 1,838, social_i_qa 1,954, hellaswag 10,042, winogrande 1,267
(its public validation set), ARC-Easy 2,376, ARC-Challenge 1,172, openbookqa 500.
Fields kept: instruction, input, output, answer (as in Commonsense170K).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

COMMIT = "816657208af4db747803f87ba40a4c71383fed7a"
SHA256 = {
    "boolq": "779a192226b6fa2840340abacc46f9584b895c39d3c47b7aaf4d8585dda3ebc1",
    "piqa": "63cf5b5d088a06aceffc014cd76045e3c03d713ba0d4974260052956fe1e4234",
    "social_i_qa": "2318ddcfb429f35cbcb3f4b4f5caeccf9b9b4a51b9e2d0624c2771ee98c9f3a7",
    "hellaswag": "a1bfd0f1729c7e62ba1d1a211c283d459ff6c40476e3d1dcc2941ff338e7d207",
    "winogrande": "5a9db0e2ea6fddd05f8e1f71b0dd285f1377b210041d11853fc2fe7f7a06ac77",
    "ARC-Easy": "95d411e393f56adb47e431104b7df45fd5ca62c6c01b321075378e157c16c7ec",
    "ARC-Challenge": "2ff5c51f145fd602a081fe3b6452dc1c0f5ecc43c1a3d213e62f9c528d35d10c",
    "openbookqa": "3edf2c3acf92cbef8c196b731af433c25f2b253d6f45644d0ffc149d5bcac1bf",
}
FILES = {
    f"{task}/test.jsonl": (
        f"https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/{COMMIT}/dataset/{task}/test.json", sha)
    for task, sha in SHA256.items()
}


def convert(records):
    return common.pick(records, "instruction", "input", "output", "answer")


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
