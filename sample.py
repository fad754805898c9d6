"""
Try a model on a few prompts: a base checkpoint, a base + LoRA adapter (ours or PEFT's), or a merged
checkpoint, loaded by the same code as eval.py. The text is printed as it is generated.

    python sample.py --model=out/demo/base/model --adapter=out/demo/beamlora/adapter --template=metamath \\
        --prompt="Tom has 3 apples. He buys 4 more apples. How many apples does Tom have now?"
    python sample.py --model=checkpoints/Llama-2-7b-hf --prompt="The capital of France is" --prompt="1, 2, 3,"
    python sample.py --model=out/run/merged --template=alpaca --prompt_file=questions.txt --temperature=0.7
    python sample.py --model=checkpoints/Llama-2-7b-hf --adapter=out/run/adapter --template=alpaca --interactive
    python sample.py --model=checkpoints/Llama-2-7b-hf --device=cuda --dtype=bfloat16 --compile --interactive
    python sample.py --model=models/smollm2/SmolLM2-135M-Instruct --template=chat --prompt="What is 17 + 25?"

--template wraps each prompt in a training template, with eval.py's strings: alpaca (train.py's prompt) or
metamath (MetaMath's, as eval.py's gsm8k and math tasks prompt: "... ### Response: Let's think step by
step."); the output then ends at the template's stop strings, as eval.py cuts it. --temperature=0 (the
default) is greedy, as eval.py; above 0 it samples, with --top_p, from --seed (the same for every prompt).
"""
import os
import sys

import eval as ev
from configurator import ConfigError, cli, parse_args
from tokenizer import CHAT_FORMATS, encode_chat

# -----------------------------------------------------------------------------
# defaults, overridden by --key=value (see configurator.py)
# the model, loaded as eval.py loads it
model = ""  # an HF checkpoint dir (config.json, safetensors, tokenizer.model): a base or a merged model
adapter = ""  # a PEFT-format LoRA adapter dir (ours or PEFT's), merged into the model
dtype = "float32"  # float32 | bfloat16 | float16
device = "auto"  # auto (cuda if there is one) | cpu | cuda | cuda:N
# the prompts
prompt = ""  # a prompt; give --prompt=... several times for several
prompt_file = ""  # prompts: a .txt file, one a line, or .jsonl with instruction (+ input), query, question or prompt
interactive = False  # then read prompts from the terminal, one a line, until an empty line or Ctrl-D
template = "none"  # none (the prompt as it is) | alpaca | metamath | chat (the tokenizer's chat template)
system = ""  # --template=chat: a system turn before each prompt ("": none, or the template's default where it has
    # one, as SmolLM2's)
# decoding
max_new_tokens = 256  # at most this many new tokens per prompt
temperature = 0.0  # 0: greedy; else sample from softmax(logits / temperature)
top_p = 1.0  # sample from the fewest most likely tokens that hold this much probability
seed = 1337  # the sampling seed, the same for each prompt: an output does not depend on the prompts before it
compile = False  # a static KV cache and the decode step under torch.compile (CUDA graphs on CUDA; the first
    # prompt pays the compile)
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
# -----------------------------------------------------------------------------

STOPS = {"none": [], "alpaca": ev.ALPACA_STOPS, "metamath": ev.METAMATH_STOPS, "chat": []}  # chat: its end-of-turn


def prompt_ids(tok, cfg, instruction, inp=""):
    """A prompt's ids: in the tokenizer's chat template (--template=chat), else the templated text after bos."""
    if cfg["template"] == "chat":
        system = [{"role": "system", "content": cfg["system"]}] if cfg["system"] else []
        return encode_chat(tok, system + [{"role": "user", "content": apply_template("none", instruction, inp)}])
    return tok.encode(apply_template(cfg["template"], instruction, inp), bos=True)


def apply_template(template, instruction, inp=""):
    if template == "alpaca":
        return ev.ALPACA_INPUT.format(instruction=instruction, input=inp) if inp else \
            ev.ALPACA.format(instruction=instruction)
    if template == "metamath":
        return ev.METAMATH.format(instruction=instruction)
    return instruction + (f"\n\n{inp}" if inp else "")


def read_prompts(path):
    """-> [(instruction, input)] from a .jsonl file (eval.py's reader) or a text file, one prompt a line."""
    if path.endswith(".jsonl"):
        return [(str(ev.field(row, path, i, "instruction", "query", "question", "prompt")), str(row.get("input") or ""))
                for i, row in ev.read_jsonl(path)]
    if not os.path.isfile(path):
        raise ev.EvalError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        prompts = [(line.rstrip("\n"), "") for line in f if line.strip()]
    if not prompts:
        raise ev.EvalError(f"{path}: no prompts")
    return prompts


def cut(text, stops):
    """`text` up to the first stop string, as eval.py cuts it; and whether one was found."""
    j = min([j for j in map(text.find, stops) if j >= 0], default=-1)
    return (text[:j], True) if j >= 0 else (text, False)


def unsettled(text, stops):
    """How many characters at the end of `text` may still change with the next token: a partial UTF-8
    character (decoded as U+FFFD) or the beginning of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    text = text[:len(text) - n]
    return n + max((j for s in stops for j in range(1, len(s)) if text.endswith(s[:j])), default=0)


def generate(model, tok, prompt, cfg, out=None):
    """One prompt's ids (prompt_ids) -> its output, written to `out` (stdout) as the tokens come."""
    from generate import generate as generate_ids  # here: importing sample.py loads no torch
    stops, new, shown, out = STOPS[cfg["template"]], [], 0, out or sys.stdout

    def on_token(nxt):  # (1,) new id
        nonlocal shown
        new.append(int(nxt[0]))
        text, stopped = cut(tok.decode([t for t in new if t not in tok.stop_ids]), stops)
        settled = len(text) if stopped else len(text) - unsettled(text, stops)
        if settled > shown:
            out.write(text[shown:settled])
            out.flush()
            shown = settled
        return stopped  # a stop string: no need to generate further

    ids = generate_ids(model, [prompt], cfg["max_new_tokens"], temperature=cfg["temperature"],
                       top_p=cfg["top_p"], stop_ids=tok.stop_ids, seed=cfg["seed"], on_token=on_token,
                       decode="compiled" if cfg["compile"] else "cache")[0]
    output = cut(tok.decode(ids), stops)[0]
    out.write(output[shown:] + "\n")
    out.flush()
    return output


def check(cfg):
    checks = {"template": (cfg["template"] in STOPS, "one of " + ", ".join(STOPS)),
              "model": (cfg["model"], "a checkpoint dir"), "max_new_tokens": (cfg["max_new_tokens"] > 0, "> 0"),
              "temperature": (cfg["temperature"] >= 0, ">= 0, 0 = greedy"),
              "top_p": (0 < cfg["top_p"] <= 1, "in (0, 1]"),
              "dtype": (cfg["dtype"] in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
              "system": (not cfg["system"] or cfg["template"] == "chat", "--template=chat with it")}
    for key, (ok, want) in checks.items():
        if not ok:
            raise ev.UsageError(f"--{key}={cfg[key]!r}: expected {want}")


def main(argv, out=None):
    """Returns the outputs, in the order of the prompts; prints them to `out` (stdout) as they come."""
    out = out or sys.stdout
    try:
        cfg = parse_args(argv, DEFAULTS, __file__)
    except ConfigError as e:
        raise ev.UsageError(e) from None
    check(cfg)
    prompts = [(a.partition("=")[2], "") for a in argv if a.startswith("--prompt=")]  # every --prompt, in order
    prompts += read_prompts(cfg["prompt_file"]) if cfg["prompt_file"] else []
    if not prompts and not cfg["interactive"]:
        raise ev.UsageError("nothing to do: give --prompt=..., --prompt_file=... or --interactive")
    model, tok, _ = ev.load_model(cfg["model"], cfg["adapter"], cfg["device"], cfg["dtype"])
    if cfg["template"] == "chat" and tok.chat_format not in CHAT_FORMATS:
        raise ev.UsageError(f"--template=chat: {tok.path} has no chat template (ChatML, Llama-3's or Mistral's "
                            "[INST]); use --template=alpaca, metamath or none")
    outputs = []
    for instruction, inp in prompts:
        out.write(f"{instruction}\n" + (f"{inp}\n" if inp else "") + "---\n")
        outputs.append(generate(model, tok, prompt_ids(tok, cfg, instruction, inp), cfg, out))
        out.write("\n")
    while cfg["interactive"]:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        outputs.append(generate(model, tok, prompt_ids(tok, cfg, line), cfg, out))
    return outputs


if __name__ == "__main__":
    # bad options (exit 2) or bad input (exit 1): one line, no traceback
    cli(main, errors=(ev.EvalError, OSError), code=lambda e: 2 if isinstance(e, ev.UsageError) else 1)
