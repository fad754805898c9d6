# The rank benchmark (bench/rankbench.py, data/rankbench/generate.py) at tiny sizes: the generator is
# deterministic, held-out questions never occur in training or pretraining, every asked price is taught, and the
# scorers (eval.py's gsm8k decision and the generator's recall) on hand-made replies.
import importlib.util
import json
import os

import pytest

from conftest import ROOT

TINY = dict(seed=3, n_stalls=24, rounds=3, n_val=20, n_test=30, n_pretrain=300)


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gen():
    return load("data/rankbench/generate.py", "rankbench_generate")


@pytest.fixture(scope="module")
def rb():
    return load("bench/rankbench.py", "rankbench")


def cfg(gen, **kw):
    return {**gen.DEFAULTS, **TINY, **kw}


def test_build_is_deterministic_and_seeded(gen):
    a, b = gen.build(cfg(gen)), gen.build(cfg(gen))
    assert a == b
    other = gen.build(cfg(gen, seed=4))
    assert other[4] != a[4] and other[0] != a[0]  # another seed: another table, other problems


def test_files_are_deterministic(gen, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    gen.prepare(out_dir=one, **TINY)
    gen.prepare(out_dir=two, **TINY)
    for name in ("pretrain.txt", "train.jsonl", "val.jsonl", "test.jsonl", "table.json", "tokenizer.model",
                 "meta.json"):
        with open(os.path.join(one, name), "rb") as f, open(os.path.join(two, name), "rb") as g:
            assert f.read() == g.read(), name
    mtime = os.path.getmtime(os.path.join(one, "train.jsonl"))
    gen.prepare(out_dir=one, **TINY)  # up to date: not rewritten
    assert os.path.getmtime(os.path.join(one, "train.jsonl")) == mtime


def test_pretraining_is_the_same_for_every_round_count_and_split(gen, tmp_path):
    # one base serves them all: its corpus and tokenizer depend on the table's stalls, not on rounds or the splits
    a, b = gen.build(cfg(gen)), gen.build(cfg(gen, rounds=5, n_val=7, n_test=9))
    assert a[3] == b[3] and a[0] != b[0]
    assert gen.build(cfg(gen, n_stalls=48))[3] != a[3]
    one = gen.prepare(out_dir=str(tmp_path / "one"), **TINY)
    two = gen.prepare(out_dir=str(tmp_path / "two"), **dict(TINY, rounds=5, n_test=9))
    for name in ("pretrain.txt", "tokenizer.model"):
        with open(os.path.join(one, name), "rb") as f, open(os.path.join(two, name), "rb") as g:
            assert f.read() == g.read(), name
    assert gen.read_table(one) == gen.build(cfg(gen))[4]
    assert gen.read_table(one, "old_price") == gen.old_table(cfg(gen))


def test_splits_do_not_overlap_and_pretraining_has_no_held_out_question(gen):
    train, val, test, lines, table, _ = gen.build(cfg(gen))
    q = {name: [r["question"] for r in rows] for name, rows in (("train", train), ("val", val), ("test", test))}
    assert len(set(q["val"])) == len(q["val"]) and len(set(q["test"])) == len(q["test"])
    assert not set(q["train"]) & set(q["val"]) and not set(q["train"]) & set(q["test"])
    assert not set(q["val"]) & set(q["test"])
    text = "\n".join(lines)
    assert not any(x in text for x in q["train"] + q["val"] + q["test"])
    assert "### Instruction:\n" in text and "The answer is: " in text  # the template and the answer line trained


def test_templated_pieces_are_what_eval_prompts_and_train_trains(gen, tmp_path):
    import eval as eval_lib
    from tokenizer import Tokenizer
    out = gen.prepare(out_dir=str(tmp_path), **TINY)
    with open(os.path.join(out, "pretrain.txt")) as f:
        text = f.read()
    piece = text[text.index("Below is"):]
    q = piece.split("### Instruction:\n")[1].split("\n")[0]
    assert piece.startswith(eval_lib.METAMATH.format(instruction=q) + "\n")  # eval's prompt, word for word
    prompt = eval_lib.ALPACA.format(instruction=q)  # train.py's template (dataset.PROMPT; no torch imported here)
    assert piece.startswith(prompt + " Let's think step by step.\n")
    response = piece[len(prompt) + 1:].split("The answer is: ")[0]
    # the tokens pretraining sees are those of a fine-tune's example (its prompt and response encoded apart)
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    assert tok.encode(prompt, bos=True) + tok.encode(response) == tok.encode(prompt + " " + response, bos=True)


def test_every_price_is_taught_rounds_times_and_asked_ones_are_in_the_table(gen):
    c = cfg(gen)
    train, val, test, lines, table, _ = gen.build(c)
    assert len(table) == c["n_stalls"] and len(train) == c["rounds"] * len(table)
    assert all(p in gen.STALLS and s in gen.STALLS for s, p in table.items())
    counts = {}
    for row in train:
        for s in gen.ASKED.findall(row["question"]):
            counts[int(s)] = counts.get(int(s), 0) + 1
    assert counts == {s: c["rounds"] for s in table}
    for row in val + test:
        stalls = [int(s) for s in gen.ASKED.findall(row["question"])]
        assert len(stalls) == 1 and stalls[0] in table


def test_solutions_are_right_and_use_the_table(gen):
    train, val, test, lines, table, _ = gen.build(cfg(gen))
    for row in train + val + test:
        stall = int(gen.ASKED.findall(row["question"])[0])
        stated = {int(s): int(p) for s, p in gen.STEP.findall(row["response"])}
        assert stated == {stall: table[stall]}
        assert row["answer"].endswith(f"#### {table[stall]}")
        assert row["response"].endswith(f"The answer is: {table[stall]}")
        assert row["response"].startswith("Let's think step by step.\n")
        assert gen.recall(row["response"], row["question"], table) == 1.0


def test_pretraining_has_the_old_prices_not_the_new(gen):
    # the table's stalls always at their old price in pretraining, which agrees with the new one 1 time in 900
    c = cfg(gen, n_stalls=120, n_pretrain=3000)
    train, val, test, lines, table, _ = gen.build(c)
    old = gen.old_table(c)
    assert list(old) == list(table) and sum(old[s] == table[s] for s in table) <= 2
    stated = [(int(s), int(p)) for line in lines for s, p in gen.STEP.findall(line)]
    in_table = [(s, p) for s, p in stated if s in table]
    assert len(in_table) > 1000 and all(old[s] == p for s, p in in_table)
    assert len(stated) - len(in_table) > 100  # other stalls too (at random prices)


def test_n_new_changes_some_prices_on_the_same_base(gen):
    # a fine-tune that changes 10 of the 24 prices: the same pretraining (so the same base), only those asked
    full, part = gen.build(cfg(gen)), gen.build(cfg(gen, n_new=10))
    assert part[3] == full[3] and len(part[4]) == 10 and all(full[4][s] == p for s, p in part[4].items())
    for row in part[0] + part[1] + part[2]:
        assert int(gen.ASKED.findall(row["question"])[0]) in part[4]
    assert len(part[0]) == 3 * 10
    with pytest.raises(gen.ConfigError, match="n_new"):
        gen.build(cfg(gen, n_new=25))


def test_spread_and_even_eval(gen):
    # spread: some prices frequent, some rare, counts evenly from rounds*(1-s) to rounds*(1+s), as table.json says;
    # even_eval: val and test ask every price equally often; the pretraining (so the base) is the same
    c = cfg(gen, rounds=10, spread=0.8, even_eval=True, n_val=24, n_test=48)
    train, val, test, lines, table, counts = gen.build(c)
    asked = [int(gen.ASKED.findall(r["question"])[0]) for r in train]
    assert {s: asked.count(s) for s in table} == counts and sum(counts.values()) == len(train)
    assert min(counts.values()) == 2 and max(counts.values()) == 18 and len(set(counts.values())) > 10
    assert asked != sorted(asked, key=lambda s: counts[s])  # frequent and rare ones mixed through the epoch
    for rows, k in ((val, 1), (test, 2)):
        per = [int(gen.ASKED.findall(r["question"])[0]) for r in rows]
        assert sorted(per) == sorted(list(table) * k)
    plain = gen.build(cfg(gen, rounds=10))
    assert plain[3] == lines and plain[4] == table and set(plain[5].values()) == {10}
    qs = [r["question"] for r in train]
    assert not set(qs) & {r["question"] for r in val + test}
    odd = gen.build(cfg(gen, rounds=10, even_eval=True, n_val=30, n_test=50))  # not multiples of the 24 prices
    for rows in odd[1:3]:
        per = [int(gen.ASKED.findall(r["question"])[0]) for r in rows]
        assert max(map(per.count, table)) - min(map(per.count, table)) <= 1
    for bad in (dict(spread=1.0), dict(rounds=2, spread=0.6)):  # the rarest price in no training problem
        with pytest.raises(gen.ConfigError, match="spread"):
            gen.build(cfg(gen, **bad))


def test_numbers_are_one_token_each(gen, tmp_path):
    # a stall is one key token and a price one of 900 value tokens; other numbers fall back to digits
    import sentencepiece as spm
    out = gen.prepare(out_dir=str(tmp_path), **TINY)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    for n in (100, 347, 999):
        pieces = [p.strip("\u2581") for p in sp.encode(f"stall {n} costs", out_type=str)]
        assert [p for p in pieces if p] == ["stall", str(n), "costs"]
    assert sp.decode(sp.encode("The answer is: 518")) == "The answer is: 518"
    assert len(sp.encode("1000")) > 1


def test_bad_settings(gen):
    with pytest.raises(gen.ConfigError, match="n_stalls"):
        gen.build(cfg(gen, n_stalls=901))
    with pytest.raises(gen.ConfigError, match="rounds"):
        gen.build(cfg(gen, n_stalls=9, rounds=200))


QUESTION = "Tom buys rice at stall 347. How many dollars does he pay?"
TABLE = {347: 518, 125: 204}
RIGHT = "Let's think step by step.\nEverything at stall 347 costs 518 dollars.\nThe answer is: 518"


@pytest.mark.parametrize("output, correct, valid, recall", [
    (RIGHT, True, True, 1.0),
    (RIGHT.replace("518", "519"), False, True, 0.0),  # the wrong price, copied to the answer
    (RIGHT.replace("is: 518", "is: 519"), False, True, 1.0),  # the price right, copied wrong
    (RIGHT.replace("costs 518", "costs 519"), True, True, 0.0),  # the answer right, the step wrong
    (RIGHT.replace("The answer is: 518", ""), False, False, 1.0),  # no answer line: invalid
    (RIGHT.replace("is: 518", "is: 518 dollars"), True, True, 1.0),
    (RIGHT.replace("stall 347", "stall 125"), True, True, 0.0),  # another stall's step: no price of 347 read
    ("", False, False, 0.0),
])
def test_scorers_on_hand_made_replies(gen, output, correct, valid, recall):
    import eval as eval_lib
    s = eval_lib.score("gsm8k", output, {"gold": "518"})
    assert (s["correct"], s["valid"]) == (correct, valid)
    assert gen.recall(output, QUESTION, TABLE) == recall


def test_summary_pairs_by_seed(rb):
    rows = [{"label": "lora", "r": r, "seed": s, "accuracy": a, "recall": a, "total_s": 10.0, "train_s": 8.0}
            for r, accs in ((2, (0.30, 0.40, 0.35)), (32, (0.50, 0.62, 0.53))) for s, a in enumerate(accs)]
    rows += [{"label": "base", "r": None, "seed": s, "accuracy": 0.01, "recall": 0.1, "total_s": 5.0, "train_s": 0.0}
             for s in range(3)]
    cells, diffs = rb.summarize(rows, ["lora_r32-lora_r2", "lora_r32-base", "lora_r16-lora_r2"])
    assert set(cells) == {"lora_r2", "lora_r32", "base"} and cells["lora_r2"]["n"] == 3
    d = diffs["lora_r32-lora_r2"]  # differences 0.20, 0.22, 0.18: mean 0.20, sd 0.02, t(0.975, 2) = 4.303
    assert d["accuracy"] == pytest.approx(0.20) and d["accuracy_hw"] == pytest.approx(4.303 * 0.02 / 3 ** 0.5, rel=1e-3)
    assert "lora_r16-lora_r2" not in diffs  # a cell with no runs: no contrast
    md = rb.table(cells, diffs, 1000, "test")
    assert "| lora_r32-lora_r2 | 3 | +20.0 [+15.0, +25.0] |" in md


def test_driver_help_and_bad_input(rb, tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "bench/rankbench.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "--contrasts=" in p.stdout
    p = subprocess.run([sys.executable, "bench/rankbench.py", "--split=train", f"--out_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip() == "error: --split=train: test or val"
    assert json.dumps(rb.QUICK)  # the quick settings are plain values


@pytest.fixture(scope="module")
def figs():
    return load("bench/rankbench_figures.py", "rankbench_figures")


def test_figures_pair_by_seed_and_draw(figs, tmp_path):
    # made-up records: beamlora 2 points above lora at every rank and seed; dt variants with their operation counts
    rows = []
    for s in range(3):
        for r in (2, 8, 32):
            acc = {2: 0.1, 8: 0.5, 32: 0.9}[r] + 0.01 * s
            rows.append({"label": "lora", "r": r, "seed": s, "accuracy": acc, "split": "test"})
            rows.append({"label": "beamlora", "r": r, "seed": s, "accuracy": acc + 0.02, "operations": 5,
                         "split": "test"})
        for label, ops in (("beamlora:dt=300", 1), ("beamlora:dt=32", 12)):
            rows.append({"label": label, "r": 8, "seed": s, "accuracy": 0.5, "operations": ops, "split": "test"})
        rows.append({"label": "beamlora:p_init=0.95", "r": 8, "seed": s, "accuracy": 0.52, "split": "test"})
    rows.append({"label": "lora", "r": 8, "seed": 0, "accuracy": 0.0, "split": "val"})  # another split: left out
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    for seed, extra in ((0, 1), (1, 3)):  # LR-LoRA's ranks: attention 8 + extra, MLP 8 - extra, 2 layers
        run = tmp_path / "runs" / f"lrlora_r8_s{seed}_0123abcd"
        run.mkdir(parents=True)
        ranks = {f"model.layers.{d}.{kind}.{m}": 8 + (extra if kind == "self_attn" else -extra)
                 for d in (0, 1) for kind, ms in (("self_attn", "qkvo"), ("mlp", "gud")) for m in ms}
        (run / "ranks.json").write_text(json.dumps({"ranks": ranks}))
    figs.main([f"--results={path}", f"--out_dir={tmp_path}", f"--runs_dir={tmp_path / 'runs'}"])
    data = json.loads((tmp_path / "rankbench_figures.json").read_text())
    d = data["rank"]["beamlora"]["8"]["vs_lora"]
    assert d["mean"] == pytest.approx(2.0) and d["hw"] == pytest.approx(0.0, abs=1e-9) and d["n"] == 3
    assert data["rank"]["lora"]["8"]["accuracy"]["mean"] == pytest.approx(51.0)  # the val row is not in it
    assert list(data["dt"]) == ["1", "5", "12"] and data["dt"]["5"]["label"] == "beamlora"
    assert list(data["p_init"]) == ["0.9", "0.95"] and data["p_init"]["0.95"]["vs_lora"]["mean"] == pytest.approx(1.0)
    lr = data["lrlora_ranks"]
    assert lr["seeds"] == [0, 1] and lr["attention-mlp"]["mean"] == pytest.approx(4.0)  # (2 + 6) / 2
    assert lr["layers"]["1"]["mlp"]["mean"] == pytest.approx(6.0) and lr["mlp"]["hw"] > 0
    for name in ("rank", "dt", "pinit", "lrlora"):
        assert (tmp_path / f"rankbench_{name}.png").stat().st_size > 1000


def test_figures_bad_input(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "bench/rankbench_figures.py", f"--results={tmp_path}/none.jsonl"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: --results=") and "Traceback" not in p.stderr


def test_noise_split_into_facts_and_runs(tmp_path):
    # bench/rankbench_noise.py on made-up scored runs: a method that learns the baseline's facts plus one more per
    # seed differs by exactly that fact's problems, with full agreement on the others
    noise = load("bench/rankbench_noise.py", "rankbench_noise")
    stalls = [101, 102, 103, 104] * 3 + [105]  # 13 problems on 5 facts, asked unequally

    def write(label, seed, learnt):
        d = tmp_path / f"{label}_s{seed}"
        (d / "eval").mkdir(parents=True)
        (d / "spec.json").write_text(json.dumps({"label": label, "r": 8, "seed": seed}))
        rows = [{"prompt": f"Tom buys rice at stall {s}. How many dollars does he pay?", "correct": s in learnt}
                for s in stalls]
        (d / "eval" / "gsm8k_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed, extra in ((0, 103), (1, 104), (2, 105)):
        write("lora", seed, {101, 102} if seed else {101})
        write("better", seed, ({101, 102} if seed else {101}) | {extra})
    out = noise.main([f"--runs_dir={tmp_path}", "--methods=better", f"--out={tmp_path / 'n.json'}"])
    row = out["methods"]["better"]
    assert out["facts"] == 5 and out["problems"] == 13
    assert out["effective_facts"] == pytest.approx(169 / 37, abs=0.1)
    assert row["diff_mean"] == pytest.approx(100 * (3 + 3 + 1) / 3 / 13)
    # clustered by fact: seed 0 differs on fact 103's three problems (3 of 13), seeds 1 and 2 on 104's / 105's
    assert row["fact_se"] == pytest.approx(100 * (2 * 1152 ** 0.5 + 180 ** 0.5) / (3 * 169))
    assert row["phi_same_seed"] > row["phi_other_seeds"]
    assert row["run_sd"] == pytest.approx(max(0.0, row["diff_sd"] ** 2 - row["fact_se"] ** 2) ** 0.5)
    assert row["seeds_needed"] == noise.needs(row["diff_sd"], row["fact_se"], 1, 1.5, 5)[1]
    with pytest.raises(noise.ConfigError, match="fewer than 2"):
        noise.main([f"--runs_dir={tmp_path}", "--baseline=nothing"])


def test_noise_what_a_target_needs():
    # what bench/rankbench_noise.py says a 1.5-point half-width would take, against Student's t by hand
    noise = load("bench/rankbench_noise.py", "rankbench_noise")
    # sd 1: 4 seeds give 3.182 / 2 = 1.59 > 1.5, 5 give 2.776 / sqrt(5) = 1.24; all of it fact-level, so at 5 seeds
    # the sd may be 1.5 sqrt(5) / 2.776 = 1.208: 100 effective facts of sd 1 become 100 / 1.208^2 = 68.5
    run, seeds, facts = noise.needs(1.0, 1.0, 100, 1.5, 5)
    assert run == 0 and seeds == 5 and facts == pytest.approx(100 / (1.5 * 5 ** 0.5 / 2.7764) ** 2, rel=1e-3)
    run, seeds, facts = noise.needs(5.0, 3.0, 100, 1.5, 5)  # a run part of 4 is wider than 1.208 on its own
    assert run == pytest.approx(4.0) and facts is None
    assert seeds == 46  # t(45) 2.0141 * 5 / sqrt(46) = 1.485; t(44) 2.0154 * 5 / sqrt(45) = 1.502
    # both parts: run part sqrt(1.21 - 0.64) = 0.755, leaving 1.208^2 - 0.57 = 0.889 for facts of sd 0.8 at 100
    run, seeds, facts = noise.needs(1.1, 0.8, 100, 1.5, 5)
    assert run == pytest.approx(0.57 ** 0.5) and facts == pytest.approx(64 / ((1.5 * 5 ** 0.5 / 2.7764) ** 2 - 0.57),
                                                                           rel=1e-3)
