"""
Generation for model.py's Transformer, gpt-fast style: functions that take the model.

    from generate import generate, beam_search
    new_tokens = generate(model, [[1, 415, 2936], [1, 22557]], max_new_tokens=64)  # greedy, KV cache
    new_tokens = generate(model, prompts, 64, temperature=0.7, top_p=0.9, seed=0)   # nucleus sampling
    new_tokens = generate(model, prompts, 64, decode="compiled")  # static KV cache, compiled step (CUDA graphs)
    new_tokens = beam_search(model, prompts, 32, num_beams=4)     # transformers' beam search

The model's attention layers hold the cache (Attention.kv_cache, set here); the static cache and its compiled
step are kept on the model (model.static_kv, model.compiled_step) so later calls reuse them. Everything runs
through the model given (model.run, model.attn_mask): nothing is imported from model.py.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# KV caches


class KVCache(nn.Module):
    """One attention layer's keys and values, (batch, n_kv, max_len, head_dim), written in place as tokens come."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

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


def setup_cache(model, batch, max_len):
    """A fresh cache of `batch` rows and `max_len` slots in every attention layer; setup_cache(model, 0, 0) drops it."""
    p = model.lm_head.weight
    for layer in model.model.layers:
        a = layer.self_attn
        a.kv_cache = None if batch == 0 else KVCache(batch, a.n_kv, max_len, a.head_dim, p.dtype, p.device)


def static_cache(model, batch, max_len):
    """gpt-fast's static cache: preallocated, kept between generate calls and reused while it holds `batch` rows
    and `max_len` slots (eval.py's batches come longest first), so every decode step and call has the same
    shapes and a compiled step is traced once. static_cache(model, 0, 0) frees it. -> (rows, slots) it holds."""
    p, c = model.lm_head.weight, model.static_kv
    if batch == 0 or c is None or c[0].k.shape[0] < batch or c[0].k.shape[2] < max_len or c[0].k.dtype != p.dtype \
            or c[0].k.device != p.device:
        model.static_kv = None  # free the old one before allocating
        if batch == 0:
            return 0, 0
        max_len = -(-max_len // 256) * 256  # nearby lengths share one cache, and one compiled step
        model.static_kv = [KVCache(batch, layer.self_attn.n_kv, max_len, layer.self_attn.head_dim, p.dtype, p.device)
                           for layer in model.model.layers]
        for cache in model.static_kv:  # CUDA graphs write into these in place, never copy them in
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
    return model.static_kv[0].k.shape[0], model.static_kv[0].k.shape[2]


# -----------------------------------------------------------------------------
# the static cache's one-token step, plain or compiled


def decode_step(model, tok, slot, positions, valid):
    """One token per row through the static cache: tok (B, 1) at cache slot `slot` (1,); positions and valid
    (B, S) cover the whole cache. Fixed shapes at every step -> the next token's logits (B, vocab), fp32."""
    k_idx = torch.arange(valid.shape[1], device=valid.device)
    mask = model.attn_mask(valid, slot, k_idx)  # (B, 1, 1, S): slots after `slot` hidden
    return model.run(tok, positions.index_select(1, slot), mask, cache_start=slot, last_only=True)[:, -1].float()


def compiled_decode_step(model):
    # CUDA graphs on CUDA ("reduce-overhead": one launch per token); fullgraph: a graph break is an error.
    # Kept on the model: the next call reuses the trace (same static cache shapes).
    if model.compiled_step is None:
        mode = "reduce-overhead" if model.lm_head.weight.is_cuda else None
        model.compiled_step = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return model.compiled_step


# -----------------------------------------------------------------------------
# choosing the next token, and when to stop


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


def eos_ids(model):
    """The checkpoint's eos_token_id (config.json: one id or a list) as a list: the default stop ids."""
    eos = model.config.get("eos_token_id", 2)
    return eos if isinstance(eos, list) else [eos]


# -----------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, seed=None, num_beams=1,
             on_token=None, decode="cache"):
    """prompts: lists of token ids (any lengths). Returns the new ids of each, without the stop id.
    on_token(ids), if given, sees each step's new ids (B,) as they come (streaming; not with beams); True from
    it stops early. decode: "cache" (a KV cache sliced to the tokens so far), "static" (gpt-fast: a preallocated
    cache over the whole length, kept between calls, attention masked over unused slots: the same shapes at
    every step) or "compiled" (static, the one-token step under torch.compile). Beams always run the "cache" way."""
    if num_beams > 1:
        return beam_search(model, prompts, max_new_tokens, num_beams, stop_ids)
    if decode not in ("cache", "static", "compiled"):
        raise ValueError(f"decode={decode!r}: expected cache, static or compiled")
    dev = model.lm_head.weight.device
    stop = torch.tensor(sorted(set(stop_ids if stop_ids is not None else eos_ids(model))), device=dev)
    B, L = len(prompts), max(len(p) for p in prompts)
    static = decode != "cache"
    R, S = static_cache(model, B, L + max_new_tokens) if static else (B, L + max_new_tokens)  # R >= B rows
    tokens = torch.zeros(R, L, dtype=torch.long, device=dev)
    valid = torch.ones(R, S, dtype=torch.bool, device=dev)  # left padding is invalid, all the rest valid
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, :L - len(p)] = False
    tokens[B:], valid[B:] = tokens[0], valid[0]  # a larger static cache's spare rows: row 0 again, ignored
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (R, S)
    slots = torch.arange(S, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    if static:
        step = compiled_decode_step(model) if decode == "compiled" else decode_step
        for layer, cache in zip(model.model.layers, model.static_kv):
            layer.self_attn.kv_cache = cache
    else:
        setup_cache(model, B, S)
    out = torch.empty(B, 0, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    try:
        start, cur = 0, tokens
        for _ in range(max_new_tokens):
            if static and start > 0:  # one token per row; the prompt (start 0) runs as on the "cache" way
                if decode == "compiled":  # CUDA graphs may now reuse the last step's output memory
                    torch.compiler.cudagraph_mark_step_begin()
                logits = step(model, cur, torch.full((1,), start, device=dev), positions, valid)
            else:
                end = start + cur.shape[1]
                q = slots[start:end]
                mask = model.attn_mask(valid[:, :end], q, slots[:end])
                logits = model.run(cur, positions[:, q], mask, cache_start=start, last_only=True)[:, -1].float()
            nxt = sample(logits[:B], temperature, top_p, gen)
            done |= torch.isin(nxt, stop)
            out = torch.cat([out, nxt[:, None]], dim=1)
            stop_now = on_token is not None and on_token(nxt)
            if done.all() or stop_now:
                break
            start, cur = start + cur.shape[1], F.pad(nxt, (0, R - B))[:, None]
    finally:
        setup_cache(model, 0, 0)  # the static cache stays on model.static_kv; the layers let go of it
        model.train(was_training)
    stops, result = set(stop.tolist()), []
    for row in out.tolist():  # cut each row at its first stop id
        result.append(next((row[:j] for j, t in enumerate(row) if t in stops), row))
    return result


@torch.no_grad()
def beam_search(model, prompts, max_new_tokens, num_beams, stop_ids=None, length_penalty=1.0, early_stopping=False):
    """transformers' beam search, step for step (LLM-Adapters' commonsense evaluation: 4 beams, its default
    length_penalty 1.0 and early_stopping False). Returns the best finished hypothesis of each prompt."""
    dev, nb = model.lm_head.weight.device, num_beams
    stop = torch.tensor(sorted(set(stop_ids if stop_ids is not None else eos_ids(model))), dtype=torch.long,
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
    was_training = model.training
    model.eval()
    setup_cache(model, B * nb, S)
    try:
        start, cur = 0, tokens
        for t in range(max_new_tokens):  # t tokens generated so far
            end = start + cur.shape[1]
            mask = model.attn_mask(valid[:, :end], slots[start:end], slots[:end])
            logits = model.run(cur, positions[:, start:end], mask, cache_start=start, last_only=True)[:, -1].float()
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
            for layer in model.model.layers:  # each beam continues from its source beam's cache
                c = layer.self_attn.kv_cache
                c.k[:, :, :end], c.v[:, :, :end] = c.k[order, :, :end], c.v[order, :, :end]
            start, cur = end, run_seqs[:, :, -1].reshape(B * nb, 1)
    finally:
        setup_cache(model, 0, 0)
        model.train(was_training)
    stops = set(stop.tolist())
    return [next((row[:j] for j, t in enumerate(row) if t in stops), row) for row in fin_seqs[:, 0].tolist()]
