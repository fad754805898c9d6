"""
Evaluate a base model, a base model + LoRA adapter (ours or PEFT), or a merged checkpoint.

    python eval.py --model=ckpt/Llama-2-7b-hf --adapter=out/adapter --task=gsm8k --data=gsm8k/test.jsonl
    python eval.py --model=ckpt/merged --task=math --data=MATH_test.jsonl --limit=500 --device=cuda --dtype=bfloat16
    python eval.py --model=ckpt/merged --task=boolq --data=commonsense/boolq/test.jsonl --batch_size=32
    python eval.py --model=ckpt/merged --task=mbpp --data=mbpp_test.jsonl --timeout=10
    python eval.py --model=ckpt/merged --task=ppl --data=val.jsonl   (or a .txt file)

Tasks: gsm8k, math (MetaMath's prompt and answer rules), the eight commonsense sets in the
LLM-Adapters format (boolq piqa social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa),
humaneval and mbpp (greedy pass@1, programs run in a sandboxed subprocess), ppl.
Writes <out>/<task>_summary.json and <out>/<task>_samples.jsonl. Greedy decoding throughout.
"""
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction

# train.py's Alpaca template; LLM-Adapters' commonsense prompts add a newline after "### Response:"
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
METAMATH = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step.")
METAMATH_STOPS = ["Instruction:", "Instruction", "Response:", "Response"]
ALPACA_STOPS = ["### Instruction", "### Input", "### Response"]
# LLM-Adapters' answer patterns; the first one found in the output is the prediction
COMMONSENSE = {"boolq": r"true|false", "piqa": r"solution1|solution2", "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
               "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5", "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
               "openbookqa": r"answer1|answer2|answer3|answer4|answer5", "hellaswag": r"ending1|ending2|ending3|ending4",
               "winogrande": r"option1|option2"}
MAX_NEW = {"gsm8k": 1024, "math": 2048, "humaneval": 512, "mbpp": 512, **{k: 32 for k in COMMONSENSE}}
TASKS = ["gsm8k", "math", *COMMONSENSE, "humaneval", "mbpp", "ppl"]


class EvalError(ValueError):  # bad input: reported as one line, no traceback, exit code 1
    pass


class UsageError(EvalError):  # bad options: exit code 2
    pass


# -----------------------------------------------------------------------------
# GSM8K: the first number after the last "The answer is: ", compared by value

NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+)(?:/\d+)?")


def to_fraction(s):
    num, _, den = s.replace(",", "").partition("/")
    return Fraction(num) / Fraction(den) if den and Fraction(den) != 0 else (None if den else Fraction(num))


def extract_gsm8k(output):
    if "The answer is: " not in output:
        return None
    m = NUMBER.search(output.split("The answer is: ")[-1])
    return m.group(0) if m else None


def gsm8k_correct(pred, gold):
    # exact value comparison (MetaMath rounds the prediction to an int; we do not: 17.5 != 18)
    value = to_fraction(pred) if pred is not None else None
    return value is not None and value == to_fraction(gold)


# -----------------------------------------------------------------------------
# MATH: strict string match after MetaMath's (Hendrycks') normalisation, then a lenient sympy check

def last_boxed(text):
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if there is none."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = text.find("{", i)
    if text.startswith("\\boxed ", i):  # "\boxed 5"
        return text[i + 7:].split("$")[0].strip()
    depth = 0
    for k in range(j, len(text)) if j >= 0 else ():
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


def extract_math(output):
    if "The answer is: " not in output:
        return None
    ans = output.split("The answer is: ")[-1].split(".\n")[0].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def normalize_math(s):
    for a, b in [("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                 ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")]:
        s = s.replace(a, b)
    s = s.split("\\text{ ")[0]  # units on the right: "5 \text{ cm}" -> "5 "
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:  # "x = 5" -> " 5"
        s = s.split("=")[1]
    s = re.sub(r"\\sqrt([^{\\])", r"\\sqrt{\1}", s).replace(" ", "")
    s = re.sub(r"\\frac([^{\\])([^{\\])", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac([^{\\])\{", r"\\frac{\1}{", s)  # \frac1{72} -> \frac{1}{72}
    if s == "0.5":  # MetaMath's one decimal rule; 0.25 vs \frac14 is left to the lenient score
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?(?:0|[1-9]\d*))/(0|[1-9]\d*)", s)
    return "\\frac{%s}{%s}" % m.groups() if m else s


def to_sympy(s):
    # refuse huge powers and factorials before sympy sees them: big-int C code ignores the alarm
    u = s.replace("**", "^")
    if len(s) > 200 or re.search(r"\^\s*[({]?\s*[-+]?\d{4}|\^\s*[({][^)}]*\^|\^\s*\d+\s*\^|\d{4}\s*!", u):
        raise ValueError("too large")
    try:
        from sympy.parsing.latex import parse_latex
        return parse_latex(s)
    except Exception:  # parse_latex needs antlr4 4.11: fall back to a small conversion
        from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication_application
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    for a, b in [("\\,", ""), ("\\ ", ""), ("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("\\infty", "oo"), ("^", "**")]:
        s = s.replace(a, b)
    for _ in range(10):  # innermost \frac and \sqrt first
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\[([^{}\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s))
    s = s.replace("{", "(").replace("}", ")")
    # parse_expr runs eval: only numbers, operators, single-letter symbols and three harmless names get there
    if not re.fullmatch(r"[A-Za-z0-9\s.+\-*/()]*", s) or any(len(w) > 1 and w not in ("sqrt", "pi", "oo")
                                                              for w in re.findall(r"[A-Za-z]+", s)):
        raise ValueError(f"not a simple expression: {s!r}")
    return parse_expr(s, transformations=standard_transformations + (implicit_multiplication_application,))


def sympy_equal(a, b):
    import sympy
    x, y = to_sympy(a), to_sympy(b)
    if x.is_number and y.is_number:
        return abs(complex(x.evalf()) - complex(y.evalf())) <= 1e-6 * max(1.0, abs(complex(y.evalf())))
    return sympy.simplify(x - y) == 0


def math_equal(pred, gold, timeout=5.0):
    """Lenient: the strict match, else item by item (tuples, intervals) sympy equality within `timeout` seconds."""
    if pred is None or normalize_math(pred) == normalize_math(gold):
        return pred is not None
    # without "$" and the thousands separators of a lone number ("1,000"; "1,2" stays a pair)
    a, b = (re.sub(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$", lambda m: m[0].replace(",", ""), normalize_math(s).replace("$", ""))
            for s in (pred, gold))
    if len(a) > 1 and a[0] + a[-1] == b[:1] + b[-1:] and a[0] in "([":  # same brackets: compare the items
        a, b = a[1:-1], b[1:-1]
    if a.count(",") != b.count(","):
        return False
    alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if alarm:  # sympy can take forever; SIGALRM stops it (between bytecodes)
        def on_alarm(*_):
            raise TimeoutError
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return all(x == y or sympy_equal(x, y) for x, y in zip(a.split(","), b.split(",")))
    except Exception:  # unparsable, too slow, or no sympy: not equal
        return False
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


# -----------------------------------------------------------------------------
# commonsense and code

def extract_commonsense(task, output):
    m = re.search(COMMONSENSE[task], output.strip())
    return m.group(0) if m else None


def extract_code(output):
    """The first ```python (or bare ```) block, unclosed blocks included; else the whole output."""
    m = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", output, re.DOTALL | re.IGNORECASE)
    return (m.group(1) if m else output).rstrip() + "\n"


# Runs in the child before the program, best effort in the spirit of HumanEval's reliability_guard: a private
# network namespace where the kernel allows one, no sockets, no writes outside the scratch dir, no new processes.
# Not a security boundary against a determined attacker; the rlimits and the timeout are the backstop.
SANDBOX = r'''
import builtins, io, os, shutil, socket, subprocess, sys, _socket
src, here = open("program.py").read(), os.path.realpath(os.getcwd())
try:  # CLONE_NEWNET as root, else inside a new user namespace (mapping our own ids) where that is allowed
    import ctypes
    libc, uid, gid = ctypes.CDLL(None, use_errno=True), os.getuid(), os.getgid()
    if libc.unshare(0x40000000) != 0 and libc.unshare(0x10000000 | 0x40000000) == 0:
        for f, v in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{f}", "w") as fh: fh.write(v)
except Exception: pass
def inside(p):
    p = os.path.realpath(os.path.join(here, os.fsdecode(p))) if not isinstance(p, int) else here
    return p == here or p.startswith(here + os.sep)
def deny(*a, **k): raise PermissionError("not allowed in the sandbox")
def paths_inside(f):
    def g(*a, **k):
        if any(isinstance(p, (str, bytes, os.PathLike)) and not inside(p) for p in a + tuple(k.values())):
            raise PermissionError(f"{a}: outside the sandbox")
        return f(*a, **k)
    return g
def writes_inside(f, writing):
    return lambda p, mode="r", *a, **k: deny() if writing(mode) and not inside(p) else f(p, mode, *a, **k)
builtins.open = io.open = writes_inside(open, lambda m: any(c in m for c in "wax+"))
os.open = writes_inside(os.open, lambda fl: fl & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
for n in "remove unlink rmdir mkdir makedirs removedirs rename renames replace truncate chmod chown symlink link utime mkfifo mknod".split():
    setattr(os, n, paths_inside(getattr(os, n)))
for n in ("system popen kill killpg fork forkpty execv execve execvp execvpe execl execle execlp execlpe spawnv spawnve "
          "spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe posix_spawn posix_spawnp chdir fchdir chroot setuid").split():
    setattr(os, n, deny)
shutil.rmtree = shutil.move = shutil.chown = deny
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = deny
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _socket.socket = deny
sys.modules.update(ctypes=None, _ctypes=None)
exec(compile(src, "program.py", "exec"), {"__name__": "__main__"})
'''


def run_program(program, timeout=10.0, memory_mb=2048):
    """Runs `program` in a fresh scratch dir in a limited child process -> {"passed", "status", "log"}."""
    def limits():  # in the child, before exec: address space, cpu seconds, file size, no core dumps
        for r, v in [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, int(timeout) + 1),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)]:
            resource.setrlimit(r, (v, v))
    scratch = tempfile.mkdtemp(prefix="eval_exec_")
    try:
        with open(os.path.join(scratch, "program.py"), "w") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        with open(os.path.join(scratch, "log.txt"), "wb+") as log:  # a file, not a pipe: bounded by RLIMIT_FSIZE
            proc = subprocess.Popen([sys.executable, "-I", "-c", SANDBOX], cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, preexec_fn=limits, start_new_session=True)
            try:
                status = "passed" if proc.wait(timeout=timeout) == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its whole session: the program and anything it started
                proc.wait()
                status = "timeout"
            log.seek(max(0, log.seek(0, 2) - 2000))
            tail = log.read().decode(errors="replace")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"passed": status == "passed", "status": status, "log": tail}


# -----------------------------------------------------------------------------
# data and scoring

def read_jsonl(path):
    if not os.path.isfile(path):
        raise EvalError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            if row is not None and not isinstance(row, dict):
                raise EvalError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows += [(i, row)] if row is not None else []
    if not rows:
        raise EvalError(f"{path}: no examples")
    return rows


def field(row, path, line, *keys):  # the first of `keys` the row has
    for k in keys:
        if k in row:
            return row[k]
    raise EvalError(f"{path}:{line}: missing field {' or '.join(map(repr, keys))}")


def alpaca(row, path, line):
    inst, inp = field(row, path, line, "instruction"), row.get("input")
    return ALPACA_INPUT.format(instruction=inst, input=inp) if inp else ALPACA.format(instruction=inst)


def make_example(task, row, path, line):
    """One jsonl row -> {"prompt", "gold", ...} for a generation task."""
    if task == "gsm8k":
        gold = str(field(row, path, line, "answer")).split("####")[-1].strip()
        if "####" not in str(row["answer"]) or not NUMBER.fullmatch(gold):
            raise EvalError(f"{path}:{line}: 'answer' does not end with '#### <number>'")
        return {"prompt": METAMATH.format(instruction=field(row, path, line, "question")), "gold": gold}
    if task == "math":
        gold = row["answer"] if "answer" in row else last_boxed(str(field(row, path, line, "solution")))
        if gold is None:
            raise EvalError(f"{path}:{line}: no \\boxed{{...}} answer in 'solution'")
        return {"prompt": METAMATH.format(instruction=field(row, path, line, "problem")), "gold": str(gold)}
    if task in COMMONSENSE:  # LLM-Adapters put a newline after "### Response:"
        return {"prompt": alpaca(row, path, line) + "\n", "gold": str(field(row, path, line, "answer")).strip()}
    if task == "humaneval":  # WizardCoder's instruction for HumanEval
        ex = {k: field(row, path, line, k) for k in ("task_id", "prompt", "test", "entry_point")}
        return {**ex, "gold": ex["task_id"], "code_prompt": ex["prompt"],
                "prompt": ALPACA.format(instruction="Create a Python script for this problem:\n" + ex["prompt"])}
    tests = field(row, path, line, "test_list")
    inst = (f"You are an expert Python programmer, and here is your task: {field(row, path, line, 'text')} "
            "Your code should pass these tests:\n\n" + "\n".join(tests))
    return {"prompt": ALPACA.format(instruction=inst), "gold": field(row, path, line, "task_id"), "test_list": tests,
            "test_setup_code": row.get("test_setup_code") or ""}


def score(task, output, ex, timeout=10.0):
    """One generated output -> {"extracted", "correct", "valid", ...}."""
    if task == "gsm8k":
        pred = extract_gsm8k(output)
        return {"extracted": pred, "correct": gsm8k_correct(pred, ex["gold"]), "valid": pred is not None}
    if task == "math":
        pred = extract_math(output)
        return {"extracted": pred, "correct": pred is not None and normalize_math(pred) == normalize_math(ex["gold"]),
                "correct_lenient": math_equal(pred, ex["gold"]), "valid": pred is not None}
    if task in COMMONSENSE:
        pred = extract_commonsense(task, output)
        return {"extracted": pred, "correct": pred is not None and pred == ex["gold"], "valid": pred is not None}
    code = extract_code(output)
    if task == "humaneval":  # the prompt's imports and signature; a complete def in the output redefines it
        program = f"{ex['code_prompt']}{code}\n\n{ex['test']}\n\ncheck({ex['entry_point']})\n"
    else:
        program = "\n".join([code, ex.get("test_setup_code") or "", *ex["test_list"]]) + "\n"
    result = run_program(program, timeout=timeout)
    return {"extracted": code, "correct": result["passed"], "valid": bool(code.strip()), "status": result["status"]}


# -----------------------------------------------------------------------------
# generation and perplexity

def progress(done, total, t0, what):
    elapsed = time.time() - t0
    print(f"\r{what} {done}/{total}, {elapsed:.0f}s, ETA {elapsed / done * (total - done):.0f}s",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def generate_all(model, tok, prompts, max_new_tokens, batch_size, stops):
    """Greedy outputs, decoded and cut at the first stop string, in the order of `prompts`."""
    ids = [tok.encode(p, bos=True) for p in prompts]
    # longest first: similar lengths share a batch (little padding) and running out of memory shows at once
    order, outputs, t0 = sorted(range(len(ids)), key=lambda i: -len(ids[i])), [None] * len(ids), time.time()
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        new = model.generate([ids[i] for i in batch], max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids)
        for i, toks in zip(batch, new):
            text = tok.decode(toks)
            outputs[i] = text[:min([j for j in map(text.find, stops) if j >= 0], default=len(text))]
        progress(min(b + batch_size, len(order)), len(order), t0, "generating")
    return outputs


def ppl_sequences(tok, path, ctx):
    """(inputs, targets) token lists: instruction data is scored on the response only (as train.py trains),
    a .txt file on every token, in windows of the model's context."""
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise EvalError(f"{path}: file not found")
        with open(path, encoding="utf-8") as f:
            ids = tok.encode(f.read(), bos=True)
        if len(ids) < 2:
            raise EvalError(f"{path}: no text")
        # windows of ctx + 1 tokens overlapping by one: every token after the first is predicted once
        return [(ids[i:i + ctx], ids[i + 1:i + ctx + 1]) for i in range(0, len(ids) - 1, ctx)]
    seqs = []
    for line, row in read_jsonl(path):
        if "query" in row or "question" in row:  # MetaMathQA, GSM8K
            prompt = ALPACA.format(instruction=field(row, path, line, "query", "question"))
            response = field(row, path, line, "response", "answer")
        else:
            prompt, response = alpaca(row, path, line), field(row, path, line, "output")
        p, r = tok.encode(prompt, bos=True), tok.encode(str(response)) + [tok.eos_id]
        ids = (p + r)[:ctx + 1]
        seqs.append((ids[:-1], ([-100] * (len(p) - 1) + r)[:len(ids) - 1]))
    return seqs


def perplexity(model, seqs, batch_size, device):
    import torch
    import torch.nn.functional as F
    total, count, t0 = 0.0, 0, time.time()
    for b in range(0, len(seqs), batch_size):
        batch = seqs[b:b + batch_size]
        T = max(len(x) for x, _ in batch)  # right padding needs no attention mask
        x = torch.tensor([x + [0] * (T - len(x)) for x, _ in batch], device=device)
        y = torch.tensor([y + [-100] * (T - len(y)) for _, y in batch], device=device)
        with torch.no_grad():
            logits = model(x)  # (B, T, vocab)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
        progress(min(b + batch_size, len(seqs)), len(seqs), t0, "scoring")
    if count == 0:
        raise EvalError("no target tokens to score")
    return total / count, count


# -----------------------------------------------------------------------------

def main(argv):
    from configurator import ConfigError, parse_args
    defaults = dict(model="", adapter="", task="", data="", limit=0, batch_size=8, max_new_tokens=0, out="out/eval",
                    dtype="float32", device="auto", timeout=10.0)
    try:
        cfg = parse_args(argv, defaults)
    except ConfigError as e:
        raise UsageError(e) from None
    checks = {"task": (cfg["task"] in TASKS, "one of " + ", ".join(TASKS)), "model": (cfg["model"], "a checkpoint dir"),
              "data": (cfg["data"], "a .jsonl (or .txt for ppl) file"), "batch_size": (cfg["batch_size"] > 0, "> 0"),
              "dtype": (cfg["dtype"] in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
              "device": (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg["device"]), "auto, cpu or cuda"),
              "limit": (cfg["limit"] >= 0, ">= 0, 0 = all"), "max_new_tokens": (cfg["max_new_tokens"] >= 0, ">= 0")}
    for key, (ok, want) in checks.items():
        if not ok:
            raise UsageError(f"--{key}={cfg[key]!r}: expected {want}")
    task, limit = cfg["task"], cfg["limit"] or None
    for what in ("model", "adapter"):
        if cfg[what] and not os.path.isdir(cfg[what]):
            raise EvalError(f"{cfg[what]}: {what} directory not found")
    # read the data before the slow imports and the model load: bad input fails fast
    examples = None if task == "ppl" else [make_example(task, row, cfg["data"], i) for i, row in read_jsonl(cfg["data"])][:limit]

    import torch
    import model as model_lib
    device = cfg["device"] if cfg["device"] != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    try:
        model = model_lib.Transformer.from_pretrained(cfg["model"], device=device, dtype=getattr(torch, cfg["dtype"]))
        if cfg["adapter"]:
            import beamlora
            beamlora.load_adapter(model, cfg["adapter"])
            beamlora.merge_lora(model)  # W0 + scaling * B A, computed in fp32: generation at the base's speed
            model.to(device)
        from tokenizer import Tokenizer
        tok = Tokenizer(cfg["model"])
    except (ValueError, OSError, KeyError) as e:  # model.CheckpointError is a ValueError
        raise EvalError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None
    model.eval()
    print(f"loaded {cfg['model']} {cfg['adapter']} in {time.time() - t0:.1f}s", file=sys.stderr)

    settings = {k: cfg[k] for k in ("model", "adapter", "data", "limit", "batch_size", "dtype", "timeout")}
    settings["device"], t0, samples = device, time.time(), []
    if task == "ppl":
        seqs = ppl_sequences(tok, cfg["data"], min(model.args.max_position_embeddings, 4096))[:limit]
        loss, n_tokens = perplexity(model, seqs, cfg["batch_size"], device)
        summary = {"task": task, "loss": loss, "ppl": math.exp(loss), "tokens": n_tokens, "sequences": len(seqs)}
    else:
        settings["max_new_tokens"] = max_new = cfg["max_new_tokens"] or MAX_NEW[task]
        stops = METAMATH_STOPS if task in ("gsm8k", "math") else ALPACA_STOPS
        outputs = generate_all(model, tok, [ex["prompt"] for ex in examples], max_new, cfg["batch_size"], stops)
        for i, (ex, out) in enumerate(zip(examples, outputs)):
            samples.append({"prompt": ex["prompt"], "output": out, "gold": ex["gold"], **score(task, out, ex, cfg["timeout"])})
            if task in ("humaneval", "mbpp"):
                progress(i + 1, len(examples), t0, "running programs")
        n, correct, invalid = len(samples), sum(s["correct"] for s in samples), sum(not s["valid"] for s in samples)
        summary = {"task": task, "accuracy": correct / n, "invalid_rate": invalid / n, "n": n, "correct": correct,
                   "invalid": invalid}
        if task == "math":  # strict (MetaMath's string match) first, lenient (sympy) second
            summary["accuracy_lenient"] = sum(s["correct_lenient"] for s in samples) / n
        if task in ("humaneval", "mbpp"):
            summary["pass@1"] = summary["accuracy"]
            summary["status"] = {k: sum(s["status"] == k for s in samples) for k in ("passed", "failed", "timeout")}
    summary.update(seconds=round(time.time() - t0, 2), settings=settings)
    os.makedirs(cfg["out"], exist_ok=True)
    with open(os.path.join(cfg["out"], f"{task}_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(cfg["out"], f"{task}_samples.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))
    return summary


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)
