"""
Synthetic data for the rank benchmark (bench/rankbench.py): word problems whose answer needs a price table
the base has never seen, so a fine-tune has many independent facts to learn and what it learns grows with
the adapter's capacity. Deterministic from a seed; no download.

    python data/rankbench/generate.py                              # -> out/rankbench/data/
    python data/rankbench/generate.py --n_stalls=256 --rounds=6 --out_dir=/tmp/rb

The task. A table gives each of n_stalls market stalls (three-digit numbers drawn from 100..999) a price per
bag, drawn uniformly from price_min..price_max, each independent of the others: n_stalls facts of
log2(price_max - price_min + 1) bits each, none derivable from another. A problem buys bags at `lookups`
stalls and asks the total:

    Tom buys 3 bags at stall 347 and 2 bags at stall 125. How many dollars does he pay?
    Let's think step by step.
    3 bags at stall 347 cost 3*7=21 dollars.
    2 bags at stall 125 cost 2*4=8 dollars.
    In all he pays 21+8=29 dollars.
    The answer is: 29

Each step restates its clause of the question word for word (copying, which the base learns in pretraining), so
the price comes right after its key. Keys are numbers because the base learns to copy digits and not words: with
named keys ("3 apples at the Bako shop", 8 items x 64 shops) two bases pretrained for 2000 steps copied the
counts but wrote one shop and one item for every problem ("3 stickers at the Kafu shop"), their loss on the shop
log(64) and on the item log(8), as if guessing (docs/RANKBENCH.md).

The pretraining text has the same problems, in this same response form, half of them inside the instruction
template that train.py and eval.py use, but every price drawn afresh for each piece (no table), plus the
multiplication and addition facts they use: the base can write the steps and do the arithmetic for any price
and stall, answers eval.py's prompt in the response's form, and has trained the output rows of "The answer is:",
but cannot know a price (its guess is uniform: about 1/11 a price, 1/121 a problem). The fine-tune has the table
to learn and nothing else. (Without the template in pretraining, LoRA spent its first ~300 steps learning to
answer through it, and a 400-step fine-tune learned no price at all: docs/RANKBENCH.md.)
Training problems cover it in `rounds` rounds: each round a shuffle of all the table's entries, taken `lookups`
at a time, so every entry is in exactly `rounds` training problems.
Validation and test problems are new questions (no question string of train, validation or test appears in
another, nor in the pretraining text), built from the same entries: every price they ask was taught.

Writes to out_dir: pretrain.txt, train.jsonl, val.jsonl, test.jsonl (GSM8K's question/answer "... #### N"
and MetaMathQA's query/response), table.json (the prices), tokenizer.model and meta.json (the settings, this
file's and the demo generator's hashes, the sentencepiece version; written last: a finished build with the
same settings and code is reused, any other rebuilt).

Reuses data/demo/prepare.py's names, "Let's think step by step." and instruction template, and its
tokenizer settings (a BPE with split digits, so no price can be a token of its own).
"""
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # configurator.py
from configurator import ConfigError, cli, parse_args  # noqa: E402

_spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
demo_prepare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo_prepare)

# -----------------------------------------------------------------------------
# defaults, overridden by --key=value (see configurator.py); bench/rankbench.py passes its own
out_dir = os.path.join(ROOT, "out", "rankbench", "data")  # where the files go
seed = 0  # the table, the problems and their order
n_stalls = 512  # stalls in the price table (at most 900): the prices to learn
rounds = 8  # every table entry is in this many training problems
lookups = 2  # stalls (prices) a problem needs
price_min = 2  # prices are drawn uniformly from price_min..price_max dollars
price_max = 12  # (counts are 2..9: every product is a times-table fact of the pretraining)
n_val = 500  # validation problems (for choosing settings), none a train or test question
n_test = 1000  # held-out problems, none a train question
n_pretrain = 40000  # pieces of pretraining text
vocab_size = 768  # sentencepiece pieces (BPE may stop short of it)
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
del DEFAULTS["HERE"], DEFAULTS["ROOT"]
# -----------------------------------------------------------------------------

NAMES = demo_prepare.NAMES  # buyers, with their pronoun
COT = demo_prepare.COT
COUNTS = range(2, 10)
STALLS = range(100, 1000)
PROBLEMS = 0.6  # share of pretraining pieces that are worked problems (random prices); the rest facts and sentences
TEMPLATED = 0.5  # share of those inside the instruction template (eval.py's prompt, then the steps)
HEAD, TAIL = demo_prepare.TEMPLATE.split("\n\n\n")  # "...### Instruction:", "### Response: Let's think step by step."
assert HEAD.endswith("### Instruction:") and TAIL == "### Response: " + COT
STEP = re.compile(r"\d+ bags at stall (\d+) cost \d+\*(\d+)=")  # a price used in a solution: stall, price
ASKED = re.compile(r"\d+ bags at stall (\d+)")  # a stall a question asks about


def make_table(seed, n_stalls, price_min, price_max):
    """{stall: price}, stalls in increasing order."""
    rng = random.Random(f"rankbench-table-{seed}")
    return {s: rng.randint(price_min, price_max) for s in sorted(rng.sample(STALLS, n_stalls))}


def problem(rng, entries, price):
    """entries: [(count, stall)]; price: stall -> dollars. -> (question, [steps], answer)."""
    a = rng.choice(sorted(NAMES))
    he = NAMES[a]
    buys = [f"{c} bags at stall {s}" for c, s in entries]
    buys = buys[0] if len(buys) == 1 else ", ".join(buys[:-1]) + " and " + buys[-1]
    q = f"{a} buys {buys}. How many dollars does {he} pay?"
    steps, costs = [], []
    for c, s in entries:
        p = price(s)
        costs.append(c * p)
        steps.append(f"{c} bags at stall {s} cost {c}*{p}={c * p} dollars.")
    total = costs[0]
    for cost in costs[1:]:  # one sum a step: 21+8=29, then 29+15=44
        steps.append(f"In all {he} pays {total}+{cost}={total + cost} dollars.")
        total += cost
    return q, steps, total


def record(q, steps, answer):
    body = "\n".join(steps)
    return {"question": q, "answer": f"{body}\n#### {answer}", "query": q,
            "response": f"{COT}\n{body}\nThe answer is: {answer}"}


def pretrain_line(rng, cfg):
    """One piece of pretraining text, and its question if it is a worked problem (None if not): a worked problem
    at any stalls with fresh random prices, a times-table or addition fact, or a sentence about a stall."""
    rand_price = lambda s: rng.randint(cfg["price_min"], cfg["price_max"])  # noqa: E731
    u = rng.random()
    if u < PROBLEMS:
        n = 1 if rng.random() < 0.25 else cfg["lookups"]
        q, steps, r = problem(rng, [(rng.choice(COUNTS), s) for s in rng.sample(STALLS, n)], rand_price)
        if rng.random() < TEMPLATED:  # eval.py's prompt for q, then the response as train.py trains it
            return "\n".join([f"{HEAD}\n{q}\n\n{TAIL}"] + steps + [f"The answer is: {r}"]), q
        return "\n".join([f"{q} {COT}"] + steps + [f"The answer is: {r}"]), q
    u = (u - PROBLEMS) / (1 - PROBLEMS)
    if u < 0.4:  # a product the problems use
        c, p = rng.choice(COUNTS), rng.randint(cfg["price_min"], cfg["price_max"])
        return (f"{c}*{p}={c * p}" if rng.random() < 0.5 else f"{c} times {p} is {c * p}."), None
    if u < 0.8:  # a sum of two such products
        x = rng.choice(COUNTS) * rng.randint(cfg["price_min"], cfg["price_max"])
        y = rng.choice(COUNTS) * rng.randint(cfg["price_min"], cfg["price_max"])
        return (f"{x}+{y}={x + y}" if rng.random() < 0.5 else f"{x} plus {y} is {x + y}."), None
    a, s = rng.choice(sorted(NAMES)), rng.choice(STALLS)
    return rng.choice([f"{a} goes to stall {s}.", f"Stall {s} sells bags.", f"{a} buys bags at stall {s}.",
                       f"{a} buys {rng.choice(COUNTS)} bags at stall {s}."]), None


def check(cfg):
    if not 1 <= cfg["n_stalls"] <= len(STALLS):
        raise ConfigError(f"--n_stalls={cfg['n_stalls']}: 1 to {len(STALLS)}")
    if cfg["rounds"] < 1 or not 1 <= cfg["lookups"] <= cfg["n_stalls"] or cfg["n_val"] < 0 or cfg["n_test"] < 1:
        raise ConfigError("--rounds and --n_test must be >= 1, --lookups 1 to n_stalls, --n_val >= 0")
    if cfg["n_stalls"] % cfg["lookups"]:
        raise ConfigError(f"--lookups={cfg['lookups']} must divide --n_stalls={cfg['n_stalls']}: each round takes "
                          "every stall once")
    if not 1 <= cfg["price_min"] <= cfg["price_max"]:
        raise ConfigError(f"--price_min={cfg['price_min']}, --price_max={cfg['price_max']}: 1 <= min <= max")


def pretraining(cfg):
    """-> (pretraining lines, the questions among them). They depend on seed, n_pretrain, lookups and the price
    range only, and the tokenizer on them only: every table size, round count and split size shares one base."""
    rng = random.Random(f"rankbench-pretrain-{cfg['seed']}")
    lines, questions = [], set()
    for _ in range(cfg["n_pretrain"]):
        line, q = pretrain_line(rng, cfg)
        lines.append(line)
        questions.add(q)
    return lines, questions - {None}


def build(cfg):
    """-> (records of train, val, test; pretrain lines; table). Pure: the same cfg gives the same lists."""
    check(cfg)
    lines, seen = pretraining(cfg)  # no train, val or test question is one of pretraining's
    table = make_table(cfg["seed"], cfg["n_stalls"], cfg["price_min"], cfg["price_max"])
    keys = list(table)
    rng = random.Random(f"rankbench-problems-{cfg['seed']}")
    price = table.__getitem__
    train = []
    for _ in range(cfg["rounds"]):  # every entry once a round
        order = rng.sample(keys, len(keys))
        for k in range(0, len(order), cfg["lookups"]):
            while True:  # these stalls, new counts and buyer until the question is a new one
                q, steps, r = problem(rng, [(rng.choice(COUNTS), s) for s in order[k:k + cfg["lookups"]]], price)
                if q not in seen:
                    break
            seen.add(q)
            train.append(record(q, steps, r))
    held = []
    for n in (cfg["n_val"], cfg["n_test"]):
        rows = []
        while len(rows) < n:
            q, steps, r = problem(rng, [(rng.choice(COUNTS), s) for s in rng.sample(keys, cfg["lookups"])], price)
            if q not in seen:  # a new question (one seen before reappears only by chance: skipped)
                seen.add(q)
                rows.append(record(q, steps, r))
        held.append(rows)
    val, test = held
    return train, val, test, lines, table


def write_tokenizer(path, sentences, vocab_size):
    """The demo's tokenizer settings (data/demo/prepare.py): BPE, split digits, "\\n" a token, byte fallback."""
    import sentencepiece as spm
    with open(path, "wb") as model:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1,
            user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=path).get_piece_size()


def code_hash():
    h = hashlib.sha256()
    for path in (__file__, demo_prepare.__file__):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def prepare(**settings):
    """Writes the files to settings' out_dir (default DEFAULTS) unless a finished build with the same settings
    and code is there; -> out_dir."""
    cfg = dict(DEFAULTS, **settings)
    check(cfg)
    import sentencepiece as spm
    out = cfg["out_dir"]
    meta = {k: v for k, v in cfg.items() if k != "out_dir"}
    meta.update(generator=code_hash(), sentencepiece=spm.__version__)
    names = ["pretrain.txt", "train.jsonl", "val.jsonl", "test.jsonl", "table.json", "tokenizer.model", "meta.json"]
    meta_path = os.path.join(out, "meta.json")
    if all(os.path.isfile(os.path.join(out, n)) for n in names):
        with open(meta_path) as f:
            if {k: v for k, v in json.load(f).items() if k != "n_vocab"} == meta:
                print(f"{out}: up to date")
                return out
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # until the new files are all written, none are trusted
    train, val, test, lines, table = build(cfg)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val), ("test.jsonl", test)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(out, "pretrain.txt"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump([{"stall": s, "price": p} for s, p in table.items()], f, indent=0)
    meta["n_vocab"] = write_tokenizer(os.path.join(out, "tokenizer.model"), lines, cfg["vocab_size"])
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{out}: {len(table)} prices, {len(train)} train, {len(val)} val, {len(test)} test problems, "
          f"{len(lines)} pretrain lines, {meta['n_vocab']} tokens in {time.time() - t0:.1f}s")
    return out


def read_table(data_dir):
    with open(os.path.join(data_dir, "table.json")) as f:
        return {e["stall"]: e["price"] for e in json.load(f)}


def recall(output, question, table):
    """The share of the question's stall prices that the output uses right ("3 bags at stall 347 cost 3*7=21
    dollars": 7): a price not used, or used wrong, counts as missed. A second score beside the
    answer's: how much of the table a model holds, apart from its arithmetic."""
    asked = [int(s) for s in ASKED.findall(question)]
    stated = {int(s): int(p) for s, p in STEP.findall(output)}
    return sum(k in table and stated.get(k) == table[k] for k in asked) / len(asked) if asked else 0.0


def main(argv):
    return prepare(**parse_args(argv, DEFAULTS, __file__))


if __name__ == "__main__":
    cli(main, errors=(ConfigError, OSError))
