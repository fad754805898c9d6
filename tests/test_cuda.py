# The CUDA paths, on a GPU; skipped where there is none (bench/gpu_check.py runs them there and records each
# result): parity with transformers in bf16, a bf16-autocast train step with fused AdamW, --compile training,
# activation checkpointing, torchrun on nccl, eval's decoding eager = compiled, the chunked loss = the full logits'.
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
transformers = pytest.importorskip("transformers")

import beamlora  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
from conftest import ROOT, free_port  # noqa: E402
from generate import generate  # noqa: E402
from model import Transformer, lm_loss, load_safetensors  # noqa: E402
from test_eval import E2E_ROWS  # noqa: E402
from test_model import TINY, forced_logits, left_pad, write_hf  # noqa: E402
from test_train import cfg_for  # noqa: E402  (base, demo_data: fixtures in conftest.py)

F = torch.nn.functional


@pytest.fixture
def no_tf32():
    # train.py turns TF32 on for the process; exact-token comparisons in fp32 need it off
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_bf16_logits_match_transformers_on_cuda(tmp_path, name):
    _, path = write_hf(tmp_path, name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ours = Transformer.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    x = torch.randint(0, TINY["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(x)
    mask[1, :9] = 0  # left padding
    with torch.no_grad():
        ref, got = hf(x, attention_mask=mask).logits.float(), ours(x, attention_mask=mask).float()
        plain = hf(x).logits.float()
        assert (plain - ours(x).float()).abs().max() <= 2e-2 * plain.abs().max()
    real = mask.bool()
    assert (ref - got)[real].abs().max() <= 2e-2 * ref.abs().max()  # a few bf16 ulps of the logits' scale


def test_greedy_decoding_matches_transformers_on_cuda(tmp_path, no_tf32):
    # fp32: the cache, static and compiled (CUDA graphs) ways give transformers' tokens; the second compiled call
    # (fewer rows, the same cache) replays the recorded graphs
    hf, path = write_hf(tmp_path, "llama_gqa")
    hf = hf.cuda()
    ours = Transformer.from_pretrained(path, device="cuda")
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    ids, mask = left_pad(prompts)
    ref = hf.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, min_new_tokens=24,
                      do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].tolist()
    for decode in ("cache", "static", "compiled"):
        assert generate(ours, prompts, 24, stop_ids=[], decode=decode) == ref, decode
    assert generate(ours, prompts[1:], 24, stop_ids=[], decode="compiled") == ref[1:]


def test_eval_decoding_eager_equals_compiled_on_cuda(tiny_checkpoint, tmp_path, no_tf32):
    # eval.py --compile: batches of 2 then 1 (the second in the first's cache, a spare row), the same outputs as
    # without it and as on the CPU; fp32, where the tokens are the test (bf16: the next test)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in E2E_ROWS["gsm8k"]))
    outputs = {}
    for name, extra in (("cpu", ["--device=cpu"]), ("eager", ["--device=cuda"]),
                        ("compiled", ["--device=cuda", "--compile"])):
        out = tmp_path / name
        ev.main([f"--model={tiny_checkpoint}", "--task=gsm8k", f"--data={data}", f"--out={out}", "--batch_size=2",
                 "--max_new_tokens=16", "--dtype=float32", *extra])
        with open(out / "gsm8k_samples.jsonl") as f:
            outputs[name] = [json.loads(line)["output"] for line in f]
    assert outputs["eager"] == outputs["compiled"] == outputs["cpu"] and len(outputs["eager"]) == 3


def test_compiled_decoding_in_bf16_follows_the_cache_way_on_cuda(tmp_path):
    # bf16 logits tie now and then, so an argmax may flip between two orders of additions: each way is fed the
    # cache way's tokens and its logits compared (a wrong slot or mask is off by tens of percent, rounding by < 1%)
    _, path = write_hf(tmp_path, "llama_gqa")
    ours = Transformer.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    ref = forced_logits(ours, prompts, 16, "cache")
    tokens = [x.argmax(-1) for x in ref]
    for decode in ("static", "compiled", "compiled"):  # the second compiled run replays the CUDA graphs
        got = forced_logits(ours, prompts, 16, decode, tokens)
        assert len(got) == 16 and max((a - b).abs().max() / a.abs().max() for a, b in zip(ref, got)) <= 2e-2, decode


def test_train_step_bf16_autocast_fused_adamw(base, demo_data, tmp_path, monkeypatch):
    seen, make = [], train.make_optimizer

    def spy(params, cfg, fused=False):  # which AdamW each run builds
        seen.append(fused)
        return make(params, cfg, fused=fused)
    monkeypatch.setattr(train, "make_optimizer", spy)
    kw = dict(method="beamlora", max_steps=8, dropout=0.0)
    cpu = train.train(cfg_for(base, demo_data, tmp_path / "cpu", **kw))
    gpu = train.train(cfg_for(base, demo_data, tmp_path / "gpu", device="cuda", dtype="bfloat16", **kw))
    assert seen == [False, True]
    # step 1 runs with B = 0 (the base alone): bf16 autocast on cuda within bf16's precision of fp32 on cpu
    assert abs(gpu["losses"][0] - cpu["losses"][0]) <= 2e-2 * cpu["losses"][0]
    assert all(torch.isfinite(torch.tensor(gpu["losses"]))) and gpu["losses"][-1] < gpu["losses"][0]
    ck = torch.load(tmp_path / "gpu" / "ckpt.pt", weights_only=True, map_location="cpu")
    assert all(v.dtype == torch.float32 for v in ck["params"].values()), "adapters stay fp32"
    assert os.path.getsize(tmp_path / "gpu" / "events.jsonl") > 0 and "rng_cuda" in ck


def test_fused_adamw_equals_foreach_on_cuda():
    cfg = dict(train.DEFAULTS, lr=1e-2, weight_decay=0.1)
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(16, 48), (48, 16), (16,)]
    sides = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i)))
              for i, s in enumerate(shapes)]
        sides.append((ps, train.make_optimizer(ps, cfg, fused=fused)))
    for _ in range(5):
        grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
        for ps, opt in sides:
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    for a, b in zip(sides[0][0], sides[1][0]):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_compiled_training_matches_eager_on_cuda(base, demo_data, tmp_path):
    kw = dict(method="beamlora", max_steps=8, dt=4, dropout=0.0, device="cuda", dtype="bfloat16")
    eager = train.train(cfg_for(base, demo_data, tmp_path / "eager", **kw))
    comp = train.train(cfg_for(base, demo_data, tmp_path / "comp", compile=True, **kw))
    a, b = eager["losses"], comp["losses"]
    # before the first prune/expand (step 4) the same run to bf16 rounding; after it, finite and learning
    assert max(abs(x - y) / y for x, y in zip(a[:4], b[:4])) <= 2e-2, (a, b)
    assert all(torch.isfinite(torch.tensor(b))) and b[-1] < b[0]
    steps = lambda d: [json.loads(line)["step"] for line in open(d / "events.jsonl")]  # noqa: E731
    assert steps(tmp_path / "eager") == steps(tmp_path / "comp") == [4]
    assert os.path.isfile(tmp_path / "comp" / "adapter" / "adapter_model.safetensors")


def test_gradient_checkpointing_on_cuda(base):
    x = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = Transformer.from_pretrained(base, device="cuda", dtype=torch.bfloat16)
        beamlora.add_scores(beamlora.apply_lora(m, ["q_proj", "down_proj"], r=4, alpha=8), tau=0.05)
        for mod in beamlora.lora_modules(m).values():
            torch.nn.init.normal_(mod.lora_B, std=0.1)
        m.gradient_checkpointing = ckpt
        m.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(x, targets=x)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for n in grads[0]:  # the recomputed forward is the same arithmetic
        a, b = grads[0][n], grads[1][n]
        assert a.abs().sum() > 0 and (a - b).abs().max() <= 1e-3 * a.abs().max(), n


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="no NCCL")
def test_torchrun_one_process_on_nccl(base, demo_data, tmp_path):
    kw = dict(max_steps=8, dropout=0.0, device="cuda", dtype="bfloat16")
    single = train.train(cfg_for(base, demo_data, tmp_path / "one", **kw))
    cfg = cfg_for(base, demo_data, tmp_path / "ddp", **kw)
    keys = ("init_from", "data", "out_dir", "r", "alpha", "max_len", "batch_size", "micro_batch_size", "max_steps",
            "dt", "p_init", "lr", "dtype", "device", "log_interval", "seed", "dropout")
    (tmp_path / "ddp_config.py").write_text("".join(f"{k} = {cfg[k]!r}\n" for k in keys))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                           f"--master_port={free_port()}", os.path.join(ROOT, "train.py"),
                           str(tmp_path / "ddp_config.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    # one process under DDP (gradients all-reduced over nccl) is the plain run, to bf16 rounding
    assert abs(log[-1]["loss"] - sum(single["losses"][-4:]) / 4) <= 1e-2 * log[-1]["loss"]
    x = load_safetensors(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    y = load_safetensors(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and all((x[k] - y[k]).abs().max() <= 1e-2 * x[k].abs().max() + 1e-6 for k in x)


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_loss_equals_full_logits_on_cuda(autocast, no_tf32):
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(600, 64, generator=g).cuda(), (0.3 * torch.randn(5000, 64, generator=g)).cuda()
    y = torch.randint(0, 5000, (600,), generator=g).cuda()
    y[::3] = -100
    out = []
    for mine in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = lm_loss(h, w, y, max_elems=128 * 5000) if mine else \
                F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100, reduction="sum")
        loss.backward()
        out.append((loss, h.grad, w.grad))
    (a, ha, wa), (b, hb, wb) = out
    tol = 1e-2 if autocast else 1e-5  # bf16: the reference rounds its weight-gradient matmul to bf16
    assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    assert (ha - hb).abs().max() <= tol * hb.abs().max() and (wa - wb).abs().max() <= tol * wb.abs().max()


def test_summed_loss_matches_transformers_in_bf16_on_cuda(tmp_path):
    _, path = write_hf(tmp_path, "llama_gqa")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    ours = Transformer.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    x = torch.randint(0, TINY["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(3)).cuda()
    y = x.roll(-1, 1)
    y[:, :5] = -100
    ref = F.cross_entropy(hf(x).logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    assert abs(ours(x, targets=y).item() - ref.item()) <= 1e-2 * ref.item()
