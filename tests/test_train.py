# train.py on CPU: a tiny end-to-end BeamLoRA run, the label mask, exact resume, DDP under torchrun,
# activation checkpointing, and the one-line errors for bad input.
import json
import os
import subprocess
import sys

import pytest
import torch

import beamlora
import dataset
import meter
import peft_io
import train
from conftest import ROOT, free_port
from model import Transformer, load_safetensors
from tokenizer import Tokenizer


def cfg_for(base, demo_data, out_dir, **kw):
    cfg = dict(train.DEFAULTS, init_from=base, data=os.path.join(demo_data, "train.jsonl"), out_dir=str(out_dir),
               method="beamlora", r=4, alpha=8.0, dropout=0.0, max_len=512, batch_size=8, micro_batch_size=4,
               max_steps=16, dt=4, p_init=0.9, lr=1e-2, dtype="float32", device="cpu", log_interval=4, seed=3)
    cfg.update(kw)
    return cfg


def run_ddp(cfg, tmp_path):
    """train.py under torchrun, 2 processes (gloo) on a free port, with cfg as a config file, as users run it
    (torchrun would eat --r=4)."""
    path = tmp_path / "ddp_config.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items() if v != train.DEFAULTS[k]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", os.path.join(ROOT, "train.py"), str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_end_to_end_beamlora(base, demo_data, tmp_path):
    out = tmp_path / "run"
    res = train.train(cfg_for(base, demo_data, out, max_steps=24, val_data=os.path.join(demo_data, "test.jsonl")))
    losses = res["losses"]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2
    events = [json.loads(line) for line in open(out / "events.jsonl")]
    assert [e["step"] for e in events] == [4, 8, 12]  # dt = 4, end step 16, none in the last 4 steps
    assert sum(len(m["pruned"]) for e in events for m in e["modules"].values()) > 0
    assert res["val_loss"] < losses[0]
    # the adapter loads in PEFT onto the transformers model, and in our model, with the same logits
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    x = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    ours = peft_io.load_adapter(Transformer.from_pretrained(base), str(out / "adapter"))
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), str(out / "adapter"))
    with torch.no_grad():
        ref = hf.eval()(x).logits  # logits of size ~10 here: float32 noise is ~1e-5 of that
        assert (ref - ours(x)).abs().max() <= 1e-5 * ref.abs().max()
    # and eval.py scores it
    import eval as eval_lib
    summary = eval_lib.main([f"--model={base}", f"--adapter={out / 'adapter'}", "--task=gsm8k", "--limit=3",
                             f"--data={os.path.join(demo_data, 'test.jsonl')}", f"--out={tmp_path / 'eval'}",
                             "--max_new_tokens=8", "--device=cpu"])
    assert summary["n"] == 3 and os.path.isfile(tmp_path / "eval" / "gsm8k_samples.jsonl")


def test_label_mask_exact(base, tmp_path):
    tok = Tokenizer(base)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"query": "Tom has 3 apples. How many?", "response": "3+1=4\nThe answer is: 4"}) + "\n")
    cfg = dict(train.DEFAULTS, data_format="metamathqa", max_len=512, out_dir=str(tmp_path))
    [(ids, labels)] = dataset.tokenize_file(str(path), tok, cfg)
    prompt = tok.encode(dataset.PROMPT.format(instruction="Tom has 3 apples. How many?"), bos=True)
    response = tok.encode("3+1=4\nThe answer is: 4", eos=True)
    assert prompt[0] == tok.bos_id and response[-1] == tok.eos_id
    assert ids == prompt + response
    assert labels == [-100] * len(prompt) + response  # no loss on the prompt; the response and its EOS trained
    x, y = dataset.collate([(ids, labels)], [0], "cpu")
    assert y[0, len(prompt) - 2] == -100 and y[0, len(prompt) - 1] == response[0]  # position t predicts t + 1
    assert y[0, -1] == -100
    # a second read comes from the cache next to the data, identical
    assert os.listdir(tmp_path).count("one.jsonl") == 1 and any(f.endswith(".cache.pt") for f in os.listdir(tmp_path))
    assert dataset.tokenize_file(str(path), tok, cfg) == [(ids, labels)]


def test_truncation_is_counted(base, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    rows = [{"query": "q " * 5, "response": "a " * 400}, {"query": "q", "response": "short"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = dataset.tokenize_file(str(path), Tokenizer(base), dict(train.DEFAULTS, max_len=200, out_dir=str(tmp_path)))
    assert max(len(e[0]) for e in ex) == 200 and "1 of 2 examples truncated to max_len=200" in capsys.readouterr().out


def test_resume_equals_uninterrupted(base, demo_data, tmp_path):
    # dt = 4, 16 steps over two epochs, dropout on: operations at 4, 8, 12, snapshots at 2, 6, 10.
    # Stopped at 5 (after an operation) and at 7 (between a snapshot and the operation that uses it).
    kw = dict(max_steps=16, dropout=0.1, p_init=0.6, end_step=16)  # p(8) = 0.8: pairs of ranks to permute
    full = train.train(cfg_for(base, demo_data, tmp_path / "full", **kw))
    part = train.train(cfg_for(base, demo_data, tmp_path / "part", stop_after=5, **kw))
    assert part["stopped"] and len(part["losses"]) == 5
    mid = train.train(cfg_for(base, demo_data, tmp_path / "part", resume=True, stop_after=2, **kw))
    rest = train.train(cfg_for(base, demo_data, tmp_path / "part", resume=True, **kw))
    got = part["losses"] + mid["losses"] + rest["losses"]
    assert len(got) == 16 and max(abs(a - b) for a, b in zip(got, full["losses"])) <= 1e-6
    a = load_safetensors(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_safetensors(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev = lambda d: open(d / "events.jsonl").read()  # noqa: E731
    assert ev(tmp_path / "full") == ev(tmp_path / "part") and ev(tmp_path / "full").count("\n") == 3
    assert any(len(m["pruned"]) >= 2 for m in json.loads(ev(tmp_path / "full").splitlines()[1])["modules"].values())


def test_resume_beamlora_dora(base, demo_data, tmp_path):
    # dt = 4: snapshots at 2, 6, operations at 4, 8; stopped at 7, between the snapshot and its operation
    kw = dict(max_steps=12, dropout=0.1, p_init=0.6, end_step=12, dora=True)
    full = train.train(cfg_for(base, demo_data, tmp_path / "full", **kw))
    part = train.train(cfg_for(base, demo_data, tmp_path / "part", stop_after=7, **kw))
    rest = train.train(cfg_for(base, demo_data, tmp_path / "part", resume=True, **kw))
    assert part["losses"] + rest["losses"] == full["losses"]
    a = load_safetensors(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_safetensors(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev = lambda d: open(d / "events.jsonl").read()  # noqa: E731
    assert ev(tmp_path / "full") == ev(tmp_path / "part") and ev(tmp_path / "full").count("\n") == 2


def test_resume_pissa_without_svd(base, demo_data, tmp_path, monkeypatch):
    # the residual W0 - scaling B0 A0 is rebuilt from A0, B0 in ckpt.pt: no SVD on resume, same bits
    kw = dict(method="pissa", max_steps=6, dropout=0.1, lr=1e-3)
    full = train.train(cfg_for(base, demo_data, tmp_path / "full", **kw))
    part = train.train(cfg_for(base, demo_data, tmp_path / "part", stop_after=3, **kw))

    def no_svd(*a, **k):
        raise AssertionError("resume redid the SVD")
    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    rest = train.train(cfg_for(base, demo_data, tmp_path / "part", resume=True, **kw))
    assert part["losses"] + rest["losses"] == full["losses"] and full["losses"][-1] < full["losses"][0]
    a = load_safetensors(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_safetensors(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(tmp_path / "part" / "adapter" / "adapter_config.json"))["r"] == 2 * 4


def test_lora_and_full_methods(base, demo_data, tmp_path):
    res = train.train(cfg_for(base, demo_data, tmp_path / "lora", method="lora", max_steps=6))
    assert not os.path.exists(tmp_path / "lora" / "events.jsonl") and res["losses"][-1] < res["losses"][0]
    res = train.train(cfg_for(base, demo_data, tmp_path / "full", method="full", max_steps=4, lr=1e-3,
                              save_merged=True))
    m = Transformer.from_pretrained(str(tmp_path / "full" / "model"))
    assert os.path.isfile(tmp_path / "full" / "model" / "tokenizer.model")
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight,
                           Transformer.from_pretrained(base).model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_base_fp32_adapters(base, demo_data, tmp_path, dtype):
    # the paper's precision: frozen base in bf16 (or fp16 with a grad scaler), adapters and scores fp32
    res = train.train(cfg_for(base, demo_data, tmp_path, dtype=dtype, max_steps=8))
    assert all(torch.isfinite(torch.tensor(res["losses"]))) and res["losses"][-1] < res["losses"][0]
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ck["params"].items()), "adapters must stay fp32"
    assert os.path.getsize(tmp_path / "events.jsonl") > 0
    adapter = load_safetensors(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapter.values())


def test_gradient_checkpointing_trains_adapters(base):
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = Transformer.from_pretrained(base)
        beamlora.add_scores(beamlora.apply_lora(m, ["q_proj", "down_proj"], r=4, alpha=8), tau=0.05)
        for mod in beamlora.lora_modules(m).values():
            torch.nn.init.normal_(mod.lora_B, std=0.1)
        m.gradient_checkpointing = ckpt
        m.train()
        loss = m(x, targets=x)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0 and torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.parametrize("extra", [{}, {"dora": True}], ids=["beamlora", "beamlora+dora"])
def test_ddp_two_processes_match_one(base, demo_data, tmp_path, extra):
    """torchrun, gloo, 2 processes x micro-batch 2 = one process x micro-batch 4: same losses and adapter."""
    single = train.train(cfg_for(base, demo_data, tmp_path / "one", max_steps=8, dropout=0.0, **extra))
    run_ddp(cfg_for(base, demo_data, tmp_path / "two", max_steps=8, micro_batch_size=2, **extra), tmp_path)
    log = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert abs(log[-1]["loss"] - sum(single["losses"][-4:]) / 4) < 1e-4
    ev = [[json.loads(line) for line in open(tmp_path / d / "events.jsonl")] for d in ("one", "two")]
    assert [e["step"] for e in ev[0]] == [e["step"] for e in ev[1]] == [4]
    for name, m in ev[0][0]["modules"].items():  # the same ranks pruned and copied; scores equal to rounding
        other = ev[1][0]["modules"][name]
        assert m["pruned"] == other["pruned"] and m["sources"] == other["sources"]
        assert max(abs(a - b) for a, b in zip(m["scores"], other["scores"])) < 1e-4
    a = load_safetensors(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_safetensors(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


# ---------------------------------------------------------------------------------------------
# bad input: a ConfigError / ValueError naming the problem, before any training

@pytest.mark.parametrize("change, message", [
    (dict(data="nope.jsonl"), "nope.jsonl: data file not found"),
    (dict(targets="q_proj,qkv_proj"), "unknown target module.*qkv_proj"),
    (dict(r=1000), "r=1000 does not fit"),
    (dict(p_init=1.5), "--p_init=1.5"),
    (dict(dt=1), "--dt=1"),
    (dict(method="vera"), "--method=vera"),
    (dict(method="full", dora=True), "--dora: needs a LoRA-family --method"),
    (dict(batch_size=6), "--batch_size=6 must be a multiple"),
])
def test_bad_config(base, demo_data, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train.train(cfg_for(base, demo_data, tmp_path / "bad", **change))
    assert not os.path.exists(tmp_path / "bad" / "ckpt.pt")


def test_malformed_line_and_not_a_model(base, demo_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "a", "response": "b"}) + "\n" + '{"query": "a", "resp\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        train.train(cfg_for(base, demo_data, tmp_path / "o", data=str(bad)))
    bad.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no field 'query' \(data_format=metamathqa\)"):
        train.train(cfg_for(base, demo_data, tmp_path / "o", data=str(bad)))
    with pytest.raises(ValueError, match="config.json"):
        train.train(cfg_for(str(tmp_path), demo_data, tmp_path / "o"))


def test_cli_one_line_errors(base, demo_data, tmp_path):
    for args, message in ((["--nope=1"], "nope"), ([f"--init_from={tmp_path}", "--data=x.jsonl"], "x.jsonl")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr and proc.stderr.startswith("error: ")


# -----------------------------------------------------------------------------
# MFU against the device the run is on: dense peaks from NVIDIA's datasheets and whitepapers (sparse figures
# halved), TF32's for float32 (train.py allows TF32 matmuls); none where no peak is known for the device

@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5), ("NVIDIA H100 80GB HBM3", "float32", 494.5),  # SXM5
    ("NVIDIA H100 PCIe", "bfloat16", 756.5), ("NVIDIA H100 PCIe", "float32", 378.0),
    ("NVIDIA H100 NVL", "float16", 835.5), ("NVIDIA H200", "bfloat16", 989.5), ("NVIDIA H200 NVL", "bfloat16", 835.5),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0), ("NVIDIA A100-PCIE-40GB", "float32", 156.0),
    ("NVIDIA A100 80GB PCIe", "float16", 312.0), ("NVIDIA L40S", "bfloat16", 362.0), ("NVIDIA L40", "bfloat16", 181.0),
    ("NVIDIA L4", "bfloat16", 121.0), ("NVIDIA A10", "bfloat16", 125.0), ("NVIDIA RTX A6000", "bfloat16", 154.8),
    ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2), ("NVIDIA GeForce RTX 3090", "float32", 35.6),
    ("Tesla V100-SXM2-16GB", "float16", 125.0), ("Tesla V100-SXM2-16GB", "float32", 15.7),
    # never another device's peak: no bf16 on a V100, and parts that only look like a listed one
    ("Tesla V100-SXM2-16GB", "bfloat16", None), ("NVIDIA A10G", "bfloat16", None),
    ("NVIDIA GeForce RTX 3090 Ti", "bfloat16", None), ("NVIDIA GeForce RTX 4090 D", "bfloat16", None),
    ("NVIDIA GH200 480GB", "bfloat16", None), ("NVIDIA B200", "bfloat16", None),
    ("AMD Instinct MI300X", "bfloat16", None),
])
def test_peak_flops_by_device_name(monkeypatch, name, dtype, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert meter.device_peak_flops("cuda:0", dtype) == (tflops * 1e12 if tflops else None)
    assert meter.device_peak_flops("cpu", dtype) is None


def test_no_mfu_on_cpu(base, demo_data, tmp_path, capsys):
    train.train(cfg_for(base, demo_data, tmp_path / "auto", method="lora", max_steps=4, log_interval=2))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("tok/s" in line and "mfu" not in line for line in lines)
    assert [json.loads(line)["mfu"] for line in open(tmp_path / "auto" / "log.jsonl")] == [None, None]
    # a peak given by hand is the user's word for this device: used anywhere
    train.train(cfg_for(base, demo_data, tmp_path / "given", method="lora", max_steps=4, log_interval=2,
                        peak_flops=1e9))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    rows = [json.loads(line) for line in open(tmp_path / "given" / "log.jsonl")]
    assert all(f"mfu {100 * r['mfu']:.2f}%" in line for r, line in zip(rows, lines))
    assert rows[0]["mfu"] / rows[0]["tok_s"] == pytest.approx(rows[1]["mfu"] / rows[1]["tok_s"])  # flops/token / peak
