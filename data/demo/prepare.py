"""
Synthetic data for the offline demo (python train.py with no arguments): GSM8K-style word problems
small enough for a ~1-5M-parameter LLaMA trained from scratch on a CPU, a pretraining corpus in the
same domain, and a sentencepiece tokenizer trained on both. No download.

    python data/demo/prepare.py                                   # -> data/demo/build/
    python data/demo/prepare.py --n_train=4000 --n_test=2000 --n_pretrain=30000 --seed=1

Writes to out_dir: pretrain.txt (plain text: worked problems, a question and then one solution step
a line, never a held-out question; arithmetic facts, counting, sentences, one-step stories; never the
instruction template, and "The answer is" only in the share answer_form of worked problems written in the
response's form), train.jsonl and test.jsonl (disjoint questions; each
record has GSM8K's question/answer, answer ending "#### N", and MetaMathQA's query/response,
response "Let's think step by step.\n<steps>\nThe answer is: N"), tokenizer.model, meta.json (the
settings, this file's hash and the sentencepiece version; written last, so a finished build with the
same settings and code is reused, and any other is rebuilt).

Why the response starts with "Let's think step by step.": train.py (data_format=metamathqa) trains on
"...### Response:" + response, and eval.py prompts with "...### Response: Let's think step by step." (the
MetaMath protocol). Real MetaMathQA responses lack the phrase and a 7B model bridges the gap; a few-million
parameter model trained from scratch may not. With the phrase in the response, eval's prompt is token for
token a prefix of every training sequence, and what the model generates after it is what it was trained on.
The steps start on a new line after it, as they follow the question in the pretraining text: a step's first word
is then the same token as there ("The", not "▁The"), and the fine-tune need not learn the steps' first tokens anew.
"""
import hashlib
import json
import os
import random
import sys
import time

import sentencepiece as spm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # configurator.py
from configurator import ConfigError, cli, parse_args  # noqa: E402

# -----------------------------------------------------------------------------
# defaults, overridden by --key=value (see configurator.py); demo.py passes its own
out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build")  # where the files go
seed = 1337  # the problems, the corpus and their order
n_train = 4000  # word problems to fine-tune on
n_test = 2000  # held-out problems, none of them a training question
n_pretrain = 60000  # pieces of pretraining text
vocab_size = 768  # sentencepiece pieces (BPE may stop short of it)
# the response's form: "Let's think step by step." after the question, "The answer is: N" after the steps. The demo's
# fine-tune teaches it (0); bench/compare.py's base has seen it (0.3), so its output rows are trained in pretraining
answer_form = 0.0  # the share of the worked problems written in the response's form
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
# -----------------------------------------------------------------------------

NAMES = {"Tom": "he", "Ben": "he", "Sam": "he", "Max": "he", "Anna": "she", "Lily": "she", "Mia": "she", "Emma": "she"}
ITEMS = ["apples", "pencils", "cookies", "stickers", "marbles", "books", "cards", "eggs"]
# 60% of the pretraining pieces (~90% of its tokens) are worked problems, the question and its steps as plain text (no
# instruction template, no "The answer is"): the base learns the arithmetic and the steps there, as a real LLM learns
# maths from the web, so fine-tuning teaches the instruction format and the answer line rather than arithmetic from
# scratch. With none, the fine-tuned accuracy sat on a knife edge (23-50% between torch builds); with 30% of the pieces
# (9k problems seen 5 times) some seeds' bases never learned to copy a late number of the question (67-99% between
# seeds); 60% of 60k pieces (36k problems, seen 1.6 times in the same steps) leaves fewer to memorise, more to copy.
WORKED = 0.6
COT = "Let's think step by step."  # the end of eval.py's prompt, the start of each response here
# eval.py's prompt with an empty instruction, for the tokenizer only: its words get pieces of their own
# (pretraining never shows it, fine-tuning puts no loss on it)
TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n\n\n### Response: " + COT)


def calc(x, op, y):
    # GSM8K's calculator annotation: "3*4=<<3*4=12>>12" -> (text, 12); only exact integer results
    r = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x // y
    return f"{x}{op}{y}=<<{x}{op}{y}={r}>>{r}", r


def problem(rng):
    """-> (question, [solution steps], answer). Two or three steps, every value a small integer >= 0."""
    a, b = rng.sample(sorted(NAMES), 2)
    he, item = NAMES[a], rng.choice(ITEMS)
    He, His = he.capitalize(), {"he": "His", "she": "Her"}[he]
    kind = rng.randrange(6)
    if kind == 0:  # buy, then give away
        x, y = rng.randint(5, 40), rng.randint(2, 20)
        t1, s = calc(x, "+", y)
        z = rng.randint(1, s - 1)
        t2, r = calc(s, "-", z)
        q = (f"{a} has {x} {item}. {He} buys {y} more {item}. Then {he} gives {z} {item} to {b}. "
             f"How many {item} does {a} have now?")
        steps = [f"{a} buys {y} more, so {he} has {t1} {item}.",
                 f"{He} gives {z} to {b}, so {he} has {t2} {item} left."]
    elif kind == 1:  # packs, then some used up
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        t1, s = calc(x, "*", y)
        z = rng.randint(1, s - 1)
        t2, r = calc(s, "-", z)
        q = (f"{a} buys {x} packs of {item}. Each pack has {y} {item}. {He} gives {z} {item} to {b}. "
             f"How many {item} does {a} have left?")
        steps = [f"{x} packs of {y} {item} make {t1} {item}.", f"{He} gives {z} to {b}, so {he} has {t2} {item} left."]
    elif kind == 2:  # bags, then shared equally
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        t1, s = calc(x, "*", y)
        k = rng.choice([d for d in range(2, 10) if s % d == 0])
        t2, r = calc(s, "/", k)
        q = (f"{a} has {x} bags with {y} {item} in each bag. {He} shares all the {item} equally among {k} friends. "
             f"How many {item} does each friend get?")
        steps = [f"{x} bags of {y} {item} make {t1} {item}.",
                 f"Shared equally among {k} friends, each friend gets {t2} {item}."]
    elif kind == 3:  # "y more than", then together
        x, y = rng.randint(3, 30), rng.randint(2, 20)
        t1, s = calc(x, "+", y)
        t2, r = calc(x, "+", s)
        q = f"{a} has {x} {item}. {b} has {y} more {item} than {a}. How many {item} do they have together?"
        steps = [f"{b} has {t1} {item}.", f"Together they have {t2} {item}."]
    elif kind == 4:  # price times count, then change
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        t1, s = calc(x, "*", y)
        c = 50 if s < 50 else 100
        t2, r = calc(c, "-", s)
        q = (f"{a} buys {x} {item} that cost {y} dollars each. {He} pays with a {c} dollar bill. "
             f"How much change does {he} get?")
        steps = [f"The {item} cost {t1} dollars.", f"{His} change is {t2} dollars."]
    else:  # boxes, buy more, give away: three steps
        x, y, z = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 20)
        t1, s = calc(x, "*", y)
        t2, u = calc(s, "+", z)
        w = rng.randint(1, u - 1)
        t3, r = calc(u, "-", w)
        q = (f"{a} has {x} boxes of {item} with {y} {item} in each box. {He} buys {z} more {item} and gives {w} {item} "
             f"to {b}. How many {item} does {a} have now?")
        steps = [f"{x} boxes of {y} {item} make {t1} {item}.", f"{He} buys {z} more, so {he} has {t2} {item}.",
                 f"{He} gives {w} to {b}, so {he} has {t3} {item} left."]
    return q, steps, r


def pretrain_line(rng, held_out, answer_form=0.0):
    """One piece of plain domain text: a worked problem (never one of held_out's questions; a share answer_form of
    them in the response's form), an arithmetic fact, counting, a sentence or a one-step story. Only worked problems
    span lines (question, then one step a line)."""
    u = rng.random()
    if u < WORKED:
        while True:
            q, steps, r = problem(rng)
            if q not in held_out:
                break
        if answer_form and rng.random() < answer_form:  # no draw at 0: the demo's corpus keeps its bytes
            return "\n".join([f"{q} {COT}"] + steps + [f"The answer is: {r}"])  # "▁Let" as after eval's prompt
        return "\n".join([q] + steps)
    u = (u - WORKED) / (1 - WORKED)  # the rest of the mix as before
    a, b = rng.sample(sorted(NAMES), 2)
    he, item = NAMES[a], rng.choice(ITEMS)
    He = he.capitalize()
    if u < 0.35:  # a fact, operands from the ranges the problems use
        op = rng.choice("+-*/")
        x, y, m = rng.randint(0, 110), rng.randint(1, 12), rng.randint(1, 12)  # results stay whole and >= 0
        x, y = {"+": (x % 90, rng.randint(0, 50)), "-": (x, rng.randint(0, x)), "*": (m, y), "/": (m * y, y)}[op]
        r, words = calc(x, op, y)[1], {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}[op]
        return f"{x}{op}{y}={r}" if rng.random() < 0.5 else f"{x} {words} {y} is {r}."
    if u < 0.45:  # counting by k
        x, k, n = rng.randint(0, 30), rng.randint(1, 10), rng.randint(4, 8)
        return ", ".join(str(x + i * k) for i in range(n)) + "."
    if u < 0.6:  # plain sentences
        x = rng.randint(1, 50)
        return rng.choice([f"{a} likes {item}.", f"{a} has {x} {item}.", f"{a} gives {x} {item} to {b}.",
                           f"{b} has more {item} than {a}.", f"{He} puts {x} {item} in a box."])
    # a one-step story in the words of a solution step (with its annotation), never "The answer is"
    x, y, k, m, p = rng.randint(5, 40), rng.randint(2, 20), rng.randint(2, 9), rng.randint(2, 9), rng.randint(4, 81)
    z, c, box = rng.randint(1, x + y - 1), 50 if p < 50 else 100, rng.choice(["packs", "bags", "boxes"])
    return rng.choice([
        f"{a} has {x} {item}. {He} buys {y} more, so {he} has {calc(x, '+', y)[0]} {item}.",
        f"{a} has {x + y} {item}. {He} gives {z} to {b}, so {he} has {calc(x + y, '-', z)[0]} {item} left.",
        f"{a} has {x} {item}. {b} has {y} more {item} than {a}, so {b} has {calc(x, '+', y)[0]} {item}.",
        f"{a} has {k} {box} of {m} {item}. {k} {box} of {m} {item} make {calc(k, '*', m)[0]} {item}.",
        f"{a} shares {k * m} {item} equally among {k} friends. Each friend gets {calc(k * m, '/', k)[0]} {item}.",
        f"{a} pays {p} dollars with a {c} dollar bill. {He} gets {calc(c, '-', p)[0]} dollars in change."])


def prepare(out_dir=out_dir, seed=seed, n_train=n_train, n_test=n_test, n_pretrain=n_pretrain, vocab_size=vocab_size,
            answer_form=answer_form):
    if not 0 <= answer_form <= 1:
        raise ConfigError(f"--answer_form={answer_form}: a share, 0 to 1")
    with open(__file__, "rb") as f:  # a change to this generator, or another sentencepiece, rebuilds
        code = hashlib.sha256(f.read()).hexdigest()[:12]
    meta = {"seed": seed, "n_train": n_train, "n_test": n_test, "n_pretrain": n_pretrain, "vocab_size": vocab_size,
            "answer_form": answer_form, "generator": code, "sentencepiece": spm.__version__}
    names = ["pretrain.txt", "train.jsonl", "test.jsonl", "tokenizer.model", "meta.json"]
    meta_path = os.path.join(out_dir, "meta.json")
    if all(os.path.isfile(os.path.join(out_dir, n)) for n in names):
        with open(meta_path) as f:
            if {k: v for k, v in json.load(f).items() if k != "n_vocab"} == meta:
                print(f"{out_dir}: up to date")
                return out_dir
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # until the new files are all written, none are trusted
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < n_test + n_train:  # unique questions, so test never repeats a train question
        q, steps, r = problem(rng)
        if q not in seen:
            seen.add(q)
            body = "\n".join(steps)
            records.append({"question": q, "answer": f"{body}\n#### {r}",
                            "query": q, "response": f"{COT}\n{body}\nThe answer is: {r}"})
    test, train = records[:n_test], records[n_test:]
    held_out = {row["question"] for row in test}
    lines = [pretrain_line(rng, held_out, answer_form) for _ in range(n_pretrain)]
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(out_dir, "pretrain.txt"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    # the tokenizer sees sentences in a fixed order, one thread: the same seed gives the same bytes. Responses go in
    # whole, as the model sees them: words right after a "\n" have no "▁" in front and get pieces of their own
    sentences = lines + [s for row in train for s in (row["query"], row["response"])] + [TEMPLATE] * 20
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as model:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True, split_digits=True, num_threads=1,
            user_defined_symbols=["\n"],  # newline as a token, so multi-line solutions round-trip
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    # BPE stops early when the corpus has fewer merges than asked for (hard_vocab_limit=False)
    meta["n_vocab"] = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model")).get_piece_size()
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{out_dir}: {n_train} train, {n_test} test, {n_pretrain} pretrain lines, {meta['n_vocab']} tokens "
          f"in {time.time() - t0:.1f}s")
    return out_dir


def main(argv):
    return prepare(**parse_args(argv, DEFAULTS, __file__))


if __name__ == "__main__":
    cli(main, errors=(ConfigError, OSError))
