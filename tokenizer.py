"""
The tokenizer of a checkpoint: sentencepiece (Llama-2, Mistral), tiktoken BPE (Llama-3), or a tiktoken BPE
with a JSON header line (a byte-level BPE converted from a GGUF file by models/, e.g. SmolLM2), told apart
by the content of tokenizer.model, not by its name.

    tok = Tokenizer("checkpoints/Mistral-7B-v0.3")    # or the tokenizer.model file itself
    ids = tok.encode("hi", bos=True)                  # [1, 12782]
    tok.decode(ids[1:]), tok.stop_ids                 # "hi", {2}
    encode_chat(tok, [{"role": "user", "content": "hi"}])   # the prompt in the tokenizer's chat format
    chat_turns(tok, messages)                         # [(ids, trained?)]: what train.py's chat data trains

Text is always encoded as text: "<s>", "[INST]" or "<|eot_id|>" typed in the data are plain characters,
never the special token (Meta's llama and mistral_common do the same), so the only special tokens in a
sequence are the bos/eos asked for and a chat format's own. The sentencepiece encoding is sentencepiece's
own, with its dummy prefix: " x" is "▁▁x". HF's tokenizer.json does not add the prefix to text that already
starts with a space, so it differs from us (and from Meta's reference) there.
"""
import base64
import json
import os
import re

import sentencepiece as spm
import tiktoken

# Meta's llama3 tokenizer.py: the pre-tokenizer split and the 256 special tokens after the base ranks
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]  # 256 in all
CHAT_FORMATS = ("chatml", "llama3", "mistral")  # chat_turns renders these
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")  # "IQ== 0": a base64 token, its rank


class Tokenizer:
    def __init__(self, path):
        path = str(path)
        if os.path.isdir(path):
            # HF's Llama-3 repos keep the tiktoken file in original/, next to a tokenizer.json we do not read
            cands = [os.path.join(path, "tokenizer.model"), os.path.join(path, "original", "tokenizer.model")]
            path = next((c for c in cands if os.path.isfile(c)), cands[0])
        if not os.path.isfile(path):
            raise ValueError(f"{path}: tokenizer file not found")
        self.path = path
        with open(path, "rb") as f:
            data = f.read()
        self.chat_format, self.default_system = None, None  # set by a header that names them
        if data.startswith(b"{") or TIKTOKEN_LINE.fullmatch(data.split(b"\n", 1)[0].strip()):
            self._init_tiktoken(data)
        else:
            self._init_sentencepiece(data)

    def _init_sentencepiece(self, data):
        self.sp, self.tt, self.special = spm.SentencePieceProcessor(), None, {}
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, TypeError, ValueError):
            self.sp = None
        # an empty file parses as an empty model proto: require pieces too
        if self.sp is None or self.sp.get_piece_size() == 0:
            raise ValueError(f"{self.path}: neither a sentencepiece model nor a tiktoken BPE file")
        self.n_words = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # Llama-2 and Mistral have no pad piece (pad_id -1). Padding needs a real id (it is embedded, then masked),
        # and it must not be eos: code that masks labels by `ids == pad_id` would then never train the eos.
        # unk fits: these models fall back to bytes, so unk never appears in encoded text.
        self.pad_id = next(i for i in (self.sp.pad_id(), self.sp.unk_id(), self.eos_id) if i >= 0)
        self.stop_ids = {self.eos_id}
        # Mistral's v3 tokenizer (7B-v0.3) holds [INST] and [/INST] as control pieces: its chat format. Llama-2's
        # and Mistral v0.1's have none (their "[INST]" is text): no chat format
        inst = [self.sp.piece_to_id(p) for p in ("[INST]", "[/INST]")]
        if all(self.sp.id_to_piece(i) == p and self.sp.IsControl(i) for i, p in zip(inst, ("[INST]", "[/INST]"))):
            self.chat_format, self.special = "mistral", {"[INST]": inst[0], "[/INST]": inst[1]}

    def _init_tiktoken(self, data):
        header, first = {}, 1
        if data.startswith(b"{"):  # a converted BPE: its own split pattern, special tokens and ids
            line, _, data = data.partition(b"\n")
            try:
                header = json.loads(line)
                pattern, specials, n_words = header["pattern"], header["special_tokens"], header["n_vocab"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:1: not a tokenizer header (one JSON line with pattern, special_tokens "
                                 f"and n_vocab; an HF tokenizer.json is not read) ({type(e).__name__}: {e})") from None
            first = 2
        ranks, n_lines = {}, 0
        for n, line in enumerate(data.splitlines(), first):
            if line.strip():
                token, _, rank = line.partition(b" ")
                try:
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:  # binascii.Error is a ValueError
                    raise ValueError(f"{self.path}:{n}: not a 'base64token rank' line of a tiktoken BPE file") from None
                n_lines += 1
        if header:
            # the ids of tokens and specials interleave (SmolLM2's specials are 0..16): each id and token once
            ids = [*ranks.values(), *specials.values()]
            if len(set(ids)) != len(ids) or len(ranks) != n_lines:
                raise ValueError(f"{self.path}: token ids or token bytes are not unique")
            self.special = specials
        else:  # Llama-3: the specials are numbered after the base ranks, so those must be exactly 0..n-1
            if sorted(ranks.values()) != list(range(len(ranks))):
                raise ValueError(f"{self.path}: tiktoken ranks are not 0..{len(ranks) - 1}, each once")
            self.special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}  # name -> id
            pattern = LLAMA3_PATTERN
        self.sp = None
        self.tt = tiktoken.Encoding(os.path.basename(self.path), pat_str=pattern, mergeable_ranks=ranks,
                                    special_tokens=self.special)
        self.n_words = self.tt.n_vocab  # Llama-3: n_base + 256
        if header:
            # bytes the vocabulary lacks have ids from n_vocab on (tiktoken needs all 256): encode drops them,
            # as llama.cpp and HF's BPE do
            self.n_words = n_words
            self.bos_id, self.eos_id, self.pad_id = header.get("bos_id"), header.get("eos_id"), header.get("pad_id")
            self.stop_ids = set(header.get("stop_ids") or [self.eos_id])
            self.chat_format, self.default_system = header.get("chat_format"), header.get("default_system")
            return
        self.bos_id, self.eos_id = self.special["<|begin_of_text|>"], self.special["<|end_of_text|>"]
        # a reserved token: in the embedding, never produced from text (Llama-3.1 names this one
        # <|finetune_right_pad_id|>)
        self.pad_id = self.special["<|reserved_special_token_2|>"]
        # base models end a document with <|end_of_text|>, instruct models a turn with <|eot_id|>
        self.stop_ids = {self.eos_id, self.special["<|eot_id|>"]}
        self.chat_format = "llama3"  # its header tokens are in every Llama-3 file

    def encode(self, text, bos=False, eos=False):
        if self.sp is not None:
            ids = self.sp.encode(text)
        else:
            ids = [i for part in _tiktoken_parts(text) for i in self.tt.encode_ordinary(part) if i < self.n_words]
        # a model that takes no bos (bos_id None: SmolLM2's add_bos_token is false) gets none
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def decode(self, ids):
        ids = [int(i) for i in ids]  # tensors and numpy ints too
        return self.sp.decode(ids) if self.sp is not None else self.tt.decode(ids)


def _tiktoken_parts(text, max_chars=400_000, max_run=25_000):
    # tiktoken's regex overflows its stack (a Rust panic, not an exception) on very long runs of whitespace or
    # non-whitespace. Cut where Meta's llama3 tokenizer cuts: every 400k characters, and inside any run of more
    # than 25k, so long documents encode to the same ids as theirs.
    for i in range(0, len(text), max_chars):
        chunk, start = text[i:i + max_chars], 0
        for m in re.finditer(rf"\s{{{max_run + 1},}}|\S{{{max_run + 1},}}", chunk):
            for cut in range(m.start() + max_run, m.end(), max_run):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


def encode_chat(tok, messages, add_generation_prompt=True):
    """messages: [{"role": "system" | "user" | "assistant", "content": str}, ...] -> ids in the tokenizer's chat
    format (chat_turns), ending with the assistant's header: the prompt for a reply. Generate with
    stop_ids=tok.stop_ids: the reply ends at the format's end-of-turn token."""
    return [i for ids, _ in chat_turns(tok, messages, add_generation_prompt) for i in ids]


def chat_turns(tok, messages, add_generation_prompt=False):
    """The conversation in the tokenizer's chat format as [(ids, trained?)]: trained are the assistants' replies
    with their end-of-turn token (what the model is to generate), not the headers before them nor the system and
    user turns. Their ids, joined, are the model's own template's. Content is text: "<|im_end|>" typed in it is never
    the special token; the text between two specials is encoded on its own, as a tokenizer splitting at specials.
      chatml (SmolLM2-Instruct, Qwen): <|im_start|>role\ncontent<|im_end|>\n each; the tokenizer's default system
        turn first where the conversation has none (SmolLM2's template does that)
      llama3 (Llama-3-Instruct): <|begin_of_text|>, then <|start_header_id|>role<|end_header_id|>\n\n content.strip()
        <|eot_id|> each (Meta's ChatFormat, HF's template)
      mistral (7B-v0.3's tokenizer): <s>[INST] user[/INST] reply</s>..., turns alternating user/assistant after
        an optional system turn, which goes before the last user turn's text (mistral_common; HF's template
        drops it when the conversation ends with a reply)"""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {role, content} objects")
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"role {m.get('role')!r}: expected system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"the content of a {m['role']} turn must be a string")
    if tok.chat_format == "chatml":
        return _chatml(tok, messages, add_generation_prompt)
    if tok.chat_format == "llama3":
        return _llama3(tok, messages, add_generation_prompt)
    if tok.chat_format == "mistral":
        return _mistral(tok, messages)
    raise ValueError(f"{tok.path}: this tokenizer has no chat format (ChatML, Llama-3's or Mistral's "
                     f"[INST]){f' (its header names {tok.chat_format!r})' if tok.chat_format else ''}")


def _chatml(tok, messages, add_generation_prompt):
    start, end, nl = tok.special["<|im_start|>"], tok.special["<|im_end|>"], tok.encode("\n")
    if tok.default_system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": tok.default_system}, *messages]
    turns = []
    for m in messages:
        ids = tok.encode(f"{m['role']}\n{m['content']}")  # one piece of text between two specials
        if m["role"] != "assistant":
            turns.append(([start, *ids, end, *nl], False))
            continue
        # the header's tokens end where the reply's begin, but for a reply that starts with whitespace, which the
        # header's "\n" joins: that token is the reply's then (trained)
        head = tok.encode("assistant\n")
        k = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
        turns += [([start, *ids[:k]], False), ([*ids[k:], end], True), (nl, False)]
    return turns + [([start, *tok.encode("assistant\n")], False)] * add_generation_prompt


def _llama3(tok, messages, add_generation_prompt):
    sh, eh, eot = (tok.special[t] for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    head = lambda role: [sh, *tok.encode(role), eh, *tok.encode("\n\n")]  # noqa: E731
    turns = [([tok.bos_id], False)]
    for m in messages:
        body = [*tok.encode(m["content"].strip()), eot]  # "\n\n" never joins a stripped text's first token
        turns += [(head(m["role"]), False), (body, True)] if m["role"] == "assistant" else \
            [(head(m["role"]) + body, False)]
    return turns + [(head("assistant"), False)] * add_generation_prompt


def _mistral(tok, messages):
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    for i, m in enumerate(rest):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise ValueError(f"Mistral's chat format: turn {i + 1 + (system is not None)} is {m['role']!r}; after "
                             "an optional system turn the turns alternate user, assistant, user, ...")
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    if system is not None and last_user < 0:
        raise ValueError("Mistral's chat format: a system turn goes into a user turn, and there is none")
    inst, end_inst = tok.special["[INST]"], tok.special["[/INST]"]
    turns = [([tok.bos_id], False)]
    for i, m in enumerate(rest):
        if m["role"] == "user":
            text = f"{system}\n\n{m['content']}" if i == last_user and system is not None else m["content"]
            turns.append(([inst, *tok.encode(text), end_inst], False))
        else:  # the template's " " + content|trim: sentencepiece's dummy prefix is that space
            turns.append(([*tok.encode(m["content"].strip()), tok.eos_id], True))
    return turns
