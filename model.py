"""
A LLaMA / Mistral model in plain PyTorch that loads Hugging Face checkpoints directly.

    model = Transformer.from_pretrained("path/to/Llama-2-7b-hf", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids)                       # (B, T, vocab)
    loss_sum = model(input_ids, targets=targets)    # summed over targets != -100, no full logits held
    new_tokens = model.generate([[1, 415, 2936], [1, 22557]], max_new_tokens=64)
    new_tokens = model.generate(prompts, 64, decode="compiled")  # static KV cache, compiled step (CUDA graphs)

Module and parameter names are the HF ones (model.layers.0.self_attn.q_proj.weight, ...), so a
checkpoint loads with no mapping table and LoRA targets are the usual q_proj ... down_proj.
Weights are read by the small safetensors reader below (memory-mapped, no copy where possible).
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    pass


# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header, then raw little-endian data.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors_header(path):
    """Returns (header dict without __metadata__, data start offset, file size); validates it all."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no header length)")
        n = int.from_bytes(raw, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {info['dtype']!r}")
        if not (0 <= lo <= hi <= data_size):
            raise CheckpointError(f"{path}: tensor {name!r} offsets [{lo}, {hi}) run past the data "
                                  f"({data_size} bytes); the file may be truncated")
        if hi - lo != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {hi - lo} bytes, shape {shape} needs "
                                  f"{math.prod(shape) * dtype.itemsize}")
        spans.append((lo, hi, name))
    spans.sort()
    for (_, hi1, a), (lo2, _, b) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap")
    return header, start, size


def load_safetensors(path):
    """All tensors of a file, as views into one private memory map (copy-on-write, nothing read yet)."""
    header, start, size = read_safetensors_header(path)
    if size == start:
        return {name: torch.empty(info["shape"], dtype=DTYPES[info["dtype"]]) for name, info in header.items()}
    buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        dtype, (lo, hi) = DTYPES[info["dtype"]], info["data_offsets"]
        raw = buf[start + lo:start + hi]
        if (start + lo) % dtype.itemsize:
            raw = raw.clone()  # misaligned for this dtype: copy to view it
        out[name] = raw.view(dtype).view(info["shape"])
    return out


def save_safetensors(tensors, path, metadata=None):
    """Writes a .safetensors file atomically (temp file, then rename)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    items = [(k, t.detach().contiguous().cpu()) for k, t in tensors.items()]
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# config


# the config.json keys read below and what each must be when present (null: the default)
CONFIG_TYPES = {**dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                                 "sliding_window"), int),
                **dict.fromkeys(("rms_norm_eps", "rope_theta", "initializer_range"), (int, float)),
                **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias"), bool)}
CONFIG_TYPE_NAMES = {int: "a positive integer", (int, float): "a positive number", bool: "true or false"}


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` positions only
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    initializer_range: float = 0.02

    @classmethod
    def from_config(cls, cfg, where="config.json"):
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{where}: not a JSON object")
        for key, kind in CONFIG_TYPES.items():  # a wrong type fails here, not deep inside the model
            v, what = cfg.get(key), CONFIG_TYPE_NAMES[kind]
            bad = not isinstance(v, bool) if kind is bool else isinstance(v, bool) or not isinstance(v, kind) or v <= 0
            if v is not None and bad:
                raise CheckpointError(f"{where}: {key} must be {what}, not {json.dumps(v)}")
        mt = cfg.get("model_type")
        if mt not in ("llama", "mistral"):
            raise CheckpointError(f"{where}: unsupported model_type {mt!r} (supported: llama, mistral)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: unsupported hidden_act {cfg['hidden_act']!r} (only silu)")
        try:
            heads = cfg["num_attention_heads"]
            args = cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                       intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                       num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                       head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads)
        except KeyError as e:
            raise CheckpointError(f"{where}: missing key {e.args[0]!r}") from None
        for key in ("rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
                    "mlp_bias", "initializer_range"):
            if cfg.get(key) is not None:
                setattr(args, key, cfg[key])
        if mt == "mistral":
            args.sliding_window = cfg.get("sliding_window")
        # Hub checkpoints carry top-level rope_theta / rope_scaling; recent transformers writes
        # them inside rope_parameters. The type key is "rope_type" or the older "type".
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        args.rope_theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise CheckpointError(f"{where}: unsupported rope type {kind!r} (supported: default, linear, llama3)")
        args.rope_scaling = None if kind == "default" else {**rope, "rope_type": kind}
        if args.num_attention_heads % args.num_key_value_heads:
            raise CheckpointError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        return args


def load_config(checkpoint_dir):
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: not a directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (not a model checkpoint directory)")
    try:
        with open(path) as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def rope_inv_freq(args):
    # exactly HF's computation, so cos/sin match bit for bit
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = args.rope_scaling
    if sc is None:
        return inv_freq
    if sc["rope_type"] == "linear":
        return inv_freq / sc["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
    return torch.where(medium, smoothed, scaled)


# -----------------------------------------------------------------------------
# the model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the input dtype (as HF does, so bf16 results agree)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        if torch.is_tensor(start):  # the static decode path: write slot `start` (1,), return the whole cache,
            self.k[:, :, start] = k  # the same shapes at every step (the caller's mask hides unused slots)
            self.v[:, :, start] = v
            return self.k, self.v
        # write positions [start, start + T) and return everything cached so far
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, args.hidden_size, bias=bias)
        self.kv_cache = None  # set by Transformer.setup_cache for generation

    def forward(self, x, cos, sin, mask, cache_start=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_start, k, v)  # (B, n_kv, S, hd)
        g = self.n_head // self.n_kv
        if torch.is_tensor(cache_start) and g > 1:  # static decode, T = 1: the g query heads of a kv head as g
            # queries of that head, so SDPA's masked kernels serve GQA without copying the cache g times
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, g, self.head_dim), k, v, attn_mask=mask)
            return self.o_proj(y.reshape(B, 1, -1))  # (B, n_kv, g, hd) is (B, n_head, 1, hd) in memory
        # grouped-query attention: each kv head serves n_head / n_kv query heads, without copying k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


def make_mask(valid, q_idx, k_idx, window=None):
    """(B, 1, T, S) boolean mask: causal, no padded keys, within the sliding window.
    valid: (B, S) real (non-pad) keys; q_idx (T,) / k_idx (S,) absolute slots in the sequence."""
    allowed = k_idx[None, :] <= q_idx[:, None]  # (T, S)
    if window is not None:
        allowed = allowed & (q_idx[:, None] - k_idx[None, :] < window)
    allowed = allowed[None] & valid[:, None, :]  # (B, T, S)
    # a padded query row would have no key at all (NaN in softmax): let it see its own slot
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]
    return allowed[:, None]


class Transformer(nn.Module):
    def __init__(self, args, config=None):
        super().__init__()
        self.args, self.config = args, config or {}
        self.model = nn.Module()  # HF nests the decoder under "model."
        self.model.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.model.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.model.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.gradient_checkpointing = False
        self.static_kv, self.compiled_step = None, None  # generate(decode="static" | "compiled"), kept between calls

    def init_weights(self):
        # a fresh model (pretraining from scratch): normal(0, initializer_range) as HF, norms at 1
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.args.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def rope(self, positions, dtype):
        # positions (B, T) -> cos, sin (B, 1, T, head_dim), computed in fp32 then cast (as HF)
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, targets=None, attention_mask=None):
        """Logits (B, T, vocab); with targets (B, T) (-100: no loss) the SUM of the cross-entropy instead,
        computed without ever holding the logits (lm_loss)."""
        B, T = input_ids.shape
        idx = torch.arange(T, device=input_ids.device)
        if attention_mask is None:
            positions = idx.expand(B, T)
            # right padding needs no mask: real tokens never look ahead at the pads
            mask = None if self.args.sliding_window is None or T <= self.args.sliding_window else \
                make_mask(torch.ones(B, T, dtype=torch.bool, device=idx.device), idx, idx, self.args.sliding_window)
        else:
            valid = attention_mask.bool()
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
            mask = make_mask(valid, idx, idx, self.args.sliding_window)
        if targets is None:
            return self.run(input_ids, positions, mask)
        if type(self.lm_head) is not nn.Linear:  # an adapter on the head (a LoRA target): the plain way
            logits = self.run(input_ids, positions, mask)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        h = self.run(input_ids, positions, mask, head=False)  # (B, T, dim), normalised
        return lm_loss(h.flatten(0, 1), self.lm_head.weight, targets.flatten())

    def run(self, input_ids, positions, mask, cache_start=0, last_only=False, head=True):
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, cache_start, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_start)
        if last_only:  # generation needs the last position only: skip lm_head over the whole prompt
            x = x[:, -1:]
        x = self.model.norm(x)
        return self.lm_head(x) if head else x

    # -------------------------------------------------------------------------
    # generation with a KV cache

    def setup_cache(self, batch, max_len):
        p = self.lm_head.weight
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = None if batch == 0 else KVCache(batch, a.n_kv, max_len, a.head_dim, p.dtype, p.device)

    def static_cache(self, batch, max_len):
        """gpt-fast's static cache: preallocated, kept between generate calls and reused while it holds `batch` rows
        and `max_len` slots (eval.py's batches come longest first), so every decode step and call has the same
        shapes and a compiled step is traced once. static_cache(0, 0) frees it. -> (rows, slots) it holds."""
        p, c = self.lm_head.weight, self.static_kv
        if batch == 0 or c is None or c[0].k.shape[0] < batch or c[0].k.shape[2] < max_len or c[0].k.dtype != p.dtype \
                or c[0].k.device != p.device:
            self.static_kv = None  # free the old one before allocating
            if batch == 0:
                return 0, 0
            max_len = -(-max_len // 256) * 256  # nearby lengths share one cache, and one compiled step
            self.static_kv = [KVCache(batch, layer.self_attn.n_kv, max_len, layer.self_attn.head_dim, p.dtype, p.device)
                              for layer in self.model.layers]
            for cache in self.static_kv:  # CUDA graphs write into these in place, never copy them in
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        return self.static_kv[0].k.shape[0], self.static_kv[0].k.shape[2]

    def decode_step(self, tok, slot, positions, valid):
        """One token per row through the static cache: tok (B, 1) at cache slot `slot` (1,); positions and valid
        (B, S) cover the whole cache. Fixed shapes at every step -> the next token's logits (B, vocab), fp32."""
        k_idx = torch.arange(valid.shape[1], device=valid.device)
        mask = make_mask(valid, slot, k_idx, self.args.sliding_window)  # (B, 1, 1, S): slots after `slot` hidden
        return self.run(tok, positions.index_select(1, slot), mask, cache_start=slot, last_only=True)[:, -1].float()

    def compiled_decode_step(self):
        # CUDA graphs on CUDA ("reduce-overhead": one launch per token); fullgraph: a graph break is an error
        if self.compiled_step is None:
            mode = "reduce-overhead" if self.lm_head.weight.is_cuda else None
            self.compiled_step = torch.compile(self.decode_step, mode=mode, fullgraph=True, dynamic=False)
        return self.compiled_step

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, seed=None, num_beams=1,
                 on_token=None, decode="cache"):
        """prompts: lists of token ids (any lengths). Returns the new ids of each, without the stop id.
        on_token(ids), if given, sees each step's new ids (B,) as they come (streaming; not with beams); True from
        it stops early. decode: "cache" (a KV cache sliced to the tokens so far), "static" (gpt-fast: a preallocated
        cache over the whole length, kept between calls, attention masked over unused slots: the same shapes at
        every step) or "compiled" (static, the one-token step under torch.compile). Beams always run the "cache" way."""
        if num_beams > 1:
            return self.beam_search(prompts, max_new_tokens, num_beams, stop_ids)
        if decode not in ("cache", "static", "compiled"):
            raise ValueError(f"decode={decode!r}: expected cache, static or compiled")
        dev = self.lm_head.weight.device
        stop = torch.tensor(sorted(set(stop_ids if stop_ids is not None else self.eos_ids())), device=dev)
        B, L = len(prompts), max(len(p) for p in prompts)
        static = decode != "cache"
        R, S = self.static_cache(B, L + max_new_tokens) if static else (B, L + max_new_tokens)  # R >= B rows
        tokens = torch.zeros(R, L, dtype=torch.long, device=dev)
        valid = torch.ones(R, S, dtype=torch.bool, device=dev)  # left padding is invalid, all the rest valid
        for i, p in enumerate(prompts):
            tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, :L - len(p)] = False
        tokens[B:], valid[B:] = tokens[0], valid[0]  # a larger static cache's spare rows: row 0 again, ignored
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (R, S)
        slots = torch.arange(S, device=dev)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        was_training = self.training
        self.eval()
        if static:
            step = self.compiled_decode_step() if decode == "compiled" else self.decode_step
            for layer, cache in zip(self.model.layers, self.static_kv):
                layer.self_attn.kv_cache = cache
        else:
            self.setup_cache(B, S)
        out = torch.empty(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        try:
            start, cur = 0, tokens
            for _ in range(max_new_tokens):
                if static and start > 0:  # one token per row; the prompt (start 0) runs as on the "cache" way
                    if decode == "compiled":  # CUDA graphs may now reuse the last step's output memory
                        torch.compiler.cudagraph_mark_step_begin()
                    logits = step(cur, torch.full((1,), start, device=dev), positions, valid)
                else:
                    q = slots[start:start + cur.shape[1]]
                    mask = make_mask(valid[:, :start + cur.shape[1]], q, slots[:start + cur.shape[1]], self.args.sliding_window)
                    logits = self.run(cur, positions[:, q], mask, cache_start=start, last_only=True)[:, -1].float()
                nxt = sample(logits[:B], temperature, top_p, gen)
                done |= torch.isin(nxt, stop)
                out = torch.cat([out, nxt[:, None]], dim=1)
                stop_now = on_token is not None and on_token(nxt)
                if done.all() or stop_now:
                    break
                start, cur = start + cur.shape[1], F.pad(nxt, (0, R - B))[:, None]
        finally:
            self.setup_cache(0, 0)
            self.train(was_training)
        stops, result = set(stop.tolist()), []
        for row in out.tolist():  # cut each row at its first stop id
            result.append(next((row[:j] for j, t in enumerate(row) if t in stops), row))
        return result

    @torch.no_grad()
    def beam_search(self, prompts, max_new_tokens, num_beams, stop_ids=None, length_penalty=1.0, early_stopping=False):
        """transformers' beam search, step for step (LLM-Adapters' commonsense evaluation: 4 beams, its default
        length_penalty 1.0 and early_stopping False). Returns the best finished hypothesis of each prompt."""
        dev, nb = self.lm_head.weight.device, num_beams
        stop = torch.tensor(sorted(set(stop_ids if stop_ids is not None else self.eos_ids())), dtype=torch.long,
                            device=dev)
        B, L = len(prompts), max(len(p) for p in prompts)
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        S, K = L + max_new_tokens, max(2, 1 + len(stop)) * nb  # K candidates: enough to refill nb beams if some end
        tokens = torch.zeros(B * nb, L, dtype=torch.long, device=dev)  # row b * nb + j: beam j of prompt b
        valid = torch.ones(B * nb, S, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            tokens[i * nb:(i + 1) * nb, L - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i * nb:(i + 1) * nb, :L - len(p)] = False
        positions, slots = (valid.long().cumsum(-1) - 1).clamp(min=0), torch.arange(S, device=dev)
        run_seqs = torch.zeros(B, nb, 0, dtype=torch.long, device=dev)  # (B, nb, t) the running beams' new tokens
        run_scores = torch.zeros(B, nb, device=dev)
        run_scores[:, 1:] = -1e9  # the beams start identical: expand the first only
        fin_seqs = torch.zeros(B, nb, max_new_tokens, dtype=torch.long, device=dev)  # the nb best finished
        fin_scores, is_fin = torch.full((B, nb), -1e9, device=dev), torch.zeros(B, nb, dtype=torch.bool, device=dev)
        improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)  # could a running beam still beat a finished one
        top_nb = torch.arange(K, device=dev) < nb
        was_training = self.training
        self.eval()
        self.setup_cache(B * nb, S)
        try:
            start, cur = 0, tokens
            for t in range(max_new_tokens):  # t tokens generated so far
                end = start + cur.shape[1]
                mask = make_mask(valid[:, :end], slots[start:end], slots[:end], self.args.sliding_window)
                logits = self.run(cur, positions[:, start:end], mask, cache_start=start, last_only=True)[:, -1].float()
                logp = F.log_softmax(logits, dim=-1).view(B, nb, -1) + run_scores[:, :, None]  # (B, nb, V)
                top, idx = logp.view(B, -1).topk(K)  # (B, K): the best continuations over all beams
                src, tok = idx // logp.shape[-1], idx % logp.shape[-1]
                cand = torch.cat([run_seqs.gather(1, src[:, :, None].expand(-1, -1, t)), tok[:, :, None]], -1)
                ends = torch.isin(tok, stop) | (t + 1 == max_new_tokens)  # (B, K)
                # the nb best candidates that go on
                live = top + ends.float() * -1e9
                keep = live.topk(nb).indices  # (B, nb)
                run_seqs, run_scores = cand.gather(1, keep[:, :, None].expand(-1, -1, t + 1)), live.gather(1, keep)
                beam_src = src.gather(1, keep)
                # those among the top nb that ended join the finished ones, scored by sum log p / length ** penalty
                score = top / (t + 1) ** length_penalty
                score = score + (is_fin.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
                score = score + (~improvable).float() * -1e9 + (~(ends & top_nb)) * -1e9
                merged = torch.cat([fin_scores, score], 1)
                best = merged.topk(nb).indices
                fin_seqs = torch.cat([fin_seqs, F.pad(cand, (0, max_new_tokens - t - 1))], 1).gather(
                    1, best[:, :, None].expand(-1, -1, max_new_tokens))
                fin_scores, is_fin = merged.gather(1, best), torch.cat([is_fin, ends & top_nb], 1).gather(1, best)
                # transformers' stopping heuristic: the best running beam scored at the current length
                best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else t + 1
                worst = torch.where(is_fin, fin_scores.min(1, keepdim=True).values, -1e9)
                improvable &= (run_scores[:, :1] / best_len ** length_penalty > worst).any(-1, keepdim=True)
                if not improvable.any() or (is_fin.all() and early_stopping is True) or ends.all():
                    break
                order = (beam_src + torch.arange(B, device=dev)[:, None] * nb).view(-1)
                for layer in self.model.layers:  # each beam continues from its source beam's cache
                    c = layer.self_attn.kv_cache
                    c.k[:, :, :end], c.v[:, :, :end] = c.k[order, :, :end], c.v[order, :, :end]
                start, cur = end, run_seqs[:, :, -1].reshape(B * nb, 1)
        finally:
            self.setup_cache(0, 0)
            self.train(was_training)
        stops = set(stop.tolist())
        return [next((row[:j] for j, t in enumerate(row) if t in stops), row) for row in fin_seqs[:, 0].tolist()]

    def eos_ids(self):
        eos = self.config.get("eos_token_id", 2)
        return eos if isinstance(eos, list) else [eos]

    # -------------------------------------------------------------------------
    # loading and saving HF checkpoints

    @classmethod
    def from_config(cls, config, device="cpu", dtype=torch.float32):
        """A fresh, randomly initialised model from a config dict (or a config.json path)."""
        if isinstance(config, str):
            with open(config) as f:
                config = json.load(f)
        args = ModelArgs.from_config(config)
        with torch.device(device):
            model = cls(args, config)
        model.init_weights()
        model = model.to(dtype)
        model.inv_freq = rope_inv_freq(args).to(device)  # .to(bf16) rounded it: keep RoPE's frequencies fp32
        return model

    @classmethod
    def from_pretrained(cls, checkpoint_dir, device="cpu", dtype=torch.float32):
        config = load_config(checkpoint_dir)
        args = ModelArgs.from_config(config, os.path.join(checkpoint_dir, "config.json"))
        with torch.device("meta"):  # no random weights allocated first
            model = cls(args, config)
        state = load_checkpoint_tensors(checkpoint_dir)
        expected = {k: v for k, v in model.state_dict().items()}
        if args.tie_word_embeddings:
            expected.pop("lm_head.weight")
            state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        if missing or unexpected:
            raise CheckpointError(f"{checkpoint_dir}: tensors do not match the config: missing {missing[:8]}"
                                  f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                                  f"{'...' if len(unexpected) > 8 else ''}")
        for k, v in expected.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{checkpoint_dir}: tensor {k} has shape {tuple(state[k].shape)}, "
                                      f"the config needs {tuple(v.shape)}")
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)  # strictness checked above (tied head)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(args).to(device)
        return model.eval()

    def save_pretrained(self, out_dir, dtype=None):
        """config.json + model.safetensors, the layout transformers and from_pretrained read."""
        os.makedirs(out_dir, exist_ok=True)
        state = self.state_dict()
        if self.args.tie_word_embeddings:
            state.pop("lm_head.weight")
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        save_safetensors(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        config = dict(self.config)
        config["dtype"] = str(dtype or self.lm_head.weight.dtype).removeprefix("torch.")
        tmp = os.path.join(out_dir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, "config.json"))



def load_checkpoint_tensors(checkpoint_dir):
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single = os.path.join(checkpoint_dir, "model.safetensors")
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_safetensors(single)
    if not os.path.isfile(index):
        raise CheckpointError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors checkpoints are read)")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e})") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_safetensors(os.path.join(checkpoint_dir, shard))
        state.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
    return state


class ChunkedLMLoss(torch.autograd.Function):
    """sum_t cross_entropy(h_t W^T, y_t) over the tokens with y_t != -100, a chunk of tokens at a time.
    The (tokens, vocab) logits, their fp32 copy and their gradient never exist in full (at vocab 128k,
    8k tokens: 2 + 4 + 4 GiB); the gradients are computed chunk by chunk in the forward (softmax - onehot),
    so nothing is recomputed in the backward. Numerics follow lm_head + F.cross_entropy: logits in the
    compute dtype (autocast's), softmax in fp32, the logits' gradient cast back before the matmuls."""

    @staticmethod
    def forward(ctx, h, w, y, chunk):  # h (N, dim), w (vocab, dim), y (N,)
        need_h, need_w = ctx.needs_input_grad[:2]
        ctx.w_dtype = w.dtype
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, len(h), chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            logits = F.linear(hc, w)  # (c, vocab)
            low, z = logits.dtype, logits.float()
            del logits  # in place from here on: one fp32 (c, vocab) buffer and its low-precision copy at most
            lse = torch.logsumexp(z, dim=-1)
            keep = yc != -100
            yk = torch.where(keep, yc, 0)
            total += ((lse - z.gather(1, yk[:, None])[:, 0]) * keep).sum()
            if need_h or need_w:
                g = z.sub_(lse[:, None]).exp_()  # d loss / d logits = softmax - onehot, rows without a target 0
                g[torch.arange(len(yc), device=g.device), yk] -= 1
                g = g.mul_(keep[:, None]).to(low)
                if need_h:
                    grad_h[i:i + chunk] = (g @ w.to(g.dtype)).to(h.dtype)
                if need_w:
                    grad_w += (g.t() @ hc.to(g.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None, None, None)


def lm_loss(h, w, y, max_elems=2**25):
    """Summed next-token loss of hidden states h (N, dim) under the head w (vocab, dim): ChunkedLMLoss with
    chunks of about max_elems logits (128 MiB in fp32: 256 tokens at vocab 128k, all of a small batch)."""
    return ChunkedLMLoss.apply(h, w, y, max(1, max_elems // w.shape[0]))


def sample(logits, temperature, top_p, generator=None):
    """logits (B, V) -> next ids (B,): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
