"""
Commonsense170K (Hu et al. 2023, LLM-Adapters): the train sets of the eight commonsense tasks
(BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) in one instruction format.
The paper's commonsense training set; data/commonsense/prepare.py makes the matching test sets.

    python data/commonsense170k/prepare.py                  # -> data/commonsense170k/train.jsonl
    python data/commonsense170k/prepare.py --src=commonsense_170k.json   # offline, fetched by hand

Source: AGI-Edgerunners/LLM-Adapters ft-training_set/commonsense_170k.json (one JSON array,
about 98 MB) at a pinned commit, Apache-2.0. Fields kept: instruction (the question with its
options and "Answer format: ..."), input (empty), output ("the correct answer is <answer>"),
answer (true / solution1 / answer2 / ending3 / option1 ...).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

COMMIT = "816657208af4db747803f87ba40a4c71383fed7a"
FILES = {
    "train.jsonl": (f"https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/{COMMIT}/ft-training_set/commonsense_170k.json",
                    "687b018be6b4665590772b03d96ceec63926a99573a174f4c8891cce0af53b73"),
}


def convert(records):
    return common.pick(records, "instruction", "input", "output", "answer")


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
