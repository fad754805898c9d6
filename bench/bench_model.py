"""
model.py against transformers on CPU: checkpoint load time and peak RSS, batched greedy generation,
and KV cache on vs off. Each load runs in a fresh process so peak RSS is its own.

    python bench/bench_model.py                  # ~1.1B Llama (TinyLlama shape), bf16 checkpoint
    python bench/bench_model.py --small          # a ~100M model, for a quick look
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4, vocab_size=32000)
SMALL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000)


def make_checkpoint(path, shape):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048))
    hf = hf.to_empty(device="cpu").to(torch.bfloat16)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hf.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in hf.parameters())


def load_child(which, path):
    """Run in a subprocess: load, report seconds and peak RSS above the state after imports."""
    import transformers  # noqa: F401  (imported by both, so the baseline is the same)
    import model  # noqa: F401
    from meter import peak_rss_gib  # VmHWM: ru_maxrss would carry the parent's peak (it built the checkpoint)
    base = peak_rss_gib() * 2**30
    t = time.perf_counter()
    if which == "ours":
        from model import Transformer
        m = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    else:
        from transformers import LlamaForCausalLM
        m = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    # touch every weight so lazily mapped pages count (a forward would do the same)
    s = sum(float(p.sum()) for p in m.parameters())
    dt = time.perf_counter() - t
    rss = peak_rss_gib() * 2**30 - base
    print(json.dumps({"s": dt, "rss": rss, "chk": s}))


def run_load(which, path):
    out = subprocess.run([sys.executable, __file__, "--child", which, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_generate(path, batch, new_tokens, prompt_len=(20, 60)):
    from transformers import LlamaForCausalLM
    from generate import generate
    from model import Transformer
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (int(torch.randint(*prompt_len, (1,), generator=g)),), generator=g).tolist()
               for _ in range(batch)]
    L = max(map(len, prompts))
    ids, mask = torch.zeros(batch, L, dtype=torch.long), torch.zeros(batch, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    generate(ours, prompts, 2, stop_ids=[])  # warm both up (first-touch allocations, thread pools)
    with torch.no_grad():
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    a = generate(ours, prompts, new_tokens, stop_ids=[])
    t_ours = time.perf_counter() - t
    with torch.no_grad():
        t = time.perf_counter()
        b = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, eos_token_id=None, pad_token_id=0)[:, L:].tolist()
        t_hf = time.perf_counter() - t
    return t_ours, t_hf, a == b, ours, prompts


def no_cache_generate(model, prompts, new_tokens):
    # the same greedy decoding, recomputing the whole sequence every step (what the cache saves)
    seqs = [list(p) for p in prompts]
    for _ in range(new_tokens):
        L = max(map(len, seqs))
        ids, mask = torch.zeros(len(seqs), L, dtype=torch.long), torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s):], mask[i, L - len(s):] = torch.tensor(s), 1
        with torch.no_grad():
            nxt = model(ids, attention_mask=mask)[:, -1].argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(t)
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def main():
    small = "--small" in sys.argv
    shape = SMALL if small else BIG
    with tempfile.TemporaryDirectory() as d:
        nbytes = make_checkpoint(d, shape)
        print(f"checkpoint: {nbytes / 2**30:.2f} GiB of bf16 weights ({nbytes // 2 / 1e9:.2f}B params)")
        ours, hf = run_load("ours", d), run_load("hf", d)
        print(f"load: ours {ours['s']:.2f} s, transformers {hf['s']:.2f} s, "
              f"ratio {ours['s'] / hf['s']:.2f} (aim <= 0.5)")
        print(f"peak RSS (above the imports): ours {ours['rss'] / 2**30:.2f} GiB = "
              f"{ours['rss'] / nbytes:.2f}x the weights (aim <= 1.2); "
              f"transformers {hf['rss'] / 2**30:.2f} GiB = {hf['rss'] / nbytes:.2f}x")
        t_ours, t_hf, same, model, prompts = bench_generate(d, 16, 64)
        print(f"generate, batch 16, 64 new tokens, fp32: ours {t_ours:.2f} s, transformers {t_hf:.2f} s, "
              f"ratio {t_ours / t_hf:.2f} (aim <= 0.5), tokens identical: {same}")
    # KV cache on vs off at 128 new tokens, on a small model (without the cache it is quadratic)
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, SMALL)
        from generate import generate
        from model import Transformer
        m = Transformer.from_pretrained(d)
        prompts = prompts[:4]
        t = time.perf_counter()
        a = generate(m, prompts, 128, stop_ids=[])
        t_on = time.perf_counter() - t
        t = time.perf_counter()
        b = no_cache_generate(m, prompts, 128)
        t_off = time.perf_counter() - t
        print(f"KV cache, batch 4, 128 new tokens, ~100M model: on {t_on:.2f} s, off {t_off:.2f} s, "
              f"speed-up {t_off / t_on:.1f}x (aim >= 3), tokens identical: {a == b}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        load_child(sys.argv[2], sys.argv[3])
    else:
        main()
