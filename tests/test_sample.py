# sample.py on a tiny random Llama with the demo tokenizer: greedy equals generate.generate, a seeded sample
# repeats, an adapter (ours) gives eval.py's outputs and so does the merged checkpoint, a PEFT adapter gives
# transformers + PEFT's, the text streamed is the text returned, and bad input is one line with no traceback.
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import peft_io

import beamlora
import eval as ev
import sample
from conftest import ROOT
from generate import generate
from model import Transformer
from tokenizer import Tokenizer

PROMPTS = ["Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?",
           "Anna has 12 books. She gives 5 books to Ben. How many books does Anna have left?"]


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """Our LoRA on every linear with random A and B, exported in PEFT format."""
    torch.manual_seed(1)
    m = Transformer.from_pretrained(base)
    beamlora.apply_lora(m, list(beamlora.TARGETS), r=4, alpha=8.0)
    with torch.no_grad():
        for mod in beamlora.lora_modules(m).values():
            mod.lora_B.normal_(std=0.5)
    path = str(tmp_path_factory.mktemp("adapter"))
    peft_io.export_peft(m, path, base)
    return path


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_greedy_equals_generate_and_streams_it(base):
    out = io.StringIO()
    got = sample.main([f"--model={base}", f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}", "--max_new_tokens=20",
                       "--device=cpu"], out)
    model, tok = Transformer.from_pretrained(base), Tokenizer(base)
    want = [tok.decode(generate(model, [tok.encode(p, bos=True)], 20, stop_ids=tok.stop_ids)[0]) for p in PROMPTS]
    assert got == want and all(w.strip() for w in want)
    # what was printed, token by token, is the prompt, then exactly the output
    assert out.getvalue() == "".join(f"{p}\n---\n{w}\n\n" for p, w in zip(PROMPTS, want))


def test_seeded_sampling_repeats(base):
    args = [f"--model={base}", f"--prompt={PROMPTS[0]}", "--max_new_tokens=24", "--temperature=1.0", "--top_p=0.9"]
    a, b = (sample.main(args + ["--seed=7"], io.StringIO()) for _ in range(2))
    other = sample.main(args + ["--seed=8"], io.StringIO())
    model, tok = Transformer.from_pretrained(base), Tokenizer(base)
    ids = generate(model, [tok.encode(PROMPTS[0], bos=True)], 24, temperature=1.0, top_p=0.9, seed=7,
                   stop_ids=tok.stop_ids)[0]
    assert a == b == [tok.decode(ids)] and other != a


def test_adapter_equals_eval(base, demo_data, adapter, tmp_path):
    # eval.py one prompt at a time (batch_size=1): batching pads prompts, which may move a near tie
    rows = [json.loads(line) for line in open(os.path.join(demo_data, "test.jsonl"))][:3]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.main([f"--model={base}", f"--adapter={adapter}", "--task=gsm8k", f"--data={data}", f"--out={tmp_path / 'ev'}",
             "--max_new_tokens=16", "--batch_size=1", "--device=cpu"])
    want = [json.loads(line)["output"] for line in open(tmp_path / "ev" / "gsm8k_samples.jsonl")]
    got = sample.main([f"--model={base}", f"--adapter={adapter}", "--template=metamath", f"--prompt_file={data}",
                       "--max_new_tokens=16"], io.StringIO())
    assert got == want
    # a merged checkpoint (train.py --save_merged writes the same) gives the same outputs
    peft_io.merge_lora(peft_io.load_adapter(Transformer.from_pretrained(base), adapter)).save_pretrained(
        str(tmp_path / "merged"))
    shutil.copy(os.path.join(base, "tokenizer.model"), tmp_path / "merged")
    assert sample.main([f"--model={tmp_path / 'merged'}", "--template=metamath", f"--prompt_file={data}",
                        "--max_new_tokens=16"], io.StringIO()) == got
    base_only = sample.main([f"--model={base}", "--template=metamath", f"--prompt_file={data}",
                             "--max_new_tokens=16"], io.StringIO())
    assert base_only != got  # the adapter changes the outputs


def test_peft_adapter_equals_transformers_peft(base, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(hf, cfg).save_pretrained(str(tmp_path / "peft"))  # random A and B: B is not zero
    tok = Tokenizer(base)
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                         str(tmp_path / "peft"))
    ids = torch.tensor([tok.encode(PROMPTS[1], bos=True)])
    new = ref.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                              eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in tok.stop_ids), len(new))]
    got = sample.main([f"--model={base}", f"--adapter={tmp_path / 'peft'}", f"--prompt={PROMPTS[1]}",
                       "--max_new_tokens=16"], io.StringIO())
    assert got == [tok.decode(new)]


def test_interactive(base, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PROMPTS[0]}\n{PROMPTS[1]}\n\nnever read\n"))
    out = io.StringIO()
    got = sample.main([f"--model={base}", "--interactive", "--max_new_tokens=12"], out)
    assert got == sample.main([f"--model={base}", f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}",
                               "--max_new_tokens=12"], io.StringIO())
    assert all(g in out.getvalue() for g in got)


def test_stop_strings_cut_the_stream(base, monkeypatch):
    # a stop string ends the output where eval.py cuts it, and nothing after it is printed
    model, tok = Transformer.from_pretrained(base), Tokenizer(base)
    text = tok.decode(generate(model, [tok.encode(ev.ALPACA.format(instruction=PROMPTS[0]), bos=True)], 20,
                               stop_ids=tok.stop_ids)[0])
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    monkeypatch.setitem(sample.STOPS, "alpaca", [stop])
    out = io.StringIO()
    got = sample.main([f"--model={base}", "--template=alpaca", f"--prompt={PROMPTS[0]}", "--max_new_tokens=20"], out)
    assert got == [text[:text.find(stop)]] and out.getvalue() == f"{PROMPTS[0]}\n---\n{got[0]}\n\n"


def test_generate_callback_sees_each_token_and_can_stop(base):
    model = Transformer.from_pretrained(base)
    seen = []
    full = generate(model, [[1, 5, 6, 7]], 10, stop_ids=[], on_token=lambda t: seen.append(t.tolist()))[0]
    assert seen == [[t] for t in full] and len(full) == 10
    short = generate(model, [[1, 5, 6, 7]], 10, stop_ids=[], on_token=lambda t: t.item() == full[3])
    assert short == [full[:4]]


def test_unsettled_tail():
    stops = ["### Instruction", "### Response"]
    assert sample.unsettled("The answer is 5.\n###", stops) == 3
    assert sample.unsettled("The answer is 5.\n### Res", stops) == 7
    assert sample.unsettled("caf\ufffd", stops) == 1
    assert sample.unsettled("plain", stops) == 0


def one_line_error(p, code, *words):
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_input_is_one_line(base, tmp_path):
    # the command line: bad input exits 1, bad options 2, each with one line on stderr and no traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(run(f"--model={tmp_path / 'nope'}", "--prompt=hi"), 1, "nope", "model directory not found")
    one_line_error(run(f"--model={base}", f"--adapter={empty}", "--prompt=hi"), 1, "adapter_config.json")
    one_line_error(run(f"--model={base}"), 2, "--prompt")


@pytest.mark.parametrize("args, usage, words", [
    (["--adapter={tmp}/nope", "--prompt=hi"], False, ["adapter directory not found"]),
    (["--prompt_file={tmp}/p.txt"], False, ["p.txt", "not found"]),
    (["--prompt_file={tmp}/p.jsonl"], False, ["p.jsonl", "not found"]),
    (["--prompt_file={tmp}/bad.jsonl"], False, ["bad.jsonl:2", "missing field"]),
    (["--prompt=hi", "--template=chatml"], True, ["--template", "alpaca"]),
    (["--prompt=hi", "--top_p=0"], True, ["--top_p"]),
    (["--prompt=hi", "--temperature=-1"], True, ["--temperature"]),
    (["--prompt=hi", "--bogus=1"], True, ["--bogus", "--prompt_file"]),
    (["--prompt=hi", "--model={tmp}"], False, ["{tmp}"]),  # a directory with no weights
])
def test_bad_input(base, tmp_path, args, usage, words):
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n{"answer": 1}\n')
    with pytest.raises(ev.EvalError) as e:
        sample.main([f"--model={base}"] + [a.format(tmp=tmp_path) for a in args], io.StringIO())
    assert isinstance(e.value, ev.UsageError) == usage
    assert all(w.format(tmp=tmp_path) in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_compile_samples_the_same(base, monkeypatch):
    # --compile: the static KV cache and the compiled step (traced by aot_eager here; inductor and CUDA graphs on
    # a GPU: tests/test_cuda.py), the same text streamed as without it
    import functools
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    args = [f"--model={base}", f"--prompt={PROMPTS[0]}", f"--prompt={PROMPTS[1]}", "--max_new_tokens=16",
            "--device=cpu"]
    outs = [io.StringIO(), io.StringIO()]
    got = [sample.main(args + extra, out) for extra, out in zip(([], ["--compile"]), outs)]
    assert got[0] == got[1] and all(got[0]) and outs[0].getvalue() == outs[1].getvalue()
