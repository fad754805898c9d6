# model.py against transformers (test-only reference) on checkpoints transformers itself writes.
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

from generate import beam_search, decode_step, generate, static_cache  # noqa: E402
from model import CheckpointError, ModelArgs, Transformer, load_safetensors, save_safetensors  # noqa: E402

transformers.logging.set_verbosity_error()
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "llama_mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, rope_theta=50000.0)),
    "llama3_tied": (LlamaConfig, LlamaForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama_head_dim": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, head_dim=24)),
    "mistral_window": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=7)),
}


def write_hf(tmp_path, name, **save_kw):
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**TINY, **extra)).eval()
    path = str(tmp_path / name)
    hf.save_pretrained(path, **save_kw)
    return hf, path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    hf, path = write_hf(tmp_path, name)
    ours = Transformer.from_pretrained(path)
    x = torch.randint(0, TINY["vocab_size"], (3, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert got.shape == (3, 33, TINY["vocab_size"])
    assert (ref - got).abs().max() <= 1e-4
    if name == "mistral_window":  # the window must matter, or the test checks nothing
        no_window = Transformer.from_pretrained(path)
        no_window.args.sliding_window = None
        with torch.no_grad():
            assert (no_window(x) - ref).abs().max() > 1e-3
    if name == "llama3_tied":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_config_without_rms_norm_eps_means_what_transformers_reads(tmp_path, name):
    # a config.json that omits rms_norm_eps: transformers takes its default (1e-6 for llama and mistral), and so
    # must we; small embeddings make the eps matter, so a different default fails the test
    cfg_cls, model_cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**TINY, **extra))
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(0.05)  # rms of the input to the first norm about 1e-3
    path = str(tmp_path / name)
    hf.save_pretrained(path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    del cfg["rms_norm_eps"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    hf = model_cls.from_pretrained(path).eval()
    ours = Transformer.from_pretrained(path)
    x = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max() <= 1e-4
        other = Transformer.from_config({**cfg, "rms_norm_eps": 1e-5})
        other.load_state_dict(ours.state_dict())
        assert (other(x) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_padding_mask_matches_transformers(tmp_path, name):
    hf, path = write_hf(tmp_path, name)
    ours = Transformer.from_pretrained(path)
    x = torch.randint(0, TINY["vocab_size"], (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[2, :13] = 0
    with torch.no_grad():
        ref, got = hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask)
    real = mask.bool()
    assert (ref - got)[real].abs().max() <= 1e-4
    # a left-padded row equals the same tokens run alone
    with torch.no_grad():
        alone = ours(x[1:2, 6:])
    assert (alone[0] - got[1, 6:]).abs().max() <= 1e-4


def test_targets_give_the_summed_loss_and_hf_gradients(tmp_path):
    # with targets the model returns the summed cross-entropy, computed chunk by chunk without the logits;
    # the reference: transformers' logits, log-softmax in float64, and autograd through them
    hf, path = write_hf(tmp_path, "llama_gqa")
    ours = Transformer.from_pretrained(path)
    x = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    y = x.roll(-1, 1)
    y[:, :4] = -100
    keep = y != -100
    lp = torch.log_softmax(hf(x).logits.double(), -1)
    ref = -lp[keep].gather(-1, y[keep][:, None]).sum()
    ref.backward()
    loss = ours(x, targets=y)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
        a, b = dict(ours.named_parameters())[name].grad, dict(hf.named_parameters())[name].grad
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_lm_loss_equals_the_full_logits_way(autocast):
    # many small chunks (7 tokens each) against lm_head + F.cross_entropy over the whole logits
    from model import lm_loss
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(37, 16, generator=g), 0.3 * torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (37,), generator=g)
    y[::3] = -100
    out = []
    for mine in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = lm_loss(h, w, y, max_elems=7 * 50) if mine else \
                torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), y, ignore_index=-100,
                                                  reduction="sum")
        loss.backward()
        out.append((loss, h.grad, w.grad))
    (a, ha, wa), (b, hb, wb) = out
    tol = 1e-2 if autocast else 1e-5  # bf16: the reference rounds its one weight-gradient matmul to bf16
    assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    assert (ha - hb).abs().max() <= tol * hb.abs().max() and (wa - wb).abs().max() <= tol * wb.abs().max()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the loss only
        assert abs(lm_loss(h0, w0, y, max_elems=7 * 50).item() - b.item()) <= 1e-5 * abs(b.item())


def test_sharded_checkpoint(tmp_path):
    hf, path = write_hf(tmp_path, "llama_gqa", max_shard_size="40KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    ours = Transformer.from_pretrained(path)
    x = torch.randint(0, TINY["vocab_size"], (2, 17))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4


def test_bf16_load_agrees(tmp_path):
    _, path = write_hf(tmp_path, "llama_gqa")
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, TINY["vocab_size"], (2, 25))
    with torch.no_grad():
        ref, got = hf(x).logits.float(), ours(x).float()
    # same bf16 arithmetic: within a few bf16 ulps of the logits' scale
    assert (ref - got).abs().max() <= 2e-2 * ref.abs().max()


def test_old_style_config_fields(tmp_path):
    # hub checkpoints: top-level rope_theta and rope_scaling with the older "type" key
    hf, path = write_hf(tmp_path, "llama3_tied")
    cfg = json.load(open(os.path.join(path, "config.json")))
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    args = ModelArgs.from_config(cfg)
    assert args.rope_theta == 500000.0 and args.rope_scaling["rope_type"] == "llama3"
    ours = Transformer.from_pretrained(path)
    x = torch.randint(0, TINY["vocab_size"], (1, 30))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() <= 1e-4


def left_pad(prompts, pad=0):
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), pad)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        mask[i, L - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("name", ["llama_gqa", "llama3_tied", "mistral_window"])
def test_batched_greedy_generation_matches_transformers(tmp_path, name):
    hf, path = write_hf(tmp_path, name)
    ours = Transformer.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    got = generate(ours, prompts, max_new_tokens=24, stop_ids=[])
    ids, mask = left_pad(prompts)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].tolist()
    assert got == ref
    # each prompt alone gives the same tokens as in the batch
    assert [generate(ours, [p], 24, stop_ids=[])[0] for p in prompts] == got


@pytest.mark.parametrize("name", ["llama_mha", "llama_gqa", "mistral_window"])
def test_static_cache_decoding_matches_transformers(tmp_path, name):
    # decode="static": gpt-fast's preallocated cache over the whole length, kept and reused by later calls;
    # "compiled": that step traced whole by torch.compile (here the aot_eager backend: the trace, on any machine)
    hf, path = write_hf(tmp_path, name)
    ours = Transformer.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    ids, mask = left_pad(prompts)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].tolist()
    assert generate(ours, prompts, 24, stop_ids=[], decode="static") == ref
    cache = ours.static_kv
    assert cache[0].k.shape[2] > 12 + 24  # longer than needed: the unused slots are masked
    # fewer and shorter prompts reuse it (spare rows); stops and seeded sampling as the cache way
    assert generate(ours, prompts[1:3], 20, stop_ids=[], decode="static") == [r[:20] for r in ref[1:3]]
    stop = ref[1][3]
    assert generate(ours, prompts[:2], 24, stop_ids=[stop], decode="static") == \
        generate(ours, prompts[:2], 24, stop_ids=[stop]) != ref[:2]
    sampled = generate(ours, prompts[2:], 16, temperature=1.0, top_p=0.9, seed=5, stop_ids=[])
    assert generate(ours, prompts[2:], 16, temperature=1.0, top_p=0.9, seed=5, stop_ids=[], decode="static") == sampled
    assert ours.static_kv is cache and all(layer.self_attn.kv_cache is None for layer in ours.model.layers)
    seen = []  # streaming (sample.py): the callback sees the prompts' rows, not the cache's spare ones
    assert generate(ours, prompts[1:2], 6, stop_ids=[], decode="static", on_token=lambda t: seen.append(t.tolist())) \
        == [ref[1][:6]] and seen == [[t] for t in ref[1][:6]]
    ours.compiled_step = torch.compile(decode_step, backend="aot_eager", fullgraph=True, dynamic=False)
    assert generate(ours, prompts, 24, stop_ids=[], decode="compiled") == ref
    assert generate(ours, prompts[::-1], 24, stop_ids=[], decode="compiled") == ref[::-1]
    with pytest.raises(ValueError, match="decode='fast'"):
        generate(ours, prompts, 2, decode="fast")
    static_cache(ours, 0, 0)
    assert ours.static_kv is None


def forced_logits(model, prompts, n, decode, forced=None):
    """Each step's logits of generate (B, vocab), fp32; with `forced` (a list of (B,) token tensors) those
    tokens are fed back instead of the argmax, so two ways of decoding see the same inputs at every step."""
    import generate as generate_lib
    logs, sample = [], generate_lib.sample

    def record(logits, *args):
        logs.append(logits.float().clone())
        return forced[len(logs) - 1] if forced is not None else sample(logits, *args)
    generate_lib.sample = record
    try:
        generate(model, prompts, n, stop_ids=[], decode=decode)
    finally:
        generate_lib.sample = sample
    return logs


def test_static_decoding_in_bf16_follows_the_cache_way(tmp_path):
    # bf16 logits tie often enough that another order of additions flips an argmax now and then, so tokens are no
    # test there: the logits are, each way fed the cache way's tokens
    _, path = write_hf(tmp_path, "llama_gqa")
    ours = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    ref = forced_logits(ours, prompts, 16, "cache")
    tokens = [x.argmax(-1) for x in ref]
    ours.compiled_step = torch.compile(decode_step, backend="aot_eager", fullgraph=True, dynamic=False)
    for decode in ("static", "compiled"):
        got = forced_logits(ours, prompts, 16, decode, tokens)
        assert len(got) == 16 and max((a - b).abs().max() / a.abs().max() for a, b in zip(ref, got)) <= 2e-2, decode


def test_generation_stops_per_sequence(tmp_path):
    hf, path = write_hf(tmp_path, "llama_gqa")
    ours = Transformer.from_pretrained(path)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    free = generate(ours, prompts, max_new_tokens=12, stop_ids=[])
    stop = free[0][3]  # the 4th token of the first row becomes its stop token
    cut = generate(ours, prompts, max_new_tokens=12, stop_ids=[stop])
    for row, full in zip(cut, free):
        k = full.index(stop) if stop in full else len(full)
        assert row == full[:k]


def test_sampling_is_seeded_and_top_p_keeps_the_top(tmp_path):
    _, path = write_hf(tmp_path, "llama_gqa")
    ours = Transformer.from_pretrained(path)
    a = generate(ours, [[4, 5, 6]], 10, temperature=1.0, top_p=0.9, seed=7, stop_ids=[])
    b = generate(ours, [[4, 5, 6]], 10, temperature=1.0, top_p=0.9, seed=7, stop_ids=[])
    assert a == b
    # top_p tiny: only the most likely token survives, i.e. greedy
    greedy = generate(ours, [[4, 5, 6]], 10, stop_ids=[])
    assert generate(ours, [[4, 5, 6]], 10, temperature=1.0, top_p=1e-6, seed=3, stop_ids=[]) == greedy


def test_save_pretrained_round_trip_loads_in_transformers(tmp_path):
    hf, path = write_hf(tmp_path, "llama3_tied")
    ours = Transformer.from_pretrained(path)
    out = str(tmp_path / "resaved")
    ours.save_pretrained(out)
    back = LlamaForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)
        assert torch.equal(Transformer.from_pretrained(out)(x), ours(x))


def test_fresh_model_from_config_trains(tmp_path):
    cfg = LlamaConfig(**TINY, num_key_value_heads=2).to_dict()
    m = Transformer.from_config(cfg)
    x = torch.randint(0, TINY["vocab_size"], (2, 10))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = m(x[:, :-1], x[:, 1:]) / x[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# -----------------------------------------------------------------------------
# safetensors reader / writer

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool]



def test_fresh_bf16_model_keeps_fp32_rope():
    # inv_freq rounded to bf16 puts RoPE's phase ~0.7 rad off at position 4000
    cfg = LlamaConfig(**TINY, num_key_value_heads=2).to_dict()
    m = Transformer.from_config(cfg, dtype=torch.bfloat16)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32
    assert torch.equal(m.inv_freq, Transformer.from_config(cfg).inv_freq)

def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(ALL_DTYPES):
        x = torch.randn(3, 5, generator=g) * 100
        out[f"t{i}"] = x > 0 if dt == torch.bool else x.to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    out["odd"] = torch.arange(7, dtype=torch.int8)  # makes the next tensor start at an odd offset
    out["after_odd"] = torch.randn(5, generator=g).to(torch.bfloat16)
    return out


def test_our_files_load_in_safetensors_bit_exact(tmp_path):
    ts = sample_tensors()
    save_safetensors(ts, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    back = safetensors_torch.load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == ts.keys()
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k]), k


def test_safetensors_files_load_in_ours_bit_exact(tmp_path):
    ts = sample_tensors()
    safetensors_torch.save_file(ts, str(tmp_path / "b.safetensors"))
    back = load_safetensors(str(tmp_path / "b.safetensors"))
    assert back.keys() == ts.keys()
    for k in ts:
        assert back[k].dtype == ts[k].dtype and torch.equal(back[k], ts[k]), k


def raw_file(path, header, data=b""):
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + data)
    return str(path)


BAD_FILES = {
    "truncated": (lambda p: open(p, "wb").write(b"\x10\x00"), "truncated"),
    "header_past_end": (lambda p: open(p, "wb").write((10 ** 6).to_bytes(8, "little") + b"{}"), "past the end"),
    "not_json": (lambda p: open(p, "wb").write((4).to_bytes(8, "little") + b"{{{{"), "not valid JSON"),
    "unknown_dtype": (lambda p: raw_file(p, {"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                      "unknown dtype"),
    "past_data": (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
                  "run past the data"),
    "size_mismatch": (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "needs 12"),
    "overlap": (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
                "overlap"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_safetensors_files(tmp_path, kind):
    make, words = BAD_FILES[kind]
    path = str(tmp_path / f"{kind}.safetensors")
    make(path)
    with pytest.raises(CheckpointError) as e:
        load_safetensors(path)
    msg = str(e.value)
    assert path in msg and words in msg and "\n" not in msg


def test_truncated_checkpoint_is_reported(tmp_path):
    _, path = write_hf(tmp_path, "llama_gqa")
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        Transformer.from_pretrained(path)


def test_bad_checkpoint_dirs(tmp_path):
    _, path = write_hf(tmp_path, "llama_gqa")
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))

    with pytest.raises(CheckpointError, match="not a directory"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        Transformer.from_pretrained(str(empty))
    json.dump(cfg, open(empty / "config.json", "w"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Transformer.from_pretrained(str(empty))

    json.dump({**cfg, "model_type": "gpt2"}, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        Transformer.from_pretrained(path)

    json.dump({**cfg, "num_hidden_layers": 3}, open(cfg_path, "w"))  # the weights lack layer 2
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.2"):
        Transformer.from_pretrained(path)

    json.dump({**cfg, "num_hidden_layers": 1}, open(cfg_path, "w"))  # the weights have an extra layer
    with pytest.raises(CheckpointError, match=r"unexpected \['model.layers.1"):
        Transformer.from_pretrained(path)

    json.dump({**cfg, "intermediate_size": 80}, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="has shape"):
        Transformer.from_pretrained(path)


def test_beam_search_matches_transformers(tmp_path):
    # stop ids taken from the greedy outputs, so hypotheses end at different steps and in different beams
    hf, path = write_hf(tmp_path, "llama_gqa")
    ours = Transformer.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    greedy = generate(ours, prompts, max_new_tokens=12, stop_ids=[])
    stops = sorted({t for row in greedy for t in row[1:5]})
    ids, mask = left_pad(prompts)
    # LLM-Adapters' setting (4 beams, transformers' defaults) with four stop ids, then other penalties and stops
    runs = [(stop, 4, 1.0, False) for stop in stops[:4]] + [(stops[4], 3, 0.5, True), (stops[5], 2, 2.0, "never"),
                                                           (stops[0], 5, -1.0, False)]
    ended_early = 0
    for stop, nb, lp, es in runs:
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=nb, do_sample=False,
                          length_penalty=lp, early_stopping=es, eos_token_id=stop, pad_token_id=0)
        ref = [r[:r.index(stop)] if stop in r else r for r in ref[:, ids.shape[1]:].tolist()]
        got = beam_search(ours, prompts, 12, nb, stop_ids=[stop], length_penalty=lp, early_stopping=es)
        assert got == ref, (stop, nb, lp, es)
        ended_early += sum(len(r) < 12 for r in got)
    assert ended_early >= 3
    # generate(num_beams=4) is that search with transformers' defaults; each prompt alone gives the same tokens
    got = generate(ours, prompts, 12, stop_ids=[stops[0]], num_beams=4)
    assert got == beam_search(ours, prompts, 12, 4, [stops[0]])
    assert [generate(ours, [p], 12, stop_ids=[stops[0]], num_beams=4)[0] for p in prompts] == got
    assert generate(ours, prompts, 12, stop_ids=[], num_beams=4) != greedy  # beams find other text than greedy
