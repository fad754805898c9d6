"""
A LLaMA / Mistral model in plain PyTorch that loads Hugging Face checkpoints directly.

    model = Transformer.from_pretrained("path/to/Llama-2-7b-hf", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids)                       # (B, T, vocab)
    loss_sum = model(input_ids, targets=targets)    # summed over targets != -100, no full logits held

Module and parameter names are the HF ones (model.layers.0.self_attn.q_proj.weight, ...), so a
checkpoint loads with no mapping table and LoRA targets are the usual q_proj ... down_proj.
Weights are read by safetensors_io.py (memory-mapped, no copy where possible); generation
(KV caches, sampling, beam search, the compiled decode step) is in generate.py.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# re-exported: the rest of the repo imports these from model
from safetensors_io import CheckpointError, load_checkpoint_tensors, load_safetensors, save_safetensors  # noqa: F401


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
    rms_norm_eps: float = 1e-6  # what transformers reads for llama and mistral when config.json omits it
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


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, args.hidden_size, bias=bias)
        self.kv_cache = None  # generate.py's KVCache while generating: update(cache_start, k, v) -> all keys, values

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
        # generate.py's static KV cache and compiled decode step (decode="static" | "compiled"), kept between calls
        self.static_kv, self.compiled_step = None, None

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

    def attn_mask(self, valid, q_idx, k_idx):
        """(B, 1, T, S) boolean mask: causal, no padded keys, within the sliding window (Mistral).
        valid: (B, S) real (non-pad) keys; q_idx (T,) / k_idx (S,) absolute slots in the sequence."""
        window = self.args.sliding_window
        allowed = k_idx[None, :] <= q_idx[:, None]  # (T, S)
        if window is not None:
            allowed = allowed & (q_idx[:, None] - k_idx[None, :] < window)
        allowed = allowed[None] & valid[:, None, :]  # (B, T, S)
        # a padded query row would have no key at all (NaN in softmax): let it see its own slot
        allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]
        return allowed[:, None]

    def forward(self, input_ids, targets=None, attention_mask=None):
        """Logits (B, T, vocab); with targets (B, T) (-100: no loss) the SUM of the cross-entropy instead,
        computed without ever holding the logits (lm_loss)."""
        B, T = input_ids.shape
        idx = torch.arange(T, device=input_ids.device)
        if attention_mask is None:
            positions = idx.expand(B, T)
            # right padding needs no mask: real tokens never look ahead at the pads
            mask = None if self.args.sliding_window is None or T <= self.args.sliding_window else \
                self.attn_mask(torch.ones(B, T, dtype=torch.bool, device=idx.device), idx, idx)
        else:
            valid = attention_mask.bool()
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
            mask = self.attn_mask(valid, idx, idx)
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
