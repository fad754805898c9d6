"""
Code-Feedback (Zheng et al. 2024, OpenCodeInterpreter): 66K multi-turn coding conversations with
execution and human feedback. The paper's code training set.

    python data/code_feedback/prepare.py                          # -> data/code_feedback/train.jsonl
    python data/code_feedback/prepare.py --src=Code-Feedback.jsonl    # offline, a file fetched by hand

Source: the Hugging Face dataset m-a-p/Code-Feedback, file Code-Feedback.jsonl (about 400 MB), at
a pinned revision, Apache-2.0. Field kept: messages, a list of {role, content} (user / assistant
turns). The BeamLoRA authors' train.py actually reads fxmeng/CodeFeedback-Python105K (the Python
part of m-a-p/CodeFeedback-Filtered-Instruction, single turn, query / response), published only as
parquet; exported to JSON or JSONL it converts here too, each record becoming a two-turn messages.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/common.py
import common

REVISION = "f411b16a97c910ac9acf8b0d0948e340aa77cc34"
FILES = {
    # no sha256 published anywhere we could check; the run prints the one it downloaded
    "train.jsonl": (f"https://huggingface.co/datasets/m-a-p/Code-Feedback/resolve/{REVISION}/Code-Feedback.jsonl",
                    None),
}


def convert(records):
    rows = []
    for r in records:
        if "messages" in r:
            messages = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        else:  # the single-turn query / response layout of CodeFeedback-Python105K
            messages = [{"role": "user", "content": r["query"]}, {"role": "assistant", "content": r["response"]}]
        rows.append({"messages": messages})
    return rows


if __name__ == "__main__":
    common.prepare(__file__, FILES, convert)
