"""
How much of the demo task does a base do before any fine-tune? The demo's base never sees the instruction
template nor "The answer is:", so eval.py scores it 0%; but its pretraining text has worked problems (a
question, then one solution step a line). Here each held-out question is given as the pretraining text gives
it, the question and a line break, the base continues greedily, and a problem counts as done when the last of
the first k generated lines (k: the number of steps of its reference solution) ends in the right number.

    python bench/base_probe.py --model=out/demo/base/<key>/model
    python bench/base_probe.py --model=out/demo_s0/base/<key>/model --adapter=... --limit=2000

A weak base by this measure (78% on the demo's seed 0 before its last redesign, 96% after) made a weak
and seed-dependent adapter (76% and 96%); demo.py explains the settings.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, cli, parse_args  # noqa: E402

# -----------------------------------------------------------------------------
model = ""  # the base: an HF checkpoint dir (demo.py builds out/demo/base/<key>/model)
adapter = ""  # optionally a LoRA adapter dir, merged in (then the template-free skill after a fine-tune)
data = os.path.join(ROOT, "data", "demo", "build", "test.jsonl")  # held-out problems (GSM8K fields question, answer)
limit = 500  # the first this many problems; 0: all
batch_size = 100  # problems decoded at once
max_new_tokens = 96  # a solution here is about 60 tokens
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
del DEFAULTS["ROOT"]
# -----------------------------------------------------------------------------
RESULT = re.compile(r">>(\d+)")  # the calculator annotation's result, "<<3*4=12>>12"


def done(output, answer):
    """The reference answer "step\\nstep\\n#### N": are the first len(steps) lines of output ending in N?"""
    steps, gold = answer.rsplit("\n#### ", 1)
    k = steps.count("\n") + 1
    lines = output.strip("\n").split("\n")[:k]
    results = RESULT.findall(lines[-1]) if len(lines) == k else []
    return bool(results) and results[-1] == gold.strip()


def main(argv):
    cfg = parse_args(argv, DEFAULTS, __file__)
    if not cfg["model"]:
        raise ConfigError("--model: give the base's checkpoint dir")
    import eval as eval_lib
    from generate import generate
    model, tok, _ = eval_lib.load_model(cfg["model"], cfg["adapter"], device="cpu")
    rows = []
    for n, row in eval_lib.read_jsonl(cfg["data"]):  # eval.py's reader: UTF-8, JSON objects, blank lines skipped
        if not isinstance(row.get("question"), str) or "\n#### " not in str(row.get("answer")):
            raise ConfigError(f"{cfg['data']}:{n}: needs question and answer (steps, then '#### N')")
        rows.append(row)
    rows = rows[:cfg["limit"]] if cfg["limit"] else rows
    n_done = 0
    for i in range(0, len(rows), cfg["batch_size"]):
        batch = rows[i:i + cfg["batch_size"]]
        outs = generate(model, [tok.encode(r["question"] + "\n", bos=True) for r in batch], cfg["max_new_tokens"])
        n_done += sum(done(tok.decode(o), r["answer"]) for o, r in zip(outs, batch))
    print(f"{cfg['model']}: {n_done} of {len(rows)} held-out problems finished right in the pretraining format "
          f"({100 * n_done / len(rows):.1f}%)")
    return n_done / len(rows)


if __name__ == "__main__":
    cli(main)
