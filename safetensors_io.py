"""
Safetensors files read and written in plain PyTorch (no safetensors package), and the tensors of a checkpoint
directory (one file or index-listed shards). Reading validates the whole header first, so a truncated or
malformed file is one CheckpointError naming it, then memory-maps the data (no copy where possible).
model.py loads and saves HF checkpoints with these, and re-exports CheckpointError and the reader/writer.
"""
import json
import math
import os

import torch


class CheckpointError(ValueError):  # a ValueError: the scripts report it as one line, no traceback
    pass


# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header, then raw little-endian data.

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors_header(path):
    """Returns (header dict without __metadata__, data start offset, file size); validates it all."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated file ({size} bytes, no header length)")
        n = int.from_bytes(raw, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {info['dtype']!r}")
        if not (0 <= lo <= hi <= data_size):
            raise CheckpointError(f"{path}: tensor {name!r} offsets [{lo}, {hi}) run past the data "
                                  f"({data_size} bytes); the file may be truncated")
        if hi - lo != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} has {hi - lo} bytes, shape {shape} needs "
                                  f"{math.prod(shape) * dtype.itemsize}")
        spans.append((lo, hi, name))
    spans.sort()
    for (_, hi1, a), (lo2, _, b) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap")
    return header, start, size


def load_safetensors(path):
    """All tensors of a file, as views into one private memory map (copy-on-write, nothing read yet)."""
    header, start, size = read_safetensors_header(path)
    if size == start:
        return {name: torch.empty(info["shape"], dtype=DTYPES[info["dtype"]]) for name, info in header.items()}
    buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        dtype, (lo, hi) = DTYPES[info["dtype"]], info["data_offsets"]
        raw = buf[start + lo:start + hi]
        if (start + lo) % dtype.itemsize:
            raw = raw.clone()  # misaligned for this dtype: copy to view it
        out[name] = raw.view(dtype).view(info["shape"])
    return out


def save_safetensors(tensors, path, metadata=None):
    """Writes a .safetensors file atomically (temp file, then rename)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    items = [(k, t.detach().contiguous().cpu()) for k, t in tensors.items()]
    for name, t in items:
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, t in items:
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# a checkpoint directory: one file, or shards listed in an index


def load_checkpoint_tensors(checkpoint_dir):
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single = os.path.join(checkpoint_dir, "model.safetensors")
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_safetensors(single)
    if not os.path.isfile(index):
        raise CheckpointError(f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors checkpoints are read)")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e})") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_safetensors(os.path.join(checkpoint_dir, shard))
        state.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
    return state
