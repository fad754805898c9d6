"""
The training data: jsonl records (or plain text) -> token ids and loss labels, cached; an epoch's batches; a
batch's tensors, for train.py's loop. eval.py writes the same prompts again (its ALPACA, METAMATH), as the official
scripts do; tests/test_demo_data.py checks that eval.py's prompt is a token prefix of each training sequence.

    segments        one record -> [(text, trained?)] for the text formats (metamathqa, gsm8k, alpaca, alpaca_chat)
    example_ids     one record -> (ids, labels); chat: the tokenizer's own chat template (tokenizer.chat_turns)
    tokenize_file   a file -> [(ids, labels)], labels -100 where no loss; cached next to the data (or in out_dir)
    epoch_batches   an epoch's global batches: shuffled, length-sorted within chunks, batch order shuffled
    collate         a batch -> (x, y) padded on the right, y shifted by one
"""
import hashlib
import json
import os

import torch

from configurator import ConfigError
from rundir import atomic_save
from tokenizer import CHAT_FORMATS, chat_turns

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:")
GSM8K_ANSWER = "The answer is: "  # MetaMath's answer line, which eval.py's gsm8k task extracts
FORMATS = ("metamathqa", "alpaca", "gsm8k", "chat", "alpaca_chat")  # --data_format
CHAT_RENDER = "chat_turns v1"  # in the cache key of chat data: a change of the rendering code tokenizes anew


def field(ex, key):
    text = ex[key]  # a KeyError names the missing field
    if not isinstance(text, str):
        raise TypeError(f"field {key!r} must be a string, not {type(text).__name__}")
    return text


def segments(ex, data_format):
    """One jsonl record -> [(text, trained?)]: the prompt carries no loss, the response does."""
    if data_format == "metamathqa":
        return [(PROMPT.format(instruction=field(ex, "query")), False), (field(ex, "response"), True)]
    if data_format == "gsm8k":  # "... #### 72" is trained as "... The answer is: 72", the form eval.py reads
        steps, sep, final = field(ex, "answer").rpartition("####")
        answer = f"{steps.rstrip()}\n{GSM8K_ANSWER}{final.strip()}" if sep else ex["answer"]
        return [(PROMPT.format(instruction=field(ex, "question")), False), (answer, True)]
    if data_format == "alpaca":
        p = PROMPT_INPUT.format(instruction=field(ex, "instruction"), input=field(ex, "input")) if ex.get("input") \
            else PROMPT.format(instruction=field(ex, "instruction"))
        return [(p, False), (field(ex, "output"), True)]
    if data_format == "alpaca_chat":  # messages in the Alpaca template (the paper's code runs): every assistant
        out, first = [], True  # turn trained, user turns the instructions; no system turn (it has no place there)
        if not isinstance(ex["messages"], list) or not all(isinstance(m, dict) for m in ex["messages"]):
            raise TypeError("field 'messages' must be a list of {role, content} objects")
        for m in ex["messages"]:
            if field(m, "role") == "assistant":
                out.append((field(m, "content"), True))
            elif m["role"] == "user":
                out.append((PROMPT.format(instruction=field(m, "content")) if first else
                            f"\n\n### Instruction:\n{m['content']}\n\n### Response:", False))
                first = False
            else:
                raise TypeError(f"a {m['role']!r} turn has no place in the Alpaca template (user and assistant only); "
                                "--data_format=chat keeps it, in the tokenizer's chat template")
        return out
    raise ConfigError(f"--data_format: unknown {data_format!r} ({', '.join(FORMATS)})")


def example_ids(ex, data_format, tok):
    """One jsonl record -> (ids, labels), labels -100 where there is no loss. chat: the conversation in the
    tokenizer's own chat template (ChatML, Llama-3's, Mistral's), system turns kept, the assistant replies trained
    (tokenizer.chat_turns); the text formats: each prompt without loss, each response trained and ended by EOS."""
    if data_format == "chat":
        turns = chat_turns(tok, ex["messages"])  # a KeyError names the missing field
    else:
        turns = [(tok.encode(text, bos=i == 0, eos=trained), trained)
                 for i, (text, trained) in enumerate(segments(ex, data_format))]
    ids = [t for part, _ in turns for t in part]
    return ids, [t if trained else -100 for part, trained in turns for t in part]


def read_lines(path, error=ConfigError):
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is an error naming it (eval.py: EvalError)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None


def tokenize_file(path, tok, cfg):
    """-> list of (ids, labels) int lists. Cached next to the data (or in out_dir) keyed by settings."""
    fmt = cfg["data_format"]
    if fmt == "chat" and not path.endswith(".txt") and tok.chat_format not in CHAT_FORMATS:
        raise ConfigError(f"--data_format=chat: {tok.path} has no chat template (ChatML, Llama-3's or Mistral's "
                          "[INST]) to train in; --data_format=alpaca_chat trains the messages in the Alpaca template")
    h = hashlib.sha256()
    for part in (path, str(os.path.getmtime(path)), str(os.path.getsize(path)), fmt, str(cfg["max_len"]), PROMPT,
                 GSM8K_ANSWER, *[CHAT_RENDER] * (fmt == "chat")):
        h.update(part.encode())
    with open(tok.path, "rb") as f:
        h.update(f.read())
    name = f"{os.path.basename(path)}.{h.hexdigest()[:12]}.cache.pt"
    caches = (os.path.join(os.path.dirname(os.path.abspath(path)), name), os.path.join(cfg["out_dir"], name))
    for cache in caches:
        if os.path.isfile(cache):
            try:
                c = torch.load(cache, weights_only=True)
                return [(ids.tolist(), lab.tolist()) for ids, lab in zip(c["ids"].split(c["lens"].tolist()),
                                                                          c["labels"].split(c["lens"].tolist()))]
            except Exception:  # unreadable (not ours, or damaged): tokenize again
                pass
    examples, truncated, n_read = [], 0, 0
    if path.endswith(".txt"):  # plain text: blocks of max_len tokens, loss on every token
        ids = tok.encode("".join(text for _, text in read_lines(path)), bos=True, eos=True)
        examples = [(ids[i:i + cfg["max_len"]], ids[i:i + cfg["max_len"]])
                    for i in range(0, len(ids) - 1, cfg["max_len"])]
    else:
        for n, line in read_lines(path):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                if not isinstance(ex, dict):
                    raise TypeError(f"a line must be a JSON object, not {type(ex).__name__}")
                ids, labels = example_ids(ex, fmt, tok)
            except ConfigError:  # an unknown format: not the line's fault
                raise
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
            except KeyError as e:
                raise ConfigError(f"{path}:{n}: no field {e.args[0]!r} (data_format={fmt})") from None
            except (TypeError, AttributeError, ValueError) as e:  # chat_turns: a ValueError names what is wrong
                raise ConfigError(f"{path}:{n}: {e} (data_format={fmt})") from None
            truncated += len(ids) > cfg["max_len"]
            n_read += 1
            if any(x != -100 for x in labels[1:cfg["max_len"]]):
                examples.append((ids[:cfg["max_len"]], labels[:cfg["max_len"]]))
    if not examples:
        raise ConfigError(f"{path}: no usable examples")
    if truncated:
        print(f"{path}: {truncated} of {n_read} examples truncated to max_len={cfg['max_len']}"
              + (f", {n_read - len(examples)} of them dropped (no response token left)"
                 if n_read > len(examples) else ""))
    lens = torch.tensor([len(e[0]) for e in examples])
    blob = {"ids": torch.tensor([t for e in examples for t in e[0]], dtype=torch.int32),
            "labels": torch.tensor([t for e in examples for t in e[1]], dtype=torch.int32), "lens": lens}
    for cache in caches:
        try:
            atomic_save(blob, cache, tmp=f"{cache}.{os.getpid()}.tmp")  # DDP ranks may write it side by side
            break
        except OSError:  # read-only data folder: cache in out_dir instead
            continue
    return examples


def epoch_batches(lengths, epoch, seed, batch_size):
    """Global batches (lists of example indices) for one epoch: a seeded shuffle, then sorted by length
    within chunks of 16 batches so a batch wastes little padding, then the batch order shuffled."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    chunk = 16 * batch_size
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: -lengths[j])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # drop the incomplete last batch
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def collate(examples, idx, device):
    T = max(len(examples[i][0]) for i in idx)
    x = torch.zeros(len(idx), T, dtype=torch.long)
    y = torch.full((len(idx), T), -100, dtype=torch.long)
    for row, i in enumerate(idx):  # right padding: causal attention never looks at it
        ids, labels = examples[i]
        x[row, :len(ids)] = torch.tensor(ids)
        y[row, :len(ids) - 1] = torch.tensor(labels[1:])  # predict token t+1 at position t
    return x.to(device), y.to(device)
