"""
Evaluate a base model, a base model + LoRA adapter (ours or PEFT), or a merged checkpoint.

    python eval.py --model=ckpt/Llama-2-7b-hf --adapter=out/adapter --task=gsm8k --data=gsm8k/test.jsonl
    python eval.py --model=ckpt/merged --task=math --data=MATH_test.jsonl --limit=500 --device=cuda --dtype=bfloat16
    python eval.py --model=ckpt/merged --task=gsm8k --data=gsm8k/test.jsonl --device=cuda --dtype=bfloat16 --compile
    python eval.py --model=ckpt/merged --task=boolq --data=commonsense/boolq/test.jsonl --batch_size=32
    python eval.py --model=ckpt/merged --task=mbpp --data=mbpp_test.jsonl --timeout=10
    python eval.py --model=ckpt/merged --task=ppl --data=val.jsonl   (or a .txt file)
    python eval.py --model=models/smollm2/SmolLM2-135M-Instruct --task=rgym --data=data/reasoning_gym/test.jsonl

Tasks: gsm8k, math (MetaMath's prompt; `accuracy` is MetaMath's own decision, quirks included, beside
accuracy_strict / accuracy_lenient), the eight commonsense sets in the LLM-Adapters format (boolq piqa
social_i_qa hellaswag winogrande ARC-Easy ARC-Challenge openbookqa; generated as LLM-Adapters did: its
prompt, 4-beam search, 32 new tokens), humaneval and mbpp (greedy pass@1, programs run in sandbox.py), ppl,
rgym (data/reasoning_gym/prepare.py's problems, prompted in the model's chat template as train.py's chat data
trains; the verdict reasoning-gym's own score_answer: accuracy is its full credit, partial_credit its mean).
Writes <out>/<task>_summary.json and <out>/<task>_samples.jsonl. Greedy decoding except commonsense.
"""
import json
import math
import os
import re
import signal
import sys
import threading
import time
import unicodedata
from fractions import Fraction

import sandbox

# -----------------------------------------------------------------------------
# defaults, overridden by --key=value (see configurator.py)
model = ""  # an HF checkpoint dir (config.json, safetensors, tokenizer.model): a base or a merged model
adapter = ""  # a PEFT-format LoRA adapter dir (ours or PEFT's), merged into the model before generating
task = ""  # gsm8k | math | humaneval | mbpp | ppl | rgym | a commonsense set: boolq, piqa, ... (COMMONSENSE below)
data = ""  # the test set: .jsonl (or .txt for ppl)
limit = 0  # score only the first N examples (0: all)
batch_size = 8  # prompts generated (or sequences scored) together
max_new_tokens = 0  # 0: the task's own (MAX_NEW)
out = "out/eval"  # <task>_summary.json and <task>_samples.jsonl go here
dtype = "float32"  # float32 | bfloat16 | float16
device = "auto"  # auto (cuda if there is one) | cpu | cuda | cuda:N
timeout = 10.0  # seconds per humaneval/mbpp program
compile = False  # greedy decoding with a static KV cache and the step under torch.compile (CUDA graphs on CUDA)
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
# -----------------------------------------------------------------------------

# train.py's Alpaca template
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
METAMATH = ("Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step.")
METAMATH_STOPS = ["Instruction:", "Instruction", "Response:", "Response"]  # the BeamLoRA authors' math_infer
ALPACA_STOPS = ["### Instruction", "### Input", "### Response"]
COMMONSENSE_STOPS = ["### Response:"]
# LLM-Adapters' commonsense_evaluate.py: its f-string keeps the source's indentation (and a space after
# "request."); the answer is the decoded text between the first and a second "### Response:"
LLM_ADAPTERS = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request. \n\n                ### Instruction:\n                {instruction}\n\n"
                "                ### Response:\n                ")
# LLM-Adapters' answer patterns; the first one found in the output is the prediction
COMMONSENSE = {"boolq": r"true|false", "piqa": r"solution1|solution2",
               "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
               "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
               "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
               "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
               "hellaswag": r"ending1|ending2|ending3|ending4",
               "winogrande": r"option1|option2"}
MAX_NEW = {"gsm8k": 1024, "math": 2048, "humaneval": 512, "mbpp": 512, **{k: 32 for k in COMMONSENSE}, "rgym": 128}
NUM_BEAMS = {k: 4 for k in COMMONSENSE}  # LLM-Adapters' GenerationConfig(num_beams=4), no sampling; else greedy
TASKS = ["gsm8k", "math", *COMMONSENSE, "humaneval", "mbpp", "ppl", "rgym"]


class EvalError(ValueError):  # bad input: reported as one line, no traceback, exit code 1
    pass


class UsageError(EvalError):  # bad options: exit code 2
    pass


# -----------------------------------------------------------------------------
# GSM8K. accuracy: MetaMath's eval_gsm8k.py decision for decision (the BeamLoRA authors' gsm8k_infer.py is
# the same plus a grader, docs/EVAL.md): the first match of its regex after the last "The answer is: ",
# rounded to an integer. accuracy_strict: the first well-formed number there, compared by exact value.

MM_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")  # one separator at most: "1,450,000" reads as 1450
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+)(?:/\d+)?")  # separators in threes


def mm_is_number(s):  # MetaMath's is_number: float() parses it, or it is one numeric character
    try:
        float(s)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(s)
        return True
    except (TypeError, ValueError):
        return False


def metamath_gsm8k(output):
    """MetaMath's prediction: an int, or None (no answer)."""
    parts = output.split("The answer is: ")
    m = MM_NUMBER.search(parts[-1].strip()) if len(parts) > 1 else None
    if m is None:
        return None
    if "/" not in m.group():
        value = float(m.group().replace(",", ""))
        return None if value == math.inf else round(value)  # round() ties to even: 17.5 -> 18, 16.5 -> 16
    num, den = m.group().split("/")
    if not (mm_is_number(num) and mm_is_number(den)):
        return None  # "/4", "-/4"
    if den == "0":
        return round(float(num))  # "x/0" reads as x
    try:  # its `fraction` package gives num/den exactly; "5/00" and 400-digit numbers make it raise (the
        return round(int(num) / int(den))  # script stops): no answer here
    except (ZeroDivisionError, OverflowError):
        return None


def to_fraction(s):
    num, _, den = s.replace(",", "").partition("/")
    return Fraction(num) / Fraction(den) if den and Fraction(den) != 0 else (None if den else Fraction(num))


def extract_gsm8k(output):
    if "The answer is: " not in output:
        return None
    m = NUMBER.search(output.split("The answer is: ")[-1])
    return m.group(0) if m else None


def gsm8k_correct(pred, gold):  # strict: exact value, no rounding (17.5 != 18)
    value = to_fraction(pred) if pred is not None else None
    return value is not None and value == to_fraction(gold)


# -----------------------------------------------------------------------------
# MATH. accuracy: MetaMath's eval_math.py with its util.is_equiv, quirks included: Hendrycks' normaliser, and
# where that raises (a "/" between non-integers, "\text{ " twice, \sqrt or \frac at the end) the raw strings
# compared. accuracy_lenient: that, else sympy equivalence item by item (tuples, intervals).

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


def metamath_gold(solution):
    """MetaMath's gold: the last \\boxed{...} (\\fbox only where there is no \\boxed), else None."""
    i = solution.rfind("\\boxed")
    i = i if i >= 0 else solution.rfind("\\fbox")
    depth = 0
    for j in range(i, len(solution)) if i >= 0 else ():
        depth += {"{": 1, "}": -1}.get(solution[j], 0)
        if depth == 0 and solution[j] == "}":
            box = solution[i:j + 1]
            return box[7:-1] if box.startswith("\\boxed{") else None  # "\\fbox{..}", "\\boxed 5 ... {x}": None
    return None


def extract_math(output):
    if "The answer is: " not in output:
        return None
    ans = output.split("The answer is: ")[-1].split(".\n")[0].strip()
    return ans[:-1].strip() if ans.endswith(".") else ans


def mm_fix_sqrt(s):  # \sqrt3 -> \sqrt{3}; IndexError on a \sqrt at the end, as MetaMath's
    head, *rest = s.split("\\sqrt")
    return head + "".join("\\sqrt" + (r if r[0] == "{" else "{" + r[0] + "}" + r[1:]) for r in rest)


def mm_fix_fracs(s):  # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; IndexError on "\frac" at the end
    head, *rest = s.split("\\frac")
    for r in rest:
        if r[0] == "{":
            head += "\\frac" + r
        elif len(r) < 2:
            return s
        else:
            head += "\\frac{" + r[0] + "}" + (r[1:] if r[1] == "{" else "{" + r[1] + "}" + r[2:])
    return head


def mm_fix_a_slash_b(s):  # "3/4" -> \frac{3}{4}; ValueError when either side is not an int ("x/2")
    if s.count("/") != 1:
        return s
    a, b = (int(x) for x in s.split("/"))
    return "\\frac{%d}{%d}" % (a, b) if s == f"{a}/{b}" else s


def metamath_strip(s):
    """MetaMath's util.strip_string (Hendrycks' MATH normaliser), raising where it raises."""
    for a, b in [("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                 ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")]:
        s = s.replace(a, b)
    if "\\text{ " in s:  # units on the right: "5 \text{ cm}" -> "5 "; asserts a single "\text{ "
        s, _ = s.split("\\text{ ")
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:  # "x = 5" -> " 5"
        s = s.split("=")[1]
    s = mm_fix_fracs(mm_fix_sqrt(s).replace(" ", ""))
    return mm_fix_a_slash_b("\\frac{1}{2}" if s == "0.5" else s)


def math_official(pred, gold):  # MetaMath's is_equiv for an extracted answer
    if pred is None or gold is None:
        return False
    try:
        return metamath_strip(pred) == metamath_strip(gold)
    except Exception:
        return pred == gold


def lenient_form(s):
    try:
        return metamath_strip(s)
    except Exception:
        return s.replace(" ", "")


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
    for a, b in [("\\,", ""), ("\\ ", ""), ("\\cdot", "*"), ("\\times", "*"), ("\\pi", "pi"), ("\\infty", "oo"),
                 ("^", "**")]:
        s = s.replace(a, b)
    for _ in range(10):  # innermost \frac and \sqrt first
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
        s = re.sub(r"\\sqrt\[([^{}\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
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
    """Lenient: MetaMath's decision, else item by item (tuples, intervals) sympy equality within `timeout` seconds."""
    if pred is None or gold is None or math_official(pred, gold):
        return pred is not None and gold is not None
    # without "$" and the thousands separators of a lone number ("1,000"; "1,2" stays a pair)
    a, b = (re.sub(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$", lambda m: m[0].replace(",", ""), lenient_form(s).replace("$", ""))
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
# commonsense (LLM-Adapters' extract_answer: the first answer word in the output) and code

def extract_commonsense(task, output):
    m = re.search(COMMONSENSE[task], output.strip())
    return m.group(0) if m else None


def extract_code(output):
    """The first ```python (or bare ```) block, unclosed blocks included; else the whole output."""
    m = re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", output, re.DOTALL | re.IGNORECASE)
    return (m.group(1) if m else output).rstrip() + "\n"


# -----------------------------------------------------------------------------
# reasoning-gym (rgym): the reply's answer, then the library's own verdict on it

RG_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")  # "-7", "1,234", "3.5"; not "4" of "x4"


def extract_rgym(output, gold):
    """The answer in a reply: the last <answer>...</answer> (reasoning-gym's extract_answer), else, for a number
    gold, the last number ("67 - 74 = -7." -> "-7", "1,450" -> "1450"), else the reply's last line."""
    tagged = re.findall(r"<answer>\s?(.*?)\s?</answer>", output, re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    if RG_NUMBER.fullmatch(gold.strip()):
        numbers = RG_NUMBER.findall(output)
        return numbers[-1].replace(",", "") if numbers else None
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def import_rg():
    try:
        import reasoning_gym
    except ImportError:
        raise EvalError("--task=rgym scores with reasoning-gym's verifier: pip install reasoning-gym==0.1.25") from None
    return reasoning_gym


RG_SCORERS = {}  # dataset name -> its score_answer (a dataset object each: made once)


def rg_score(name, answer, entry):
    if name not in RG_SCORERS:
        RG_SCORERS[name] = import_rg().get_score_answer_fn(name)
    return float(RG_SCORERS[name](answer, entry))


# -----------------------------------------------------------------------------
# data and scoring

def text_lines(path):
    from dataset import read_lines  # train.py's reader (torch comes with it: loaded here, not at --help)
    return read_lines(path, EvalError)


def read_jsonl(path):
    if not os.path.isfile(path):
        raise EvalError(f"{path}: file not found")
    rows = []
    for i, line in text_lines(path):
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


def field(row, path, line, *keys, kind=str):  # the first of `keys` the row has, of type `kind`
    for k in keys:
        if k in row:
            if not isinstance(row[k], kind) or isinstance(row[k], bool):
                raise EvalError(f"{path}:{line}: field {k!r} must be {KIND_NAMES[kind]}, not {json.dumps(row[k])[:40]}")
            return row[k]
    raise EvalError(f"{path}:{line}: missing field {' or '.join(map(repr, keys))}")


ANSWER = (str, int, float)  # an answer field: a number is read as its text
KIND_NAMES = {str: "a string", ANSWER: "a string or a number", list: "a list", (str, int): "a string or an integer"}


def alpaca(row, path, line):
    inst, inp = field(row, path, line, "instruction"), row.get("input")
    return ALPACA_INPUT.format(instruction=inst, input=inp) if inp else ALPACA.format(instruction=inst)


def make_example(task, row, path, line):
    """One jsonl row -> {"prompt", "gold", ...} for a generation task."""
    if task == "gsm8k":
        gold = str(field(row, path, line, "answer", kind=ANSWER)).split("####")[-1].strip()
        if "####" not in str(row["answer"]) or not NUMBER.fullmatch(gold):
            raise EvalError(f"{path}:{line}: 'answer' does not end with '#### <number>'")
        return {"prompt": METAMATH.format(instruction=field(row, path, line, "question")), "gold": gold}
    if task == "math":
        gold = row["answer"] if "answer" in row else last_boxed(str(field(row, path, line, "solution")))
        if gold is None:
            raise EvalError(f"{path}:{line}: no \\boxed{{...}} answer in 'solution'")
        # MetaMath reads its gold from the solution itself (None where its box reader fails: never correct)
        gold_mm = metamath_gold(str(row["solution"])) if "solution" in row else str(gold)
        return {"prompt": METAMATH.format(instruction=field(row, path, line, "problem")), "gold": str(gold),
                "gold_metamath": gold_mm}
    if task in COMMONSENSE:  # the instruction only, as LLM-Adapters; its label compared as it is
        return {"prompt": LLM_ADAPTERS.format(instruction=field(row, path, line, "instruction")),
                "gold": str(field(row, path, line, "answer", kind=ANSWER))}
    if task == "rgym":  # the turns before the reply (chat_prompt renders them) and the entry the verifier reads
        messages = field(row, path, line, "messages", kind=list)
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) or not messages:
            raise EvalError(f"{path}:{line}: field 'messages' must be a list of {{role, content}} objects")
        prompt = messages[:-1] if messages[-1].get("role") == "assistant" else messages
        metadata = field(row, path, line, "metadata", kind=dict)
        if metadata.get("source_dataset") not in import_rg().factory.DATASETS:
            raise EvalError(f"{path}:{line}: 'metadata' names no reasoning-gym dataset as source_dataset "
                            f"({str(metadata.get('source_dataset'))[:40]!r}; data/reasoning_gym/prepare.py's rows do)")
        return {"prompt": prompt[-1]["content"], "messages": prompt, "gold": str(field(row, path, line, "answer")),
                "task": str(row.get("task", metadata["source_dataset"])), "metadata": metadata}
    if task == "humaneval":  # WizardCoder's instruction for HumanEval
        ex = {k: field(row, path, line, k) for k in ("task_id", "prompt", "test", "entry_point")}
        return {**ex, "gold": ex["task_id"], "code_prompt": ex["prompt"],
                "prompt": ALPACA.format(instruction="Create a Python script for this problem:\n" + ex["prompt"])}
    tests = field(row, path, line, "test_list", kind=list)
    if not all(isinstance(t, str) for t in tests):
        raise EvalError(f"{path}:{line}: field 'test_list' must be a list of strings")
    inst = (f"You are an expert Python programmer, and here is your task: {field(row, path, line, 'text')} "
            "Your code should pass these tests:\n\n" + "\n".join(tests))
    return {"prompt": ALPACA.format(instruction=inst), "gold": field(row, path, line, "task_id", kind=(str, int)),
            "test_list": tests, "test_setup_code": row.get("test_setup_code") or ""}


def score(task, output, ex, timeout=10.0):
    """One generated output -> {"extracted", "correct", "valid", ...}."""
    if task == "gsm8k":  # MetaMath compares float(prediction) with float(int(gold))
        pred, strict = metamath_gsm8k(output), extract_gsm8k(output)
        correct = pred is not None and pred == to_fraction(ex["gold"])
        correct_strict = gsm8k_correct(strict, ex["gold"])
        return {"extracted": pred, "correct": correct, "extracted_strict": strict, "correct_strict": correct_strict,
                "valid": pred is not None, "disagree": correct != correct_strict}
    if task == "math":
        pred = extract_math(output)
        correct = math_official(pred, ex.get("gold_metamath", ex["gold"]))
        lenient = correct or math_equal(pred, ex["gold"])
        return {"extracted": pred, "correct": correct, "correct_lenient": lenient, "valid": pred is not None,
                "disagree": correct != lenient}
    if task in COMMONSENSE:
        pred = extract_commonsense(task, output)
        return {"extracted": pred, "correct": pred is not None and pred == ex["gold"], "valid": pred is not None}
    if task == "rgym":  # its dataset's score_answer on what we extracted: 1.0 full credit, less partial
        pred = extract_rgym(output, ex["gold"])
        entry = {"question": ex["prompt"], "answer": ex["gold"], "metadata": ex["metadata"]}
        credit = rg_score(ex["metadata"]["source_dataset"], pred, entry)
        return {"extracted": pred, "correct": credit == 1.0, "credit": credit, "valid": pred is not None}
    code = extract_code(output)
    if task == "humaneval":  # the prompt's imports and signature; a complete def in the output redefines it
        program = f"{ex['code_prompt']}{code}\n\n{ex['test']}\n\ncheck({ex['entry_point']})\n"
    else:
        program = "\n".join([code, ex.get("test_setup_code") or "", *ex["test_list"]]) + "\n"
    result = sandbox.run(program, timeout=timeout)
    return {"extracted": code, "correct": result["passed"], "valid": bool(code.strip()), "status": result["status"]}


# -----------------------------------------------------------------------------
# generation and perplexity

def progress(done, total, t0, what):
    elapsed = time.time() - t0
    print(f"\r{what} {done}/{total}, {elapsed:.0f}s, ETA {elapsed / done * (total - done):.0f}s",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def cut(text, stops):  # up to the first stop string, as vLLM's stop= (and LLM-Adapters' split) leave it
    return text[:min([j for j in map(text.find, stops) if j >= 0], default=len(text))]


def generate_all(model, tok, prompts, max_new_tokens, batch_size, stops, num_beams=1, decode="cache"):
    """Greedy (or beam search) outputs, decoded and cut at the first stop string, in the order of `prompts`.
    decode: generate.generate's way (cache, static, compiled); beam search always runs the cache way."""
    from generate import generate  # here: importing eval.py loads no torch
    ids = [p if isinstance(p, list) else tok.encode(p, bos=True) for p in prompts]  # text, or ids (a chat prompt)
    # longest first: similar lengths share a batch (little padding) and running out of memory shows at once
    order, outputs, t0 = sorted(range(len(ids)), key=lambda i: -len(ids[i])), [None] * len(ids), time.time()
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        new = generate(model, [ids[i] for i in batch], max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids,
                       num_beams=num_beams, decode=decode)
        for i, toks in zip(batch, new):
            outputs[i] = cut(tok.decode(toks), stops)
        progress(min(b + batch_size, len(order)), len(order), t0, "generating")
    return outputs


def ppl_texts(path):
    """What a ppl task scores, read and checked before the model loads: a .txt file's text, or
    [(prompt, response)] of instruction data (scored on the response only, as train.py trains)."""
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise EvalError(f"{path}: file not found")
        text = "".join(line for _, line in text_lines(path))
        if not text.strip():
            raise EvalError(f"{path}: no text")
        return text
    texts = []
    for line, row in read_jsonl(path):
        if "query" in row or "question" in row:  # MetaMathQA, GSM8K
            prompt = ALPACA.format(instruction=field(row, path, line, "query", "question"))
            response = field(row, path, line, "response", "answer", kind=ANSWER)
        else:
            prompt, response = alpaca(row, path, line), field(row, path, line, "output", kind=ANSWER)
        texts.append((prompt, str(response)))
    return texts


def ppl_sequences(tok, texts, ctx):
    """(inputs, targets) token lists of ppl_texts, in windows of the model's context."""
    if isinstance(texts, str):
        ids = tok.encode(texts, bos=True)
        # windows of ctx + 1 tokens overlapping by one: every token after the first is predicted once
        return [(ids[i:i + ctx], ids[i + 1:i + ctx + 1]) for i in range(0, len(ids) - 1, ctx)]
    seqs = []
    for prompt, response in texts:
        p, r = tok.encode(prompt, bos=True), tok.encode(response) + [tok.eos_id]
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
# the model: eval.py and sample.py load it here

def check_dirs(model_dir, adapter):
    for what, path in (("model", model_dir), ("adapter", adapter)):
        if path and not os.path.isdir(path):
            raise EvalError(f"{path}: {what} directory not found")


def load_model(model_dir, adapter="", device="auto", dtype="float32"):
    """-> (model in eval mode with the adapter merged in, its tokenizer, the device). Errors are one-line EvalErrors."""
    check_dirs(model_dir, adapter)
    import torch
    import model as model_lib
    device = device if device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={device}: CUDA is not available here (torch {torch.__version__}); use --device=cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device={device}: there are {torch.cuda.device_count()} GPUs")
    t0 = time.time()
    try:
        from tokenizer import Tokenizer
        vocab = model_lib.ModelArgs.from_config(model_lib.load_config(model_dir),
                                                os.path.join(model_dir, "config.json")).vocab_size
        tok = Tokenizer(model_dir)  # checked against the model's config before any weight is read
        if tok.n_words > vocab:
            raise EvalError(f"{tok.path}: {tok.n_words} tokens, more than the model's vocab_size ({vocab})")
        model = model_lib.Transformer.from_pretrained(model_dir, device=device, dtype=getattr(torch, dtype))
        if adapter:
            import peft_io
            peft_io.load_adapter(model, adapter)
            peft_io.merge_lora(model)  # W0 + scaling * B A, computed in fp32: generation at the base's speed
            model.to(device)
    except (ValueError, OSError, KeyError) as e:  # model.CheckpointError is a ValueError
        raise EvalError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None
    model.eval()
    print(f"loaded {model_dir} {adapter} in {time.time() - t0:.1f}s", file=sys.stderr)
    return model, tok, device


# -----------------------------------------------------------------------------

def main(argv):
    from configurator import ConfigError, parse_args
    try:
        cfg = parse_args(argv, DEFAULTS, __file__)
    except ConfigError as e:
        raise UsageError(e) from None
    checks = {"task": (cfg["task"] in TASKS, "one of " + ", ".join(TASKS)), "model": (cfg["model"], "a checkpoint dir"),
              "data": (cfg["data"], "a .jsonl (or .txt for ppl) file"), "batch_size": (cfg["batch_size"] > 0, "> 0"),
              "dtype": (cfg["dtype"] in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
              "device": (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg["device"]), "auto, cpu or cuda"),
              "limit": (cfg["limit"] >= 0, ">= 0, 0 = all"), "max_new_tokens": (cfg["max_new_tokens"] >= 0, ">= 0"),
              "timeout": (cfg["timeout"] > 0, "> 0 seconds"), "out": (not os.path.isfile(cfg["out"]), "a directory")}
    for key, (ok, want) in checks.items():
        if not ok:
            raise UsageError(f"--{key}={cfg[key]!r}: expected {want}")
    task, limit = cfg["task"], cfg["limit"] or None
    check_dirs(cfg["model"], cfg["adapter"])
    if task == "rgym":
        import_rg()  # before the model loads
    # read the data before the slow imports and the model load: bad input fails fast
    examples = ppl_texts(cfg["data"]) if task == "ppl" else \
        [make_example(task, row, cfg["data"], i) for i, row in read_jsonl(cfg["data"])][:limit]
    # one evaluation at a time writes into --out: its lock (rundir.OutDirLock, flock: a dead holder blocks nothing),
    # taken before the model loads; a second one stops here naming the holder's pid and host. rundir loads torch,
    # which the model's load below does anyway
    from rundir import OutDirLock
    lock = OutDirLock(cfg["out"], name="eval.lock", what="--out")
    try:
        lock.acquire()
    except ConfigError as e:
        raise EvalError(str(e)) from None
    try:
        return evaluate(cfg, task, limit, examples)
    finally:
        lock.release()


def chat_prompt(tok, messages):
    """The prompt in the tokenizer's chat template (tokenizer.encode_chat), as train.py's --data_format=chat trains."""
    from tokenizer import CHAT_FORMATS, encode_chat
    if tok.chat_format not in CHAT_FORMATS:
        raise EvalError(f"{tok.path}: this task prompts in the model's chat template, and this tokenizer has none "
                        "(ChatML, Llama-3's or Mistral's [INST])")
    return encode_chat(tok, messages)


def evaluate(cfg, task, limit, examples):
    """main() once --out is this evaluation's."""
    model, tok, device = load_model(cfg["model"], cfg["adapter"], cfg["device"], cfg["dtype"])

    settings = {k: cfg[k] for k in ("model", "adapter", "data", "limit", "batch_size", "dtype", "timeout")}
    settings["device"], t0, samples = device, time.time(), []
    if task == "ppl":
        seqs = ppl_sequences(tok, examples, min(model.args.max_position_embeddings, 4096))[:limit]
        loss, n_tokens = perplexity(model, seqs, cfg["batch_size"], device)
        summary = {"task": task, "loss": loss, "ppl": math.exp(loss), "tokens": n_tokens, "sequences": len(seqs)}
    else:
        settings["max_new_tokens"] = max_new = cfg["max_new_tokens"] or MAX_NEW[task]
        settings["num_beams"] = NUM_BEAMS.get(task, 1)
        stops = {"gsm8k": METAMATH_STOPS, "math": METAMATH_STOPS, **{k: COMMONSENSE_STOPS for k in COMMONSENSE}}.get(
            task, ALPACA_STOPS)
        settings["compile"] = cfg["compile"]
        prompts = [chat_prompt(tok, ex["messages"]) if "messages" in ex else ex["prompt"] for ex in examples]
        outputs = generate_all(model, tok, prompts, max_new, cfg["batch_size"], stops,
                               settings["num_beams"], "compiled" if cfg["compile"] else "cache")
        for i, (ex, out) in enumerate(zip(examples, outputs)):
            mm = ex.get("gold_metamath", ex["gold"])  # shown where MetaMath reads another gold than ours
            gold_mm = {"gold_metamath": mm} if mm != ex["gold"] else {}
            samples.append({"prompt": ex["prompt"], "output": out, "gold": ex["gold"], **gold_mm,
                            **score(task, out, ex, cfg["timeout"])})
            if task in ("humaneval", "mbpp"):
                progress(i + 1, len(examples), t0, "running programs")
        n, correct, invalid = len(samples), sum(s["correct"] for s in samples), sum(not s["valid"] for s in samples)
        summary = {"task": task, "accuracy": correct / n, "invalid_rate": invalid / n, "n": n, "correct": correct,
                   "invalid": invalid}
        for key in ("correct_strict", "correct_lenient"):  # gsm8k, math: the second score, and where they differ
            if key in samples[0]:
                summary["accuracy" + key[7:]] = sum(s[key] for s in samples) / n
                summary["disagree"] = sum(s["disagree"] for s in samples)
        if task == "rgym":  # the mean credit beside the full credit, and both per task of the mix
            summary["partial_credit"] = sum(s["credit"] for s in samples) / n
            by_task = {}
            for ex, s in zip(examples, samples):
                by_task.setdefault(ex["task"], []).append(s)
            summary["by_task"] = {t: {"n": len(v), "accuracy": sum(s["correct"] for s in v) / len(v),
                                      "partial_credit": sum(s["credit"] for s in v) / len(v)}
                                  for t, v in by_task.items()}
        if task in ("humaneval", "mbpp"):
            summary["pass@1"] = summary["accuracy"]
            summary["status"] = {k: sum(s["status"] == k for s in samples) for k in ("passed", "failed", "timeout")}
    summary.update(seconds=round(time.time() - t0, 2), settings=settings)
    os.makedirs(cfg["out"], exist_ok=True)
    # each file whole or not at all (temp file, then rename): a kill never leaves a summary without its samples'
    # rows, and an earlier result stays until the new one is complete; the samples first, the summary last
    samples_path = os.path.join(cfg["out"], f"{task}_samples.jsonl")
    with open(samples_path + ".tmp", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    os.replace(samples_path + ".tmp", samples_path)
    from rundir import atomic_json  # torch is loaded by now
    atomic_json(summary, os.path.join(cfg["out"], f"{task}_summary.json"))
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}))
    return summary


if __name__ == "__main__":
    from configurator import cli
    # bad options exit 2, bad input 1; OSError: writing the results (a full disk, no permission)
    cli(main, errors=(EvalError, OSError), code=lambda e: 2 if isinstance(e, UsageError) else 1)
