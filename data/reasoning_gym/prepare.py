"""
Verifiable tasks from a third party: reasoning-gym's procedural generators (open-thought/reasoning-gym,
Apache-2.0), written as chat data for train.py --data_format=chat and eval.py --task=rgym. No download:
the problems are generated, from seeds, by the package (a data-preparation dependency only; eval.py's rgym
task needs it too, for its verifier).

    pip install reasoning-gym==0.1.25
    python data/reasoning_gym/prepare.py                               # -> data/reasoning_gym/*.jsonl
    python data/reasoning_gym/prepare.py --tasks=chain_sum_3x1 --n_train=500 --n_test=50 --seed=1

Writes to out_dir: train.jsonl (n_train problems per task, the tasks shuffled together), test.jsonl (n_test
per task, task by task) and meta.json (the settings, the package's version, the counts). A row: messages (the
question as the user turn, the gold answer as the assistant's reply: the fine-tune learns to answer with
the answer alone), answer, task, and the generator's metadata (what the verifier reads).

Held out means never trained on. reasoning-gym makes item i of seed s from random.Random(s + i), so two
seeds a few apart share items; and small problems repeat under any seeds. So: the held-out problems come
from generator seeds 10**8 after the training ones (the two ranges checked disjoint; each task
draws from its own, 10**9 apart), each
question once, and a training question that is also a held-out one is skipped; both are counted and the
final sets checked to share no question.

Every gold answer is recomputed here where the task allows (the expression's exact value with Python's
integers and fractions; the bits of the number) and a task with a wrong one is refused: reasoning-gym's
basic_arithmetic with two terms, no parentheses and '/' answers 'Calculate 5 / 33.' with 260 (24 of its
first 100 problems are wrong so), so it is offered without '/'. The tasks (TASKS below) and why these: docs/SMOLLM2.md.
"""
import ast
import json
import operator
import os
import random
import sys
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # configurator.py
from configurator import ConfigError, cli, parse_args  # noqa: E402

# -----------------------------------------------------------------------------
# defaults, overridden by --key=value (see configurator.py)
out_dir = os.path.dirname(os.path.abspath(__file__))  # where train.jsonl, test.jsonl and meta.json go
tasks = "chain_sum_3x1,chain_sum_2x2,products_2x2"  # the task mix: names in TASKS below, comma-separated
n_train = 2000  # training problems per task
n_test = 100  # held-out problems per task, none of them a training question
seed = 0  # the k-th task of TASKS trains on generator seeds seed + k 10**9 on, holds out from there + 10**8 on
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
# -----------------------------------------------------------------------------

VERSION = "0.1.25"  # the reasoning-gym release these tasks were checked with
TEST_OFFSET = 10 ** 8  # the held-out seeds start this far after the training seeds (their ranges never meet)
TASK_OFFSET = 10 ** 9  # and each task's this far after the previous task's: two tasks never draw the same numbers


def expression_value(expr):
    """The exact value of an arithmetic expression of integers, + - * / and parentheses (a Fraction), by
    Python's own parser and integers: nothing else is evaluated."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def value(node):
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise ValueError(f"not an integer expression: {expr!r}")
    return value(ast.parse(expr, mode="eval").body)


def expression_gold(entry):
    """Python's value of the generator's expression (None where it is not an integer, so never a gold)."""
    try:
        v = expression_value(entry["metadata"]["expression"])
    except (ValueError, SyntaxError, ZeroDivisionError):  # not an integer expression, or x / 0
        return None
    return str(v.numerator) if v.denominator == 1 else None


def popcount_gold(entry):
    return str(bin(entry["metadata"]["number"]).count("1"))


# name: (reasoning-gym dataset, its settings, the gold recomputed here). Each answer is an integer.
TASKS = {
    # a + b - c of one-digit numbers: "State the final answer to the following arithmetic problem: 3 - 5 - 0 ="
    "chain_sum_3x1": ("chain_sum", dict(min_terms=3, max_terms=3, min_digits=1, max_digits=1), expression_gold),
    # a + b or a - b of two-digit numbers
    "chain_sum_2x2": ("chain_sum", dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2), expression_gold),
    # a * b of two-digit numbers: "Solve the following multiplication: 38 * 57. Give only the result as ..."
    "products_2x2": ("products", dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2), expression_gold),
    # "Calculate 28 + 47." with +, - or * of two two-digit numbers ('/' is left out: its golds are wrong)
    "basic_arithmetic_2x2": ("basic_arithmetic", dict(min_terms=2, max_terms=2, min_digits=2, max_digits=2,
                                                      operators=("+", "-", "*"), allow_parentheses=False,
                                                      allow_negation=False), expression_gold),
    # the 1 bits of a number below 256
    "count_bits_8": ("count_bits", dict(min_n=1, max_n=255), popcount_gold),
}


def import_rg():
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError(f"reasoning-gym is not installed: pip install reasoning-gym=={VERSION}") from None
    return reasoning_gym


def check_golds(name, entries):
    """Every entry's gold equals the value recomputed here, else the task is refused (one line, an example)."""
    recompute = TASKS[name][2]
    wrong = [(e, recompute(e)) for e in entries if recompute(e) != e["answer"]]
    if wrong:
        (e, want), n = wrong[0], len(wrong)
        raise ConfigError(f"{name}: {n} of {len(entries)} gold answers are wrong, e.g. {e['question']!r} -> "
                          f"{e['answer']!r}, recomputed {want!r}; not written")


def generate(name, n, first_seed, skip=(), limit=TEST_OFFSET):
    """n problems of task `name` with distinct questions not in `skip`, from generator seeds first_seed on (at most
    `limit` of them). -> (entries, counts: seeds used, repeats, skipped)"""
    rg = import_rg()
    dataset, settings, _ = TASKS[name]
    ds = rg.create_dataset(dataset, seed=first_seed, size=limit, **settings)
    entries, seen, counts = [], set(), {"seeds": 0, "repeats": 0, "held_out_skipped": 0}
    while len(entries) < n:
        if counts["seeds"] >= min(limit, 20 * n + 1000):
            raise ConfigError(f"{name}: only {len(entries)} distinct questions in {counts['seeds']} draws, fewer "
                              f"than the {n} asked for; ask for fewer")
        try:
            e = ds[counts["seeds"]]  # item i: random.Random(first_seed + i)
        except Exception as err:  # the library's own failure on these settings
            raise ConfigError(f"{name}: reasoning-gym's {dataset} failed on item {counts['seeds']} "
                              f"({type(err).__name__}: {err})") from None
        counts["seeds"] += 1
        if e["question"] in seen:
            counts["repeats"] += 1
        elif e["question"] in skip:
            counts["held_out_skipped"] += 1
        else:
            seen.add(e["question"])
            entries.append(e)
    return entries, counts


def row(name, e):
    return {"messages": [{"role": "user", "content": e["question"]}, {"role": "assistant", "content": e["answer"]}],
            "answer": e["answer"], "task": name, "metadata": e["metadata"]}


def write_jsonl(rows, path):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)  # whole or not at all


def prepare(out_dir=out_dir, tasks=tasks, n_train=n_train, n_test=n_test, seed=seed):
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    for t in names:
        if t not in TASKS:
            raise ConfigError(f"--tasks: unknown task {t!r}; the tasks: {', '.join(TASKS)}")
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--tasks={tasks!r}: one or more task names, each once")
    if n_train < 0 or n_test < 1 or n_train + n_test == 0:
        raise ConfigError(f"--n_train={n_train}, --n_test={n_test}: n_train 0 or more, n_test 1 or more")
    if not 0 <= seed < 2 ** 60:
        raise ConfigError(f"--seed={seed}: 0 or more")
    import_rg()
    from importlib.metadata import version
    if version("reasoning-gym") != VERSION:  # another release may generate other problems from the same seeds
        print(f"note: reasoning-gym {version('reasoning-gym')}, not {VERSION}: the problems may differ",
              file=sys.stderr)
    train, test = [], []
    meta = {"settings": {"tasks": ",".join(names), "n_train": n_train, "n_test": n_test, "seed": seed},
            "reasoning_gym": version("reasoning-gym"), "tasks": {}}
    for name in names:
        first = seed + list(TASKS).index(name) * TASK_OFFSET  # by its place in TASKS: the same in any mix
        held, held_counts = generate(name, n_test, first + TEST_OFFSET)
        held_questions = {e["question"] for e in held}
        trained, train_counts = generate(name, n_train, first, skip=held_questions)
        # the seed ranges are disjoint, and no held-out question is a training one
        train_seeds = [first, first + train_counts["seeds"]]
        test_seeds = [first + TEST_OFFSET, first + TEST_OFFSET + held_counts["seeds"]]
        assert train_seeds[1] <= test_seeds[0] and not held_questions & {e["question"] for e in trained}
        check_golds(name, held + trained)
        dataset, settings, _ = TASKS[name]
        meta["tasks"][name] = {"dataset": dataset, "settings": settings,
                               "train": {**train_counts, "rows": len(trained), "seed_range": train_seeds},
                               "test": {**held_counts, "rows": len(held), "seed_range": test_seeds}}
        train += [row(name, e) for e in trained]
        test += [row(name, e) for e in held]
        print(f"{name}: {len(trained)} train ({train_counts['repeats']} repeated questions and "
              f"{train_counts['held_out_skipped']} held-out ones skipped in {train_counts['seeds']} draws), "
              f"{len(held)} held out ({held_counts['repeats']} repeats skipped); every gold answer recomputed")
        for e in held[:2]:
            print(f"    {e['question']!r} -> {e['answer']}")
    random.Random(seed).shuffle(train)
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(train, os.path.join(out_dir, "train.jsonl"))
    write_jsonl(test, os.path.join(out_dir, "test.jsonl"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{out_dir}: train.jsonl ({len(train)} rows), test.jsonl ({len(test)} rows), meta.json")
    return meta


def main(argv):
    return prepare(**parse_args(argv, DEFAULTS, __file__))


if __name__ == "__main__":
    cli(main, errors=(ConfigError, OSError))
