"""
A GGUF reader in plain Python and numpy: header, metadata, tensor infos, and tensors dequantised
to float32 numpy arrays (F32, F16, Q4_1, Q8_0; any other tensor type is an error that names it).

    meta, infos = read_gguf("model.gguf")      # {key: value}, {name: TensorInfo}
    for name, w in load_tensors("model.gguf", infos):   # float32 arrays in torch's order: (rows, cols)
        ...

The layout (ggml's docs/gguf.md, versions 2 and 3; little-endian throughout):
  "GGUF", u32 version, u64 tensor count, u64 metadata count;
  metadata: key (u64 length + UTF-8), u32 value type, value (a string is u64 length + bytes, an array
            is u32 element type + u64 count + elements);
  tensor infos: name, u32 n_dims, u64 dims (fastest-varying first, so reversed to get torch's shape),
            u32 ggml type, u64 offset into the data section;
  then padding to general.alignment (32 by default) and the data section.
Every read is bounds-checked, so a truncated or corrupt file is a one-line GGUFError naming the
file, never a struct.error or a huge allocation.
"""
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np


class GGUFError(ValueError):
    pass


# metadata value types with a fixed size: struct format
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9

# ggml tensor types we dequantise: id -> (name, elements per block, bytes per block)
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), Q4_1: ("Q4_1", 32, 20), Q8_0: ("Q8_0", 32, 34)}
OTHER_TYPES = {2: "Q4_0", 6: "Q5_0", 7: "Q5_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
               30: "BF16"}  # names only, for the error message
# one block of each quantised type (ggml-common.h): fp16 scale (and min), then the quants
Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # torch order: (rows, cols) for a matrix
    type: int
    start: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Sequential little-endian reads over a memory map, each checked against the file's end."""

    def __init__(self, path, buf):
        self.path, self.buf, self.pos = path, buf, 0

    def take(self, n, what):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated ({what} needs {n} bytes at offset {self.pos}, "
                            f"the file has {len(self.buf)})")
        self.pos += n
        return self.pos - n

    def scalar(self, fmt, what):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what):
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} at offset {start} is not UTF-8") from None

    def value(self, vtype, what):
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            etype, n = self.scalar("<I", what), self.scalar("<Q", what)
            if etype in SCALARS and etype != 7:  # numbers in one go: token types are 49k int32
                dt = np.dtype(SCALARS[etype].replace("?", "b"))
                start = self.take(n * dt.itemsize, what)
                return np.frombuffer(self.buf, dt, count=n, offset=start).tolist()
            if n > len(self.buf) - self.pos:  # each element takes at least a byte: a corrupt count
                raise GGUFError(f"{self.path}: truncated ({what}: an array of {n} elements at offset {self.pos})")
            return [self.value(etype, what) for _ in range(n)]
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")


def read_gguf(path):
    """-> (metadata dict, {tensor name: TensorInfo}), with every tensor's type and extent checked."""
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: file not found")
    with open(path, "rb") as f:
        if os.path.getsize(path) < 4:
            raise GGUFError(f"{path}: not a GGUF file (only {os.path.getsize(path)} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    c = _Cursor(path, buf)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.scalar("<I", "the version")
    if version not in (2, 3):  # version 1 used 32-bit counts; llama.cpp dropped it in 2023
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.scalar("<Q", "the tensor count"), c.scalar("<Q", "the metadata count")
    meta = {}
    for i in range(n_kv):
        key = c.string(f"metadata key {i}")
        meta[key] = c.value(c.scalar("<I", f"the type of {key}"), key)
    infos = {}
    for i in range(n_tensors):
        name = c.string(f"tensor name {i}")
        n_dims = c.scalar("<I", f"tensor {name}")
        if n_dims > 4:
            raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (at most 4)")
        dims = [c.scalar("<Q", f"tensor {name}") for _ in range(n_dims)]
        ttype, offset = c.scalar("<I", f"tensor {name}"), c.scalar("<Q", f"tensor {name}")
        infos[name] = (tuple(reversed(dims)), ttype, offset)
    align = meta.get("general.alignment", 32)
    data_start = -(-c.pos // align) * align
    out = {}
    for name, (shape, ttype, offset) in infos.items():
        if ttype not in TYPES:
            kind = OTHER_TYPES.get(ttype, f"ggml type {ttype}")
            raise GGUFError(f"{path}: tensor {name} has unsupported type {kind} "
                            f"(supported: {', '.join(t[0] for t in TYPES.values())})")
        _, block, block_bytes = TYPES[ttype]
        n = int(np.prod(shape))
        if shape and shape[-1] % block:
            raise GGUFError(f"{path}: tensor {name} rows of {shape[-1]} are not whole {TYPES[ttype][0]} blocks")
        info = TensorInfo(name, shape, ttype, data_start + offset, n // block * block_bytes)
        if info.start + info.nbytes > len(buf):
            raise GGUFError(f"{path}: truncated (tensor {name} needs bytes up to {info.start + info.nbytes}, "
                            f"the file has {len(buf)})")
        out[name] = info
    return meta, out


def dequantize(raw, ttype, shape):
    """raw: the tensor's bytes (numpy uint8) -> float32 array of `shape`. Same arithmetic as
    ggml's dequantize_row_*: fp32 from fp16 scales, then q * d (+ m)."""
    if ttype == F32:
        x = raw.view("<f4").copy()  # the map is read-only
    elif ttype == F16:
        x = raw.view("<f2").astype(np.float32)
    elif ttype == Q8_0:
        b = raw.view(Q8_0_BLOCK)
        x = b["qs"].astype(np.float32) * b["d"].astype(np.float32)[:, None]
    elif ttype == Q4_1:
        b = raw.view(Q4_1_BLOCK)
        # a block's first 16 values are the low nibbles of qs, its last 16 the high ones
        q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
        x = q * b["d"].astype(np.float32)[:, None] + b["m"].astype(np.float32)[:, None]
    else:
        raise GGUFError(f"cannot dequantise ggml type {ttype}")
    return np.ascontiguousarray(x, dtype=np.float32).reshape(shape)


def load_tensors(path, infos):
    """Yields (name, float32 array) one at a time: only the file's map and one tensor in memory."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for name, info in infos.items():
        yield name, dequantize(np.frombuffer(buf, np.uint8, count=info.nbytes, offset=info.start), info.type,
                               info.shape)
