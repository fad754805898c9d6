"""
Synthetic data for the rank benchmark (bench/rankbench.py): a price list the base learns in pretraining, and a
fine-tune that must learn many independent prices, each a choice among 900 values, so that how many it can learn
grows with the adapter's rank. Deterministic from a seed; no download.

    python data/rankbench/generate.py --unseen=True --n_new=384 --rounds=25   # bench/rankbench.py's task
    python data/rankbench/generate.py                                         # edits: all 512 prices rewritten
    python data/rankbench/generate.py --n_stalls=256 --rounds=6 --out_dir=/tmp/rb

The task. A table gives each of n_stalls market stalls (numbers drawn from 100..999) a price, drawn uniformly
from 100..999 dollars, each independent of the others: n_stalls facts of log2(900) bits each. A problem asks one:

    Tom buys rice at stall 347. How many dollars does he pay?
    Let's think step by step.
    Everything at stall 347 costs 518 dollars.
    The answer is: 518

Every number 100..999 is one token of the tokenizer (a user-defined piece), so a stall is one key token and a
price one of 900 value tokens: the fine-tune must move the output at the price's position among 900 directions of
the unembedding, per key. A rank-r update adds at most r directions per matrix it adapts, so the number of
prices it can place grows with r; a price written as digits would be a few 10-way choices that rank 10 covers.

The base learns the table's prices. Its pretraining text has the problems, in this same response form, half of
them inside the instruction template that train.py and eval.py use, at the table's stalls at their prices, at any
of the 900 stalls (a stall outside the table at a fresh random price each time), and short sentences about stalls.
So the base copies the stall, routes it to the place where its price is written, copies the price to the answer
line and answers eval.py's prompt in the response's form. What the fine-tune teaches, two ways:
- new facts (--unseen=True --n_new=N; bench/rankbench.py's default, N = 384): N stalls outside the table, which the
  base saw only at random prices, each given a price; the base alone scores about 1/900 a problem.
- edits (--unseen=False, this script's default): n_new of the table's stalls (0: all) get a new price, an
  independent draw (the same as the old with chance 1/900): knowledge editing at scale (ROME and MEMIT edit one
  fact with a rank-one change). They learn in a cliff, a plateau then every fact at once, with a wide seed spread.
Either way the fine-tune writes N independent key -> value associations. (What did not discriminate, and why:
docs/RANKBENCH.md.)

Training problems cover the taught prices in `rounds` rounds: each round a shuffle of all of them, so every one is
in exactly `rounds` training problems; with --spread, from rounds*(1-spread) to rounds*(1+spread) of them instead,
all in one shuffle. Validation and test problems are new questions (no question string of train, validation or
test appears in another, nor in the pretraining text), built from the same entries: every price they ask was
taught; at random, or with --even_eval every price in turn (its count in a split within one of any other's).

Writes to out_dir: pretrain.txt, train.jsonl, val.jsonl, test.jsonl (GSM8K's question/answer "... #### N"
and MetaMathQA's query/response), table.json (the new and old prices), tokenizer.model and meta.json (the
settings, this file's and the demo generator's hashes, the sentencepiece version; written last: a finished build
with the same settings and code is reused, any other rebuilt).

Reuses data/demo/prepare.py's names, "Let's think step by step." and instruction template, and its
tokenizer settings (BPE, split digits; the numbers 100..999 are pieces of their own).
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
n_stalls = 512  # stalls in the price table (at most 900): the prices the base learns
n_new = 0  # of them, how many get a new price that the fine-tune teaches (0: all)
unseen = False  # True: the fine-tune teaches n_new stalls outside the table instead (new facts, not edits)
rounds = 8  # every table entry is in this many training problems (on average, with spread)
spread = 0.0  # > 0: a price's training problems run from rounds*(1-spread) to rounds*(1+spread), evenly over the
    # taught prices (which gets how many: a random draw), so some facts are frequent and some rare; 0: all rounds
even_eval = False  # val and test ask every taught price in turn (each as often) instead of at random
n_val = 500  # validation problems (for choosing settings), none a train or test question
n_test = 1000  # held-out problems, none a train question
n_pretrain = 40000  # pieces of pretraining text
vocab_size = 1600  # sentencepiece pieces: 256 bytes, the 900 numbers, the rest BPE merges (may stop short)
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
del DEFAULTS["HERE"], DEFAULTS["ROOT"]
# -----------------------------------------------------------------------------

NAMES = demo_prepare.NAMES  # buyers, with their pronoun
COT = demo_prepare.COT
GOODS = ["rice", "salt", "tea", "soap", "eggs", "milk", "bread", "beans", "nuts", "figs", "oil", "flour"]
VERBS = ["buys", "gets", "orders"]  # with the buyer and the goods: 288 questions a stall
STALLS = range(100, 1000)  # the stalls, and the prices (dollars): one token each
PROBLEMS = 0.8  # share of pretraining pieces that are worked problems; the rest short sentences about stalls
TEMPLATED = 0.5  # share of those inside the instruction template (eval.py's prompt, then the steps)
KNOWN = 0.8  # share of those at the table's stalls (at their old prices); the rest at any of the 900 stalls
HEAD, TAIL = demo_prepare.TEMPLATE.split("\n\n\n")  # "...### Instruction:", "### Response: Let's think step by step."
assert HEAD.endswith("### Instruction:") and TAIL == "### Response: " + COT
STEP = re.compile(r"Everything at stall (\d+) costs (\d+) dollars")  # a price stated in a solution: stall, price
ASKED = re.compile(r" at stall (\d+)\. How many")  # the stall a question asks about


def make_table(seed, n_stalls):
    """The prices the fine-tune teaches: {stall: price}, stalls in increasing order."""
    rng = random.Random(f"rankbench-table-{seed}")
    return {s: rng.choice(STALLS) for s in sorted(rng.sample(STALLS, n_stalls))}


def old_table(cfg):
    """The prices the base learns in pretraining, for the same stalls: drawn apart from the new ones (the same with
    chance 1/900 a stall)."""
    rng = random.Random(f"rankbench-old-{cfg['seed']}")
    return {s: rng.choice(STALLS) for s in make_table(cfg["seed"], cfg["n_stalls"])}


def problem(rng, stall, price):
    """-> (question, [steps], answer) for the stall at that price, a random buyer, verb and goods."""
    a = rng.choice(sorted(NAMES))
    q = f"{a} {rng.choice(VERBS)} {rng.choice(GOODS)} at stall {stall}. How many dollars does {NAMES[a]} pay?"
    return q, [f"Everything at stall {stall} costs {price} dollars."], price


def record(q, steps, answer):
    body = "\n".join(steps)
    return {"question": q, "answer": f"{body}\n#### {answer}", "query": q,
            "response": f"{COT}\n{body}\nThe answer is: {answer}"}


def pretrain_line(rng, old):
    """One piece of pretraining text, and its question if it is a worked problem (None if not): a worked problem
    (a share KNOWN of them at the table's stalls, at their old prices; the rest at any stall, a stall not in the
    table at a fresh random price) or a sentence about a stall."""
    if rng.random() < PROBLEMS:
        s = rng.choice(sorted(old)) if rng.random() < KNOWN else rng.choice(STALLS)
        q, steps, r = problem(rng, s, old[s] if s in old else rng.choice(STALLS))
        if rng.random() < TEMPLATED:  # eval.py's prompt for q, then the response as train.py trains it
            return "\n".join([f"{HEAD}\n{q}\n\n{TAIL}"] + steps + [f"The answer is: {r}"]), q
        return "\n".join([f"{q} {COT}"] + steps + [f"The answer is: {r}"]), q
    a, s = rng.choice(sorted(NAMES)), rng.choice(STALLS)
    return rng.choice([f"{a} goes to stall {s}.", f"Stall {s} sells {rng.choice(GOODS)}.",
                       f"{a} {rng.choice(VERBS)} {rng.choice(GOODS)} at stall {s}."]), None


def check(cfg):
    if not 1 <= cfg["n_stalls"] <= len(STALLS):
        raise ConfigError(f"--n_stalls={cfg['n_stalls']}: 1 to {len(STALLS)}")
    if not 0 <= cfg["n_new"] <= cfg["n_stalls"]:
        raise ConfigError(f"--n_new={cfg['n_new']}: 0 (all) to n_stalls={cfg['n_stalls']}")
    if cfg["unseen"] and not 1 <= cfg["n_new"] <= len(STALLS) - cfg["n_stalls"]:
        raise ConfigError(f"--unseen needs --n_new from 1 to the {len(STALLS) - cfg['n_stalls']} stalls outside the "
                          "table")
    if cfg["rounds"] < 1 or cfg["n_val"] < 0 or cfg["n_test"] < 1:
        raise ConfigError("--rounds and --n_test must be >= 1, --n_val >= 0")
    if not 0 <= cfg["spread"] < 1:
        raise ConfigError(f"--spread={cfg['spread']}: from 0 (every price in exactly rounds problems) to below 1")
    per_stall = len(NAMES) * len(VERBS) * len(GOODS)
    if cfg["spread"] and cfg["rounds"] * (1 - cfg["spread"]) < 1:
        raise ConfigError(f"--spread={cfg['spread']} with --rounds={cfg['rounds']}: the rarest price would get no "
                          "training problem (rounds * (1 - spread) must be >= 1)")
    most = cfg["rounds"] * (1 + cfg["spread"]) + (1 if cfg["spread"] else 0)  # rounding up
    most += 2 if cfg["even_eval"] else 0  # val and test each round up
    if most + (cfg["n_val"] + cfg["n_test"]) / (cfg["n_new"] or cfg["n_stalls"]) > per_stall / 2:
        raise ConfigError(f"--rounds={cfg['rounds']}, --n_val, --n_test: more questions a stall than half of "
                          f"the {per_stall} there are")


def pretraining(cfg):
    """-> (pretraining lines, the questions among them). They depend on seed, n_stalls and n_pretrain only, and
    the tokenizer on them only: every round count and split size shares one base."""
    rng, old = random.Random(f"rankbench-pretrain-{cfg['seed']}"), old_table(cfg)
    lines, questions = [], set()
    for _ in range(cfg["n_pretrain"]):
        line, q = pretrain_line(rng, old)
        lines.append(line)
        questions.add(q)
    return lines, questions - {None}


def build(cfg):
    """-> (records of train, val, test; pretrain lines; the new prices taught; {stall: its training problems}).
    Pure: the same cfg gives the same lists."""
    check(cfg)
    lines, seen = pretraining(cfg)  # no train, val or test question is one of pretraining's
    table = make_table(cfg["seed"], cfg["n_stalls"])
    rng = random.Random(f"rankbench-problems-{cfg['seed']}")
    if cfg["unseen"]:  # stalls the base saw only at random prices: their prices are new facts, not edits
        rest = [s for s in STALLS if s not in table]
        table = {s: rng.choice(STALLS) for s in sorted(rng.sample(rest, cfg["n_new"]))}
    elif cfg["n_new"]:  # the fine-tune changes these prices only; the others keep their old ones, never asked
        table = {s: table[s] for s in sorted(rng.sample(list(table), cfg["n_new"]))}
    keys = list(table)

    def new_question(stall):  # this stall, a buyer, verb and goods not asked before
        while True:
            q, steps, r = problem(rng, stall, table[stall])
            if q not in seen:
                seen.add(q)
                return record(q, steps, r)

    if cfg["spread"]:  # counts evenly from rounds*(1-spread) to rounds*(1+spread), dealt to the prices at random
        n, lo, hi = len(keys), cfg["rounds"] * (1 - cfg["spread"]), cfg["rounds"] * (1 + cfg["spread"])
        counts = dict(zip(rng.sample(keys, n), (round(lo + (hi - lo) * i / max(1, n - 1)) for i in range(n))))
        order = [s for s in keys for _ in range(counts[s])]
        rng.shuffle(order)
        train = [new_question(s) for s in order]
    else:
        counts = {s: cfg["rounds"] for s in keys}
        train = [new_question(s) for _ in range(cfg["rounds"]) for s in rng.sample(keys, len(keys))]
    if cfg["even_eval"]:  # every price asked in turn (rounds of a fresh order): at most one apart in a split
        def turns(k):
            return [s for _ in range(-(-k // len(keys))) for s in rng.sample(keys, len(keys))][:k]
        val = [new_question(s) for s in turns(cfg["n_val"])]
        test = [new_question(s) for s in turns(cfg["n_test"])]
    else:
        val = [new_question(rng.choice(keys)) for _ in range(cfg["n_val"])]
        test = [new_question(rng.choice(keys)) for _ in range(cfg["n_test"])]
    return train, val, test, lines, table, counts


def write_tokenizer(path, sentences, vocab_size):
    """The demo's tokenizer settings (data/demo/prepare.py): BPE, split digits, "\\n" a token, byte fallback; and
    every number 100..999 a piece of its own."""
    import sentencepiece as spm
    with open(path, "wb") as model:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1,
            user_defined_symbols=["\n"] + [str(n) for n in STALLS], normalization_rule_name="identity",
            remove_extra_whitespaces=False,
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
    train, val, test, lines, table, counts = build(cfg)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val), ("test.jsonl", test)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(out, "pretrain.txt"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    with open(os.path.join(out, "table.json"), "w") as f:
        old = old_table(cfg)
        json.dump([{"stall": s, "price": p, "old_price": old.get(s), "train_problems": counts[s]}
                   for s, p in table.items()], f, indent=0)
    meta["n_vocab"] = write_tokenizer(os.path.join(out, "tokenizer.model"), lines, cfg["vocab_size"])
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{out}: {len(table)} prices, {len(train)} train, {len(val)} val, {len(test)} test problems, "
          f"{len(lines)} pretrain lines, {meta['n_vocab']} tokens in {time.time() - t0:.1f}s")
    return out


def read_table(data_dir, which="price"):
    """{stall: price} of table.json: the new prices (which="price") or the base's (which="old_price"; none for an
    unseen stall)."""
    with open(os.path.join(data_dir, "table.json")) as f:
        return {e["stall"]: e[which] for e in json.load(f) if e[which] is not None}


def recall(output, question, table):
    """1.0 if the output states the asked stall's price right ("Everything at stall 347 costs 518 dollars": 518),
    else 0.0 (not stated, stated wrong, or another stall's). A second score beside the answer's: how much of the
    table a model holds, apart from copying it to the answer line."""
    asked = [int(s) for s in ASKED.findall(question)]
    stated = {int(s): int(p) for s, p in STEP.findall(output)}
    return sum(k in table and stated.get(k) == table[k] for k in asked) / len(asked) if asked else 0.0


def main(argv):
    return prepare(**parse_args(argv, DEFAULTS, __file__))


if __name__ == "__main__":
    cli(main, errors=(ConfigError, OSError))
