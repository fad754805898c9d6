"""
python tests/kill_run.py WHERE STEP [train.py options]: train.py's main in this process, killed by a real
SIGKILL at one chosen point (for test_resume.py). The points are set by wrapping the functions train.py
writes through, so train.py itself carries no test hook. WHERE:
    event    right after the event of step STEP is appended to events.jsonl (right after an operation)
    record   half-way through appending log.jsonl's row of step STEP
    ckpt     half-way through writing the checkpoint of step STEP (its temp file)
    saved    right after the checkpoint of step STEP replaced ckpt.pt
    export   half-way through writing the adapter's adapter_model.safetensors
    none     not killed
"""
import io
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402


import peft_io
import train  # noqa: E402

where, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_append, real_save, real_atomic_save = train.append_jsonl, torch.save, train.atomic_save


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def append_jsonl(path, row):
    if where == "record" and row["step"] == at and path.endswith("log.jsonl"):
        line = json.dumps(row) + "\n"
        with open(path, "a") as f:
            f.write(line[:len(line) // 2])
        die()
    real_append(path, row)
    if where == "event" and row["step"] == at and path.endswith("events.jsonl"):
        die()


def save(obj, f, *args, **kwargs):
    if where == "ckpt" and isinstance(obj, dict) and obj.get("step") == at:
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        f.flush()
        die()
    real_save(obj, f, *args, **kwargs)


def atomic_save(obj, path, tmp=None):
    real_atomic_save(obj, path, tmp)
    if where == "saved" and path.endswith("ckpt.pt") and obj["step"] == at:
        die()


def save_safetensors(tensors, path, metadata=None):
    if where == "export":
        real_save_safetensors(tensors, path + ".whole", metadata)
        with open(path + ".whole", "rb") as f:
            data = f.read()
        os.remove(path + ".whole")
        with open(path + ".tmp", "wb") as f:  # where the real writer would be half-way
            f.write(data[:len(data) // 2])
        die()
    real_save_safetensors(tensors, path, metadata)


real_save_safetensors = peft_io.save_safetensors
train.append_jsonl, torch.save, train.atomic_save = append_jsonl, save, atomic_save
peft_io.save_safetensors = save_safetensors
train.main(argv)
