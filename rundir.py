"""
A run's out_dir across kills and restarts, for train.py. A fresh run refuses an out_dir that holds a
run unless --overwrite; --resume reads ckpt.pt, compares it with this run (every setting but a short
list that may change, and the content of every input file) and cuts the records back to its step,
so a killed and resumed run ends with the same files as one never killed.

    ck, records = check_out_dir(cfg, defaults, may_change, prints)   # reads and checks, writes nothing
    step, losses = load_state(ck, ckpt_path, model, optimizer, scaler, controller)  # into this run's objects
    start_writing(cfg, records)                                      # the run's first write

The records (events.jsonl, log.jsonl, scores.jsonl) get their rows of step t before the checkpoint of
step t is written (sync_records flushes them to disk first): a checkpoint never covers a row that is
missing, and rows after it are dropped on resume and written again by the steps that redo them.
"""
import hashlib
import json
import os
import shutil

import torch

from configurator import ConfigError

RECORDS = ("events.jsonl", "log.jsonl", "scores.jsonl")  # rows of a run's steps, each with its "step"
RUN_FILES = ("ckpt.pt", *RECORDS, "adapter", "model", "merged", "merged_base")  # what a run writes into out_dir


def atomic_save(obj, path, tmp=None):
    # a temp file on disk, then renamed over the old one: a kill at any moment leaves the old file or the new
    tmp = tmp or path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_json(obj, path):
    # the same for a JSON record beside the checkpoint (LR-LoRA's ranks.json, an adapter's config)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprints(files):
    """{name: (path, sha256)} of the files a run reads: a resume must find each one's content unchanged."""
    return {name: (path, file_digest(path)) for name, path in files.items() if path}


def read_checkpoint(path):
    """ckpt.pt as train.py wrote it, or one line naming it. Memory-mapped: checking it reads no tensor.
    weights_only: nothing but tensors and plain values is ever unpickled."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # empty, truncated, not a torch file, or objects weights_only refuses
        why = ("it holds Python objects that a train.py checkpoint never does (refused unread)"
               if "weights only" in str(e).lower() else f"empty, truncated or not a torch file ({type(e).__name__})")
        raise ConfigError(f"{path}: unreadable checkpoint: {why}") from None
    need = {"params": dict, "optimizer": dict, "scaler": dict, "step": int, "config": str, "rng_cpu": torch.Tensor}
    if not isinstance(ck, dict) or any(not isinstance(ck.get(k), t) for k, t in need.items()):
        raise ConfigError(f"{path}: not a train.py checkpoint (it needs {', '.join(need)})")
    try:
        ck["config"] = json.loads(ck["config"])
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not a train.py checkpoint (its config is not JSON)") from None
    return ck


def changes(ck, cfg, defaults, may_change, prints):
    """What differs between the checkpoint's run and this one: every key not in `may_change` (so a key that a
    new method adds is compared with no list to update), and the content of every input file."""
    saved, out = ck["config"], []
    for k in sorted(set(saved) | set(cfg)):
        then = saved.get(k, defaults.get(k, "(not an option then)"))  # a key added since: it ran as the default
        now = cfg.get(k, "(not an option now)")
        if k not in may_change and then != now:
            out.append(f"--{k}={now!r} (checkpoint: {then!r})")
    for name, digest in ck.get("fingerprints", {}).items():
        path, now = prints.get(name, (name, "none"))
        if now != digest:
            out.append(f"{path} ({name}): content changed (sha256 {now[:12]}, checkpoint: {digest[:12]})")
    return out


def read_records(out_dir, step):
    """{path: (rows up to `step`, all rows)} of each record file, as bytes: the first is the file as it was when
    the checkpoint of `step` was written. A last line without its newline was cut short by a kill: dropped."""
    kept = {}
    for name in RECORDS:
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            lines = f.readlines()
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.endswith(b"\n"):
                break
            try:
                later = json.loads(line)["step"] > step
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{path}:{n}: not a train.py record (a JSON object with a step)") from None
            if not later:
                rows.append(line)
        kept[path] = (b"".join(rows), b"".join(lines))
    return kept


def check_out_dir(cfg, defaults, may_change, prints):
    """A fresh run: refuse an out_dir that holds a run, unless --overwrite. --resume: the checkpoint, read and
    compared with this run, and the records as they must be. Writes nothing. -> (checkpoint or None, records)"""
    out, ckpt_path = cfg["out_dir"], os.path.join(cfg["out_dir"], "ckpt.pt")
    if not cfg["resume"]:
        found = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
        if found and not cfg["overwrite"]:
            go_on = "--resume continues it, " if "ckpt.pt" in found else ""
            raise ConfigError(f"{out} already holds a run ({', '.join(found)}): {go_on}--overwrite deletes it and "
                              "starts over")
        return None, {}
    if not os.path.isfile(ckpt_path):
        raise ConfigError(f"{ckpt_path}: no checkpoint to resume from (without --resume a fresh run starts)")
    ck = read_checkpoint(ckpt_path)
    diff = changes(ck, cfg, defaults, may_change, prints)
    if diff:
        raise ConfigError(f"{ckpt_path}: this run differs from the checkpoint's: {'; '.join(diff)}. Resume with "
                          "the checkpoint's settings, or start over with --overwrite instead of --resume")
    return ck, read_records(out, ck["step"])


def load_state(ck, path, model, optimizer, scaler, controller, cuda=False):
    """The checkpoint's trained tensors, optimizer, scaler, controller state and random state (cuda: the GPU's too)
    into this run's objects. -> (its step, the losses of its steps since the last log row)"""
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = ck["params"]
    if saved.keys() != trained.keys() or any(saved[n].shape != p.shape for n, p in trained.items()):
        diff = sorted(saved.keys() ^ trained.keys()) or [n for n, p in trained.items() if saved[n].shape != p.shape]
        raise ConfigError(f"{path}: its trained tensors do not fit this run's model ({', '.join(diff[:3])}"
                          f"{', ...' if len(diff) > 3 else ''})")
    try:
        for n, p in trained.items():
            p.data.copy_(saved[n])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        controller.load_state_dict(ck.get("controller", {}))  # none in a checkpoint of a method without state
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: does not fit this run ({type(e).__name__}: {first})") from None
    torch.set_rng_state(ck["rng_cpu"])
    if cuda and "rng_cuda" in ck:
        torch.cuda.set_rng_state(ck["rng_cuda"])
    return ck["step"], list(ck.get("log_losses", []))


def write_synced(path, data):
    tmp = path + ".tmp"  # on disk before it replaces the old file: a kill leaves one or the other
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_writing(cfg, records):
    """The run's first writes, after every check: --overwrite deletes the old run's files, --resume cuts the
    records back to the checkpoint's step."""
    out = cfg["out_dir"]
    for name in RUN_FILES if cfg["overwrite"] else ():
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    for path, (kept, now) in records.items():
        if kept != now:
            write_synced(path, kept)
            print(f"{path}: rows after the checkpoint's step dropped (they are redone)")


def sync_records(out_dir):
    """Before a checkpoint: the rows it covers reach the disk first (a power cut cannot leave it ahead of them)."""
    for path in (os.path.join(out_dir, name) for name in RECORDS):
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
