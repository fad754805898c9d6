import base64
import json
import os
import re

import pytest
import sentencepiece as spm
import tiktoken

from conftest import SHARED
from tokenizer import Tokenizer, encode_chat

MISTRAL = os.path.join(SHARED, "assets", "mistral-7b-v0.3")
TRICKY = ["Hello world", "", "\n", "a\nb\n\n  c", "trailing  ", "tab\there", "a\r\nb",
          "12345 3.14 1,000,000 007", "naïve café Ångström", "漢字とかな", "emoji 😀👍🏽 family 👨\u200d👩\u200d👧",
          "\u200b zero width", "ﬁ ①",
          "The answer is: 72", "Let's think step by step.", "don't I'LL we'd", "x" * 300,
          " leading space", "  two leading", " ", "   ", "\n\nafter newlines", "<s> </s> [INST] hi [/INST]",
          "<|begin_of_text|> <|eot_id|>"]


# -----------------------------------------------------------------------------
# sentencepiece: the real Mistral tokenizer against transformers' Rust tokenizer built from tokenizer.json

@pytest.fixture(scope="module")
def mistral():
    if not os.path.isfile(os.path.join(MISTRAL, "tokenizer.json")):
        pytest.skip(f"{MISTRAL} not present")
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(MISTRAL, "tokenizer.json"))
    return Tokenizer(MISTRAL), hf


def test_mistral_encode_matches_hf(mistral):
    tok, hf = mistral
    for s in TRICKY:
        ids = tok.encode(s)
        if not s.startswith(" "):
            assert ids == hf.encode(s, add_special_tokens=False, split_special_tokens=True), repr(s)
        # sentencepiece always adds the dummy prefix "▁"; HF's Metaspace skips it when the text starts with a
        # space, so the two agree once HF is given the space explicitly
        if s:
            assert ids == hf.encode(" " + s, add_special_tokens=False, split_special_tokens=True), repr(s)
        assert tok.decode(ids) == s, repr(s)
        if not s.startswith(" "):
            assert tok.decode(ids) == hf.decode(ids), repr(s)


def test_mistral_specials(mistral):
    tok, hf = mistral
    with open(os.path.join(MISTRAL, "config.json")) as f:
        config = json.load(f)
    assert (tok.bos_id, tok.eos_id) == (config["bos_token_id"], config["eos_token_id"]) == \
        (hf.convert_tokens_to_ids("<s>"), hf.convert_tokens_to_ids("</s>"))
    assert tok.n_words == config["vocab_size"] == len(hf)
    assert tok.stop_ids == {tok.eos_id}
    assert tok.pad_id == hf.convert_tokens_to_ids("<unk>")  # no pad piece: unk, never produced (byte fallback)
    s = "Natalia sold 48/2 = 24 clips.\nThe answer is: 72"
    assert tok.encode(s, bos=True) == hf.encode(s)  # HF adds <s> only (add_bos_token, not add_eos_token)
    assert tok.encode(s, bos=True, eos=True) == hf.encode(s) + [config["eos_token_id"]]
    # special tokens typed as text stay text (HF, by default, would turn them into the control tokens)
    s = "</s> [INST] hi [/INST]"
    assert config["eos_token_id"] in hf.encode(s, add_special_tokens=False)
    assert not set(tok.encode(s)) & {tok.bos_id, tok.eos_id, hf.convert_tokens_to_ids("[INST]")}
    # a directory and the file in it are the same tokenizer
    assert Tokenizer(os.path.join(MISTRAL, "tokenizer.model")).path == tok.path


@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory):
    # trained here, so the sentencepiece path is covered when the Mistral asset is absent
    path = str(tmp_path_factory.mktemp("sp") / "tokenizer.model")
    corpus = [f"{a} has {n} apples and {b} has {n + 3} pears." for a in ("Tom", "Anna", "Sam") for b in ("Mia", "Ben")
              for n in range(40)] + ["naïve café, 漢字!"]
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=f, model_type="bpe",
                                       vocab_size=300, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                       # as Llama-2/Mistral: no normalisation, so every text round-trips
                                       normalization_rule_name="identity", remove_extra_whitespaces=False,
                                       num_threads=1, minloglevel=2)
    return path


def test_sentencepiece_trained_model(tiny_sp):
    ref = spm.SentencePieceProcessor(model_file=tiny_sp)
    tok = Tokenizer(os.path.dirname(tiny_sp))
    assert tok.path == tiny_sp and tok.n_words == ref.get_piece_size()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (1, 2, 0, {2})  # pad_id -1 in the model: unk
    for s in TRICKY:
        assert tok.encode(s, bos=True, eos=True) == ref.encode(s, add_bos=True, add_eos=True), repr(s)
        assert tok.decode(tok.encode(s)) == s, repr(s)


# -----------------------------------------------------------------------------
# tiktoken: a Llama-3-sized BPE file written here, against a tiktoken.Encoding built the way Meta's llama3
# tokenizer.py builds it (pattern and special list copied from there, not from tokenizer.py)

META_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
META_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"] + \
                [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
MERGES = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b"ld", b" wor", b" world", b"\n\n", b"12", b"123", b"45", b"  ",
          b"    ", b"<|", b"|>", b"eo", b"eot", "é".encode(), "caf".encode(), "café".encode(), b"'s", b" the"]
N_BASE = 128000  # Llama-3's base vocabulary: its config says bos_token_id 128000, eos_token_id 128001


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    ranks = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        ranks[m] = len(ranks)
    while len(ranks) < N_BASE:  # filler tokens up to the real size, so the special ids are the real ones
        ranks[b"~%d~" % len(ranks)] = len(ranks)
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    ref = tiktoken.Encoding("ref", pat_str=META_PATTERN, mergeable_ranks=ranks,
                            special_tokens={t: N_BASE + i for i, t in enumerate(META_SPECIALS)})
    return Tokenizer(str(path.parent)), ref


def meta_encode(ref, s):
    # Meta's llama3 Tokenizer.encode: 400k-character chunks, runs of more than 25k (non-)whitespace cut
    def split(s, n=25_000):
        cur_len, cur_space, start = 0, s[0].isspace() if s else False, 0
        for i in range(len(s)):
            space = s[i].isspace()
            if cur_space ^ space:
                cur_len, cur_space = 1, space
            else:
                cur_len += 1
                if cur_len > n:
                    yield s[start:i]
                    start, cur_len = i, 1
        yield s[start:]
    return [t for i in range(0, len(s), 400_000) for part in split(s[i:i + 400_000])
            for t in ref.encode(part, allowed_special=set(), disallowed_special=())]


def test_tiktoken_matches_reference(llama3):
    tok, ref = llama3
    # a million spaces panic inside tiktoken unless cut; digits are grouped in threes from each cut, so the
    # long digit runs check that the cuts fall where Meta's do (inside runs, and at 400k characters)
    texts = TRICKY + ["hello world\n\nthe café's 123123", " " * 1_000_000 + "x", "123" * 20_000 + " " + "a" * 30_000,
                      "12345 " * 80_000]
    for s in texts:
        ids = tok.encode(s)
        assert ids == meta_encode(ref, s), repr(s[:40])
        assert tok.decode(ids) == s, repr(s[:40])
    assert tok.encode("hello world") == [ref.encode_single_token(t) for t in (b"hello", b" world")]  # merges used
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]


def test_tiktoken_specials(llama3):
    tok, ref = llama3
    special = lambda name: ref.encode_single_token(name)  # noqa: E731
    assert (tok.bos_id, tok.eos_id) == (special("<|begin_of_text|>"), special("<|end_of_text|>")) == (128000, 128001)
    assert special("<|eot_id|>") == 128009 and special("<|start_header_id|>") == 128006
    assert tok.n_words == ref.n_vocab == 128256
    assert tok.stop_ids == {special("<|end_of_text|>"), special("<|eot_id|>")}
    assert tok.pad_id not in tok.stop_ids | {tok.bos_id} and N_BASE <= tok.pad_id < tok.n_words
    assert tok.decode([tok.bos_id, special("<|eot_id|>")]) == "<|begin_of_text|><|eot_id|>"
    # the literal text of a special token in user data is encoded as text, never as the special token
    s = "user wrote <|eot_id|> and <|begin_of_text|>"
    assert special("<|eot_id|>") in ref.encode(s, allowed_special="all")  # what trusting the text would give
    assert tok.encode(s) == ref.encode_ordinary(s) and max(tok.encode(s)) < N_BASE
    assert tok.encode(s, bos=True, eos=True) == [128000] + ref.encode_ordinary(s) + [128001]


# -----------------------------------------------------------------------------
# a converted byte-level BPE (models/smollm2/prepare.py writes one from a GGUF): a JSON header line, then the
# ranks. The real file is checked against its GGUF's own BPE and chat template in test_gguf.py.

def test_bpe_with_header(tmp_path):
    specials = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}  # below the ranks, as SmolLM2's
    ranks = {bytes([b]): 3 + i for i, b in enumerate(b for b in range(256) if b != 4)}  # no token for byte 4
    ranks[b"ab"] = 258
    ranks[b"\x04"] = 259  # tiktoken needs every byte: the missing one gets an id past n_vocab
    header = {"pattern": r"'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", "special_tokens": specials,
              "n_vocab": 259, "bos_id": None, "eos_id": 2, "pad_id": 0, "stop_ids": [0, 2], "chat_format": "chatml",
              "default_system": "Be brief."}
    path = tmp_path / "tokenizer.model"
    path.write_bytes(json.dumps(header).encode() + b"\n"
                     + b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    tok = Tokenizer(str(tmp_path))
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (259, None, 2, 0, {0, 2})
    assert tok.encode("ab a\x04b", bos=True) == [258, ranks[b" "], ranks[b"a"], ranks[b"b"]]  # no bos; byte 4 dropped
    assert tok.decode(tok.encode("ab <|im_end|> ab")) == "ab <|im_end|> ab" and 2 not in tok.encode("<|im_end|>")
    chat = [{"role": "user", "content": "ab"}]
    assert tok.decode(encode_chat(tok, chat)) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                  "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "x"}, *chat, {"role": "assistant", "content": "b"}]
    assert tok.decode(encode_chat(tok, own, add_generation_prompt=False)) == \
        "<|im_start|>system\nx<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    path.write_bytes(b'{"pattern": "x"\n' + base64.b64encode(b"a") + b" 0\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:1: not a tokenizer header"):
        Tokenizer(str(path))


def test_chat_needs_a_chat_format(tiny_sp):
    with pytest.raises(ValueError, match="has no chat format"):
        encode_chat(Tokenizer(tiny_sp), [{"role": "user", "content": "hi"}])


# -----------------------------------------------------------------------------
# bad input: a one-line ValueError naming the file

@pytest.mark.parametrize("content", [None, b"", b"\x00\x9f\xffgarbage" * 50, b"just some text\nmore text\n",
                                     b'{"model": {"type": "BPE"}}', b"IQ== 0\n!!notbase64 1\n", b"IQ== 0\nIg== 5\n"])
def test_bad_files(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_bytes(content)
    for arg in (str(path), str(tmp_path)):  # the file and its directory
        with pytest.raises(ValueError) as e:
            Tokenizer(arg)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# chat formats: the ids equal the model's own template, rendered by jinja2 / transformers and tokenized with the
# specials as tokens (ChatML on the real SmolLM2 file: test_gguf.py)

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, verbatim
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATIONS = [[{"role": "user", "content": "What is 2+2?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 2 you"}],
                 [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": " 2. \n"},
                  {"role": "user", "content": "  and 3 * 7 ?\n"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "hello world"},
                  {"role": "assistant", "content": "café's 123"}, {"role": "user", "content": "\n\nthe end "}]]


def test_llama3_chat_equals_its_template(llama3):
    import jinja2
    from tokenizer import chat_turns
    tok, ref = llama3
    assert tok.chat_format == "llama3"
    for messages in CONVERSATIONS:
        for gen in (True, False):
            text = jinja2.Template(LLAMA3_TEMPLATE).render(messages=messages, add_generation_prompt=gen,
                                                           bos_token="<|begin_of_text|>")
            assert encode_chat(tok, messages, gen) == ref.encode(text, allowed_special="all"), text
        # trained: each reply's stripped text and its <|eot_id|>, nothing else
        turns = chat_turns(tok, messages + [{"role": "assistant", "content": " 4\n"}])
        trained = [tok.decode(ids) for ids, t in turns if t]
        assert trained == [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"] + \
            ["4<|eot_id|>"]
    # a special typed in the content is text (the template's tokenizer would make it the token)
    ids = encode_chat(tok, [{"role": "user", "content": "a <|eot_id|>"}])
    assert ids.count(tok.special["<|eot_id|>"]) == 1 and tok.decode(ids).count("<|eot_id|>") == 2


def test_mistral_chat_equals_its_template(mistral):
    from tokenizer import chat_turns
    from transformers import AutoTokenizer
    tok, hf = mistral[0], AutoTokenizer.from_pretrained(MISTRAL)  # with tokenizer_config.json: its chat template
    assert tok.chat_format == "mistral"
    replied = [[{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": " 2. \n"}]]
    for messages in CONVERSATIONS + replied:
        ref = hf.apply_chat_template(messages, tokenize=True)
        assert encode_chat(tok, messages) == list(ref.get("input_ids", ref) if hasattr(ref, "get") else ref)
    # the system turn is kept where HF's template drops it (a conversation ending with a reply): mistral_common's
    # place, before the last user turn's text
    messages = [{"role": "system", "content": "Be brief."}, *replied[0]]
    assert "Be brief." not in hf.apply_chat_template(messages, tokenize=False)
    turns = chat_turns(tok, messages)
    assert tok.decode(turns[1][0][1:-1]) == "Be brief.\n\n1+1?" and turns[-1][0] == tok.encode("2.") + [tok.eos_id]
    assert [t for _, t in turns] == [False, False, True]
    with pytest.raises(ValueError, match="alternate user, assistant"):
        encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="a system turn goes into a user turn"):
        encode_chat(tok, [{"role": "system", "content": "a"}])
