# The model's own chat format end to end, on a tiny random Llama with a ChatML byte-level tokenizer: train.py's
# --data_format=chat trains the replies only (system turns kept, the ids those of encode_chat), a tokenizer with no
# chat template is one line, --data_format=alpaca_chat is the earlier Alpaca rendering, sample.py --template=chat
# prompts the same way, and --alpha follows 2 r unless given (checkpoint, adapter, resume). The templates themselves
# against the models' own: test_tokenizer.py (Llama-3, Mistral), test_gguf.py (SmolLM2's ChatML).
import base64
import io
import json
import os

import pytest
import torch

import configurator
import dataset
import eval as ev
import sample
import train
from configurator import ConfigError
from generate import generate
from model import Transformer
from tokenizer import Tokenizer, encode_chat

SYSTEM = "You are a calculator."  # the tokenizer's default system turn, as SmolLM2's header names one
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def write_chatml_tokenizer(folder):
    """A byte-level BPE with ChatML's specials below the bytes, as models/smollm2/prepare.py writes SmolLM2's."""
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    ranks = {bytes([b]): 3 + b for b in range(256)}
    for merge in (b"us", b"er", b"user", b"as", b"sist", b"ant", b"assist", b"assistant", b"\n ", b" +"):
        ranks[merge] = 3 + len(ranks)
    header = {"pattern": GPT2, "special_tokens": specials, "n_vocab": 3 + len(ranks), "bos_id": None, "eos_id": 2,
              "pad_id": 0, "stop_ids": [0, 2], "chat_format": "chatml", "default_system": SYSTEM}
    path = os.path.join(folder, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n" + b"".join(base64.b64encode(t) + b" %d\n" % r
                                                                 for t, r in ranks.items()))
    return Tokenizer(path)


def make_chat_model(path):
    """A tiny random Llama in `path` with write_chatml_tokenizer's tokenizer. -> path"""
    tok = write_chatml_tokenizer(path)
    cfg = dict(model_type="llama", vocab_size=tok.n_words, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None,
               eos_token_id=2)
    torch.manual_seed(0)
    Transformer.from_config(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return make_chat_model(str(tmp_path_factory.mktemp("chatml")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CONVERSATIONS = [[{"role": "user", "content": "3 + 4 ="}, {"role": "assistant", "content": "7"}],
                 [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2 * 3?"},
                  {"role": "assistant", "content": "6"}, {"role": "user", "content": "and + 1?"},
                  {"role": "assistant", "content": "  7\n"}]]


def test_chat_data_trains_the_replies_in_the_tokenizers_template(chat_model, tmp_path):
    tok = Tokenizer(chat_model)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    examples = dataset.tokenize_file(data, tok, dict(train.DEFAULTS, data_format="chat", out_dir=str(tmp_path)))
    for (ids, labels), messages in zip(examples, CONVERSATIONS):
        assert ids == encode_chat(tok, messages, add_generation_prompt=False)  # the template's ids, no bos added
        trained = tok.decode([t for t in labels if t != -100])
        # the replies and their <|im_end|>, nothing else (but "\n ": the header's newline joined to the reply's first
        # space by the pre-tokenizer is one token, the reply's)
        assert trained == ("7<|im_end|>" if len(messages) == 2 else "6<|im_end|>\n  7\n<|im_end|>")
        system = messages[0]["content"] if messages[0]["role"] == "system" else SYSTEM  # kept, or the default
        assert tok.decode(ids).startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        # the eval prompt (encode_chat of the turns before a reply) is a prefix, untrained
        prompt = encode_chat(tok, messages[:[m["role"] for m in messages].index("assistant")])
        assert ids[:len(prompt)] == prompt and all(t == -100 for t in labels[:len(prompt)])


def test_chat_needs_a_template_and_good_turns(chat_model, tiny_checkpoint, tmp_path):
    cfg = dict(train.DEFAULTS, data_format="chat", out_dir=str(tmp_path))
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    with pytest.raises(ConfigError, match=r"^--data_format=chat: .*tokenizer.model has no chat template .* "
                                          r"--data_format=alpaca_chat"):
        dataset.tokenize_file(data, Tokenizer(tiny_checkpoint), cfg)  # sentencepiece, no [INST] pieces
    tok = Tokenizer(chat_model)
    for messages, what in (([{"role": "tool", "content": "x"}], "role 'tool': expected system, user or assistant"),
                           ([{"role": "user", "content": 5}], "the content of a user turn must be a string"),
                           ("hi", "messages must be a list")):
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": messages}])
        with pytest.raises(ConfigError) as e:
            dataset.tokenize_file(bad, tok, cfg)
        assert str(e.value) == f"{bad}:2: {what} (data_format=chat)" or str(e.value).startswith(f"{bad}:2: {what}")


def test_alpaca_chat_is_the_earlier_rendering(tiny_checkpoint, tmp_path):
    tok = Tokenizer(tiny_checkpoint)
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "Now 4?"}, {"role": "assistant", "content": "9"}]
    ids, labels = dataset.example_ids({"messages": messages}, "alpaca_chat", tok)
    # what --data_format=chat trained before it used the tokenizer's template (git show 77f88a8:dataset.py)
    parts = [(tok.encode(dataset.PROMPT.format(instruction="Add 2 and 3."), bos=True), False),
             (tok.encode("5", eos=True), True), (tok.encode("\n\n### Instruction:\nNow 4?\n\n### Response:"), False),
             (tok.encode("9", eos=True), True)]
    assert ids == [t for p, _ in parts for t in p] and labels == [t if k else -100 for p, k in parts for t in p]
    with pytest.raises(TypeError, match="'system' turn has no place in the Alpaca template"):
        dataset.example_ids({"messages": [{"role": "system", "content": "x"}, *messages]}, "alpaca_chat", tok)


def test_sample_chat_template(chat_model, tiny_checkpoint):
    model, tok = Transformer.from_pretrained(chat_model), Tokenizer(chat_model)
    for extra, system in (([], []), (["--system=Be exact."], [{"role": "system", "content": "Be exact."}])):
        out = io.StringIO()
        got = sample.main([f"--model={chat_model}", "--template=chat", "--prompt=3 + 4 =", "--max_new_tokens=12",
                           "--device=cpu", *extra], out)
        prompt = encode_chat(tok, system + [{"role": "user", "content": "3 + 4 ="}])
        assert tok.decode(prompt).startswith(f"<|im_start|>system\n{'Be exact.' if system else SYSTEM}<|im_end|>")
        want = tok.decode(generate(model, [prompt], 12, stop_ids=tok.stop_ids)[0])
        assert got == [want] and f"---\n{want}\n" in out.getvalue()
    with pytest.raises(ev.UsageError, match=r"^--system='x': expected --template=chat with it$"):
        sample.main([f"--model={chat_model}", "--prompt=hi", "--system=x"])
    with pytest.raises(ev.UsageError, match="^--template=chat: .* has no chat template"):
        sample.main([f"--model={tiny_checkpoint}", "--template=chat", "--prompt=hi", "--device=cpu"])


def run_train(chat_model, data, out_dir, **kw):
    cfg = dict(train.DEFAULTS, init_from=chat_model, data=data, data_format="chat", out_dir=str(out_dir),
               method="lora", r=4, dropout=0.0, batch_size=2, micro_batch_size=2, max_steps=2, lr=1e-2,
               dtype="float32", device="cpu", log_interval=1, max_len=128)
    return train.train(dict(cfg, **kw))


def saved_alpha(out_dir):
    ck = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)
    with open(os.path.join(out_dir, "adapter", "adapter_config.json")) as f:
        return json.loads(ck["config"])["alpha"], json.load(f)["lora_alpha"]


def test_alpha_follows_2r_unless_given(chat_model, tmp_path):
    assert train.DEFAULTS["alpha"] == 0.0
    desc = next(d for _, k, d in configurator.documented(train.DOC_FILES, train.DEFAULTS) if k == "alpha")
    assert "0: 2 r" in desc  # --help says so
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS] * 2)
    run_train(chat_model, data, tmp_path / "default")  # --r=4 alone: alpha 8, scaling 2
    assert saved_alpha(tmp_path / "default") == (8.0, 8.0)
    run_train(chat_model, data, tmp_path / "given", alpha=3.0)
    assert saved_alpha(tmp_path / "given") == (3.0, 3.0)
    # a run of the former default (alpha 128 whatever r) resumes with its alpha given, and refuses without it
    run_train(chat_model, data, tmp_path / "old", alpha=128.0, stop_after=1)
    with pytest.raises(ConfigError, match=r"--alpha=8.0 \(checkpoint: 128.0\)"):
        run_train(chat_model, data, tmp_path / "old", resume=True)
    assert run_train(chat_model, data, tmp_path / "old", alpha=128.0, resume=True)["steps"] == 2
    assert saved_alpha(tmp_path / "old") == (128.0, 128.0)
    with pytest.raises(ConfigError, match=r"^--alpha=-1.0: must be 0 or more"):
        run_train(chat_model, data, tmp_path / "bad", alpha=-1.0)
