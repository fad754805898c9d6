"""
A run's out_dir across kills and restarts, for train.py. A fresh run refuses an out_dir that holds a
run unless --overwrite; --resume reads ckpt.pt, compares it with this run (every setting but a short
list that may change, and the content of every input file) and cuts the records back to its step,
so a killed and resumed run ends with the same files as one never killed.

    ck, records = check_out_dir(cfg, defaults, may_change, prints)   # reads and checks, writes nothing
    step, losses = load_state(ck, ckpt_path, model, optimizer, scaler, controller)  # into this run's objects
    start_writing(cfg, records)                                      # the run's first write

    with OutDirLock(out_dir):          # one live run per out_dir (a file held with flock: a dead holder holds nothing)
    with writes(path, last_good):      # an OSError while writing: one line naming the file and what is intact

The records (events.jsonl, log.jsonl, scores.jsonl) get their rows of step t before the checkpoint of
step t is written (sync_records flushes them to disk first): a checkpoint never covers a row that is
missing, and rows after it are dropped on resume and written again by the steps that redo them.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket

import torch

from configurator import ConfigError

RECORDS = ("events.jsonl", "log.jsonl", "scores.jsonl")  # rows of a run's steps, each with its "step"
RUN_FILES = ("ckpt.pt", *RECORDS, "adapter", "model", "merged", "merged_base")  # what a run writes into out_dir
LOCK = "run.lock"  # train.py's lock in out_dir (OutDirLock): not a run's file, never deleted by --overwrite


class WriteError(OSError):
    """An OSError while a run writes (a full disk, a lost mount, no permission), as one line: the file and what is
    intact (writes below). An OSError, so configurator.cli prints it as `error: ...` with no traceback."""


class _Recorder:
    # torch.save writes through this: a failed write (ENOSPC) leaves its OSError here, as torch.save itself
    # reports only "[enforce fail at inline_container.cc] unexpected pos" (a RuntimeError) for it
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def atomic_save(obj, path, tmp=None):
    # a temp file on disk, then renamed over the old one: a kill at any moment leaves the old file or the new.
    # A failed write raises the OSError (naming the temp file) and deletes the temp file: the old file stays.
    tmp = tmp or path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            out = _Recorder(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise OSError(out.error.errno, out.error.strerror, tmp) from None
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _remove_quietly(tmp)  # a full disk gets its space back
        if e.filename is None:  # a write or fsync names no file
            raise OSError(e.errno, e.strerror, tmp) from None
        raise
    os.replace(tmp, path)


def atomic_json(obj, path):
    # the same for a JSON record beside the checkpoint (LR-LoRA's ranks.json, an adapter's config)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    except OSError as e:
        _remove_quietly(tmp)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, tmp) from None
        raise
    os.replace(tmp, path)


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


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


def load_state(ck, path, model, optimizer, scaler, controller, cuda=False, rank=0, world=1):
    """The checkpoint's trained tensors, optimizer, scaler, controller state and random state (cuda: the GPU's too)
    into this run's objects; under torchrun each process's own random state where the checkpoint has one for each
    (rng_cpu_ranks: their dropout draws differ). -> (its step, the losses of its steps since the last log row)"""
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
    own = world > 1 and len(ck.get("rng_cpu_ranks", ())) == world  # else: process 0's state for every process
    torch.set_rng_state(ck["rng_cpu_ranks"][rank] if own else ck["rng_cpu"])
    if cuda and "rng_cuda" in ck:
        torch.cuda.set_rng_state(ck["rng_cuda_ranks"][rank] if own and "rng_cuda_ranks" in ck else ck["rng_cuda"])
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


# -----------------------------------------------------------------------------
# faults of a shared machine: a second run on the same out_dir, a disk that fills

class OutDirLock:
    """One live run per directory: DIR/name held with fcntl.flock for as long as the holder lives. The kernel drops
    the lock when its process dies, SIGKILL included, so a dead run never blocks the next one; on NFS the server
    drops a lost node's locks when its lease runs out (NFSv4: about 90 s). The file holds "pid host" of the holder,
    for the one-line refusal of the next. It is removed on release, and a run checks after locking that the file it
    locked is still the one at the path (one that opened it just before the holder removed it takes the new file),
    so two runs never both hold it. take=False: nothing (under torchrun only rank 0 takes it: once per run).

        with OutDirLock(cfg["out_dir"]):   # before anything reads the out_dir; ConfigError if a live run holds it
    """

    def __init__(self, directory, name=LOCK, what="--out_dir", take=True):
        self.dir, self.path, self.what, self.take = directory, os.path.join(directory, name), what, take
        self.fd, self.made = None, []

    def __enter__(self):
        if self.take:
            self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        missing, d = [], os.path.abspath(self.dir)
        while not os.path.isdir(d):  # the directories this run creates: removed again if it leaves them empty
            missing.append(d)
            d = os.path.dirname(d)
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.made = missing
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").split()
                    os.close(fd)
                    who = f"pid {holder[0]} on {holder[1]}" if len(holder) == 2 else "a run that is starting"
                    self.release()
                    raise ConfigError(f"{self.dir}: in use by a live run ({who}; it holds {self.path}): wait for it to "
                                      f"end or give another {self.what}") from None
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        os.close(fd)
                        raise
                    print(f"{self.path}: this filesystem has no file locks ({e.strerror}): nothing stops a second "
                          f"run in {self.dir}")
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # its holder removed it between our open and our lock: take the file at the path now
            self.fd = fd
        except OSError as e:
            self.release()
            raise ConfigError(f"{e.filename or self.path}: cannot lock {self.what} ({e.strerror})") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, the next run's message just cannot name us

    def release(self):
        if self.fd is not None:
            try:
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    os.remove(self.path)  # while still locked: see the class's docstring
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        for d in self.made:  # deepest first; only while empty (a run that wrote nothing leaves no directory)
            try:
                os.rmdir(d)
            except OSError:
                break
        self.made = []


def intact(last_good):
    """What a failed write leaves: last_good = (step, path) of the last checkpoint on disk, or None."""
    if last_good is None:
        return "no checkpoint yet: the run starts over with --overwrite"
    return f"the last good checkpoint is step {last_good[0]} ({last_good[1]}); --resume continues from it"


def newest_tmp(directory):
    """The most recently written temp file under `directory`, or None."""
    tmps = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs if f.endswith(".tmp")]
    return max(tmps, key=os.path.getmtime, default=None)


@contextlib.contextmanager
def writes(what, last_good):
    """An OSError inside (a full disk, EIO, a read-only remount, no permission) -> WriteError, one line: the file,
    the reason, and what is intact (`intact`). The file: the error's own; a failed write() names none, and every
    writer of a run writes a temp file and renames it into place, so under a directory `what` it is the newest temp
    file (removed: a full disk gets its space back); else `what`. Every file a run writes is either whole or a record
    that --resume cuts back, so that line is the whole story."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        name = e.filename
        if name is None and os.path.isdir(what):
            name = newest_tmp(what)
            if name:
                _remove_quietly(name)
        raise WriteError(f"{name or what}: cannot write ({e.strerror or e}); {intact(last_good)}") from None
