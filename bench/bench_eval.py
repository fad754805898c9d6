"""
GSM8K-style evaluation wall time on CPU: eval.py's batched greedy generation with our model against
transformers' generate (batched, left padding, do_sample=False) on the same small random Llama, the same
MetaMath prompts and the same number of new tokens. Checks that both give the same tokens.

    python bench/bench_eval.py                                  # 32 prompts, batch 8, 128 new tokens
    python bench/bench_eval.py --n=64 --batch_size=16 --max_new_tokens=256

Prompts are GSM8K test questions (../shared/data/gsm8k) in eval.py's MetaMath template, tokenized with the
Mistral tokenizer in ../shared/assets where present, else random token ids of similar lengths.
A random model never says EOS, so every sequence runs to max_new_tokens: pure decode speed.
"""
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=32768, max_position_embeddings=2048)


def prompts_for(n):
    import eval as ev
    questions = []
    gsm8k = os.path.join(SHARED, "data", "gsm8k", "test.jsonl")
    if os.path.isfile(gsm8k):
        with open(gsm8k) as f:
            questions = [json.loads(line)["question"] for line, _ in zip(f, range(n))]
    sp_path = os.path.join(SHARED, "assets", "mistral-7b-v0.3", "tokenizer.model")
    if questions and os.path.isfile(sp_path):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=sp_path)
        return ([[sp.bos_id()] + sp.encode(ev.METAMATH.format(instruction=q)) for q in questions],
                "gsm8k + mistral tokenizer")
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, SHAPE["vocab_size"], (int(torch.randint(80, 200, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)], "random token ids"


def main(n=32, batch_size=8, max_new_tokens=128):
    from transformers import LlamaConfig, LlamaForCausalLM
    import eval as ev
    from model import Transformer
    prompts, source = prompts_for(n)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d)

    class Tok:  # the two calls generate_all makes, on ids that are already tokens
        stop_ids = {2}
        encode = staticmethod(lambda ids, bos: ids)
        decode = staticmethod(lambda ids: " ".join(map(str, ids)))

    t = time.perf_counter()
    a = ev.generate_all(ours, Tok, prompts, max_new_tokens, batch_size, stops=[])
    a = [[int(x) for x in text.split()] for text in a]
    t_ours = time.perf_counter() - t

    # transformers, batched the same way (longest first), left padded
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    b, t = [None] * n, time.perf_counter()
    for s in range(0, n, batch_size):
        batch = order[s:s + batch_size]
        L = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([[0] * (L - len(prompts[i])) + prompts[i] for i in batch])
        mask = torch.tensor([[0] * (L - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              eos_token_id=2, pad_token_id=0)
        for i, row in zip(batch, out[:, L:].tolist()):
            b[i] = row[:row.index(2)] if 2 in row else row
    t_hf = time.perf_counter() - t

    same = sum(x == y for x, y in zip(a, b))
    tokens = sum(map(len, a))
    print(f"{n} prompts ({source}, {min(map(len, prompts))}-{max(map(len, prompts))} tokens), batch {batch_size}, "
          f"{max_new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"model {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M")
    print(f"ours (eval.generate_all)   {t_ours:7.2f} s  {tokens / t_ours:7.1f} tok/s")
    print(f"transformers generate      {t_hf:7.2f} s  {sum(map(len, b)) / t_hf:7.1f} tok/s")
    print(f"ratio ours / transformers  {t_ours / t_hf:7.2f}   identical outputs: {same}/{n}")


if __name__ == "__main__":
    kw = {k: int(v) for k, v in (a[2:].split("=") for a in sys.argv[1:])}
    main(**kw)
