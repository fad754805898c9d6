"""
Proof that a change to the code changes no number: the same train.py command lines, run in this checkout
and in another commit's tree on one tiny base and data set, must write the same files bit for bit (every
tensor of ckpt.pt and of the safetensors in adapter/, merged/, model/ and merged_base/, events.jsonl,
scores.jsonl, ranks.json, adapter_config.json, log.jsonl less its wall-clock fields, the held-out losses
printed), for every method, every variant of bench/compare.py, --dora, --rslora, --scope=module and a run
stopped with --stop_after and continued with --resume. Each run is one process with one thread.

    python bench/same_numbers.py --against=HEAD                       # this working tree vs its last commit
    python bench/same_numbers.py --against=HEAD --methods=lora,beamlora --steps=24
    python bench/same_numbers.py --against=v1 --tree=v2 --keep=/tmp/sn     # two commits; keep every file

The working tree is copied (tracked and untracked files, not ignored ones) before anything runs, so edits
made meanwhile do not mix in. One line per case, then a summary; exit status 0 only if all are identical.
"""
import concurrent.futures
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
from compare import VARIANTS  # noqa: E402
from configurator import ConfigError, cli, parse_args  # noqa: E402

DEFAULTS = dict(
    against="",  # the commit to compare with (required), extracted into a temporary directory with git archive
    tree="",  # the code under test: "" this working tree (copied first), or a commit, extracted as --against
    methods="",  # comma-separated cases to run (CASES below); "": all of them
    steps=48,  # --max_steps of every run; each method's between-step defaults (dt, cycles, ...) scale with it
    jobs=2,  # train.py processes at once, one thread each
    keep="",  # keep the trees, base, data and runs in this new (or empty) directory; "": a temporary one, deleted
)
METHODS = ("full", "lora", "beamlora", "dora", "pissa", "milora", "adalora", "relora", "increlora", "lrlora")
# every run: a tiny LoRA (r 4) with dropout, a large lr so that ranks move, two micro-batches per step, the
# held-out loss at eval_interval and at the end, the rank scores every 4 steps
COMMON = dict(r=4, alpha=8.0, lr=1e-2, batch_size=4, micro_batch_size=2, max_len=256, dtype="float32", device="cpu",
              seed=3, log_interval=4, score_log_interval=4)
CASES = {  # name -> train.py options, on top of COMMON
    **{m: dict(method=m) for m in METHODS},
    **VARIANTS,
    "beamlora+dora": dict(method="beamlora", dora=True),
    "lora+rslora": dict(method="lora", rslora=True),
    "beamlora+scope=module": dict(method="beamlora", scope="module"),
    "beamlora+resume": dict(method="beamlora"),  # stopped with --stop_after, then continued with --resume
}
EVENTFUL = ("beamlora", "adalora", "relora", "increlora", "lrlora")  # must write events.jsonl in the short run
WALL_CLOCK = ("tok_s", "mfu", "mem_gib")  # log.jsonl fields that depend on the machine, not on the numbers
# compared first: the records of every few steps, so a difference is reported at the first step it shows in
FIRST = ("events.jsonl", "log.jsonl", "scores.jsonl", "stdout.txt", "ckpt.pt")

# the tiny base and data, made with the code under test (tests/conftest.py's fixtures `demo_data` and `base`)
BUILD = r"""
import importlib.util, os, shutil, sys
import torch
from model import Transformer
from tokenizer import Tokenizer
out = sys.argv[1]
spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join("data", "demo", "prepare.py"))
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)
data = prep.prepare(os.path.join(out, "data"), seed=1, n_train=64, n_test=8, n_pretrain=400, vocab_size=420)
n_vocab = Tokenizer(os.path.join(data, "tokenizer.model")).n_words
cfg = dict(model_type="llama", vocab_size=n_vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
m = Transformer.from_config(cfg)
with torch.no_grad():
    for p in m.parameters():
        if p.dim() == 2:
            p.normal_(std=1.0 if p.shape[0] == n_vocab else p.shape[1] ** -0.5)
m.save_pretrained(os.path.join(out, "base"))
shutil.copy(os.path.join(data, "tokenizer.model"), os.path.join(out, "base"))
"""


# ----------------------------------------------------------------------------------------------
# comparing two runs' files

class Differ(Exception):
    """The first difference found: where (a path inside the run) and what."""


def same_float(a, b):
    return struct.pack("<d", a) == struct.pack("<d", b)  # bit for bit: -0.0 is not 0.0, NaN is NaN


def compare_values(a, b, path):
    """Walks nested dicts / lists / tuples; tensors by dtype, shape and bytes; other leaves by type and value.
    -> tensors compared; raises Differ at the first difference."""
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise Differ(f"{path}: a tensor on one side only ({type(a).__name__} vs {type(b).__name__})")
        if a.dtype != b.dtype or a.shape != b.shape:
            raise Differ(f"{path}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
        if tensor_bytes(a) != tensor_bytes(b):
            raise Differ(f"{path}: values differ ({first_diff(a, b)})")
        return 1
    if type(a) is not type(b):
        raise Differ(f"{path}: {type(a).__name__} {a!r:.80} vs {type(b).__name__} {b!r:.80}")
    if isinstance(a, dict):
        if set(a) != set(b):  # the same keys; their order is no number
            only = sorted(map(repr, set(a) ^ set(b)))
            raise Differ(f"{path}: keys differ ({', '.join(only[:5])})")
        sep = "." if path and not path.endswith(":") else ""  # ckpt.pt:optimizer.state.0.exp_avg
        return sum(compare_values(a[k], b[k], f"{path}{sep}{k}") for k in a)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise Differ(f"{path}: length {len(a)} vs {len(b)}")
        return sum(compare_values(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) and same_float(a, b) or not isinstance(a, float) and a == b:
        return 0
    raise Differ(f"{path}: {a!r:.80} vs {b!r:.80}")


def tensor_bytes(t):
    import torch
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def first_diff(a, b):
    """Where two tensors of the same dtype and shape first differ, and their largest difference."""
    fa, fb = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    ne = ((fa != fb) & ~(fa.isnan() & fb.isnan())).nonzero()
    if len(ne) == 0:  # equal as numbers: the bits differ (-0.0 vs 0.0, NaN payloads)
        return "equal values, different bits"
    i = int(ne[0])
    return f"{len(ne)} of {fa.numel()} elements, first at flat index {i}: {fa[i].item()!r} vs {fb[i].item()!r}"


def first_diff_raw(a, b, dtype, shape):
    import torch
    types = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
    if dtype not in types or len(a) != len(b):
        return f"{sum(x != y for x, y in zip(a, b))} bytes"
    return first_diff(*(torch.frombuffer(bytearray(x), dtype=types[dtype]).reshape(shape) for x in (a, b)))


def read_safetensors(path):
    """-> (header dict without __metadata__, metadata, data bytes). The format: 8-byte little-endian header length,
    the JSON header, then the data; each tensor's dtype, shape and [start, end) offsets into the data."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise Differ(f"{path}: not a safetensors file (too short)")
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return header, header.pop("__metadata__", None), raw[8 + n:]


def compare_safetensors(a, b, rel):
    ha, ma, da = read_safetensors(a)
    hb, mb, db = read_safetensors(b)
    if ma != mb:
        raise Differ(f"{rel}: header metadata {ma} vs {mb}")
    if sorted(ha) != sorted(hb):
        only = sorted(set(ha) ^ set(hb))
        raise Differ(f"{rel}: tensor names differ ({', '.join(only[:5])})")
    for name in sorted(ha):
        x, y = ha[name], hb[name]
        if (x["dtype"], x["shape"]) != (y["dtype"], y["shape"]):
            raise Differ(f"{rel}:{name}: {x['dtype']} {x['shape']} vs {y['dtype']} {y['shape']}")
        ba, bb = da[slice(*x["data_offsets"])], db[slice(*y["data_offsets"])]
        if ba != bb:
            raise Differ(f"{rel}:{name}: values differ ({first_diff_raw(ba, bb, x['dtype'], x['shape'])})")
    return len(ha)


def compare_ckpt(a, b, rel):
    import torch
    ca = torch.load(a, map_location="cpu", weights_only=True)
    cb = torch.load(b, map_location="cpu", weights_only=True)
    if isinstance(ca, dict) and isinstance(cb, dict) and isinstance(ca.get("config"), str) \
            and isinstance(cb.get("config"), str):  # the run's settings as JSON: key order may differ
        xa, xb = json.loads(ca.pop("config")), json.loads(cb.pop("config"))
        both = xa.keys() & xb.keys()  # an option added since the other commit is a setting, not a number
        compare_values({k: xa[k] for k in both}, {k: xb[k] for k in both}, f"{rel}:config")
    return compare_values(ca, cb, rel + ":")


def compare_lines(a, b, rel, drop=()):
    """Text files line by line; with `drop`, JSON lines compared parsed, without those keys."""
    with open(a, encoding="utf-8") as f:
        la = f.read().splitlines()
    with open(b, encoding="utf-8") as f:
        lb = f.read().splitlines()
    for i, (x, y) in enumerate(zip(la, lb), 1):
        where = f"{rel} line {i}" + (f" (step {step_of(x)})" if step_of(x) is not None else "")
        if drop:
            x, y = ({k: v for k, v in json.loads(s).items() if k not in drop} for s in (x, y))
            try:
                compare_values(x, y, "")
                continue
            except Differ as e:
                raise Differ(f"{where}: {e}") from None
        if x != y:
            raise Differ(f"{where}: {x[:120]!r} vs {y[:120]!r}")
    if len(la) != len(lb):
        raise Differ(f"{rel}: {len(la)} lines vs {len(lb)}")


def step_of(line):
    """The "step" of a JSON records line, or None."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step") if isinstance(row, dict) else None


HELD_OUT = re.compile(r"held-out loss (\S+)")


def compare_stdout(a, b, rel):
    """The held-out losses train.py prints (the rest of its output holds timings)."""
    losses = []
    for path in (a, b):
        with open(path, encoding="utf-8", errors="replace") as f:
            losses.append(HELD_OUT.findall(f.read()))
    if losses[0] != losses[1]:
        raise Differ(f"{rel}: held-out losses {losses[0]} vs {losses[1]}")


def compare_dirs(a, b):
    """Every file under run directories a and b, which must hold the same names. -> (files, tensors, difference
    or None): the first difference as 'path: what', the path relative to the run directory."""
    files = tensors = 0
    names = [sorted(os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs)
             for top in (a, b)]
    if names[0] != names[1]:
        only = [f"{n} ({'first' if n in names[0] else 'second'} only)" for n in sorted(set(names[0]) ^ set(names[1]))]
        return files, tensors, f"files differ: {', '.join(only[:5])}"
    for rel in sorted(names[0], key=lambda n: (FIRST.index(os.path.basename(n)) if os.path.basename(n) in FIRST
                                               else len(FIRST), n)):
        x, y, base = os.path.join(a, rel), os.path.join(b, rel), os.path.basename(rel)
        try:
            if base.endswith(".safetensors"):
                tensors += compare_safetensors(x, y, rel)
            elif base == "ckpt.pt":
                tensors += compare_ckpt(x, y, rel)
            elif base == "log.jsonl":
                compare_lines(x, y, rel, drop=WALL_CLOCK)
            elif base == "stdout.txt":
                compare_stdout(x, y, rel)
            else:  # events, scores, ranks, adapter_config.json, config.json, tokenizer.model, ...: byte for byte
                with open(x, "rb") as f, open(y, "rb") as g:
                    if f.read() != g.read():
                        if base.endswith((".json", ".jsonl", ".txt")):
                            compare_lines(x, y, rel)
                        raise Differ(f"{rel}: bytes differ")
        except Differ as e:
            return files, tensors, str(e)
        except (OSError, ValueError, RuntimeError) as e:  # unreadable on one side: a difference too
            return files, tensors, f"{rel}: cannot compare ({type(e).__name__}: {str(e)[:200]})"
        files += 1
    return files, tensors, None


# ----------------------------------------------------------------------------------------------
# the trees, the base, the runs

def git(*args):
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        raise ConfigError(f"git {' '.join(args)}: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc.stdout


def extract(commit, dest):
    """The commit's tree into dest (git archive). -> the full commit id."""
    sha = git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}").decode().strip()
    os.makedirs(dest)
    archive = git("archive", "--format=tar", sha)
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return sha


def copy_worktree(dest):
    """This checkout's working tree as it is now: tracked files (with their edits) and untracked ones not ignored."""
    for rel in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").decode().split("\0"):
        src = os.path.join(ROOT, rel)
        if rel and os.path.lexists(src) and not os.path.isdir(src):  # a deleted tracked file is listed, and absent
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel), follow_symlinks=False)


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def commands(case, work, steps):
    """The train.py command lines of a case (the same in both trees): its out_dir is relative to the tree."""
    opts = dict(COMMON, **CASES[case])
    if opts["method"] == "full":
        opts["lr"] = 1e-3  # every weight trained: LoRA's lr would blow the tiny base up
    elif opts["method"] != "relora":  # relora writes merged/ always
        opts["save_merged"] = True
    opts.update(init_from=os.path.join(work, "base"), data=os.path.join(work, "data", "train.jsonl"),
                val_data=os.path.join(work, "data", "test.jsonl"), out_dir=os.path.join("runs", case, "out"),
                max_steps=steps, eval_interval=steps // 2)
    argv = [f"--{k}={v}" for k, v in opts.items()]
    if case.endswith("+resume"):  # stopped off the log and eval steps, so the carried losses are exercised too
        return [argv + [f"--stop_after={steps // 2 - 1}"], argv + ["--resume"]]
    return [argv]


def run_case(tree, case, work, steps):
    """The case's train.py runs in `tree`; -> (seconds, None or the failure's last lines)."""
    run_dir = os.path.join(tree, "runs", case)
    os.makedirs(run_dir, exist_ok=True)
    t = time.time()
    with open(os.path.join(run_dir, "stdout.txt"), "w") as log:
        for argv in commands(case, work, steps):
            proc = subprocess.run([sys.executable, "train.py", *argv], cwd=tree, env=env(), stdout=log,
                                  stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                return time.time() - t, f"exit {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-3:])
    return time.time() - t, None


def events_of(run_dir):
    try:
        with open(os.path.join(run_dir, "out", "events.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def main(argv):
    cfg = parse_args(argv, DEFAULTS, __file__)
    if not cfg["against"]:
        raise ConfigError("--against: give the commit to compare with (e.g. --against=HEAD)")
    cases = list(CASES) if not cfg["methods"] else cfg["methods"].split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"--methods: unknown case(s) {', '.join(unknown)}; the cases: {', '.join(CASES)}")
    if cfg["steps"] < 12 or cfg["jobs"] < 1:
        raise ConfigError("--steps must be at least 12 and --jobs at least 1")
    if cfg["keep"] and os.path.exists(cfg["keep"]) and (not os.path.isdir(cfg["keep"]) or os.listdir(cfg["keep"])):
        raise ConfigError(f"--keep={cfg['keep']}: exists and is not an empty directory")
    work = os.path.abspath(cfg["keep"]) if cfg["keep"] else tempfile.mkdtemp(prefix="same_numbers_")
    try:
        return compare_trees(cfg, cases, work)
    finally:
        if not cfg["keep"]:
            shutil.rmtree(work, ignore_errors=True)


def compare_trees(cfg, cases, work):
    t0 = time.time()
    os.makedirs(work, exist_ok=True)
    ref, new = os.path.join(work, "against"), os.path.join(work, "tree")
    ref_sha = extract(cfg["against"], ref)
    if cfg["tree"]:
        new_name = f"{cfg['tree']} ({extract(cfg['tree'], new)[:12]})"
    else:
        copy_worktree(new)
        new_name = "the working tree"
    print(f"{new_name} vs {cfg['against']} ({ref_sha[:12]}): {len(cases)} cases, {cfg['steps']} steps each, "
          f"{cfg['jobs']} at once; files in {work}", flush=True)
    proc = subprocess.run([sys.executable, "-c", BUILD, work], cwd=new, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the base and data failed:\n{proc.stderr[-3000:]}")
    failed, files, tensors = [], 0, 0
    width = max(map(len, cases))
    with concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
        jobs = [(case, [pool.submit(run_case, tree, case, work, cfg["steps"]) for tree in (ref, new)])
                for case in cases]
        for case, futures in jobs:
            (sa, ea), (sb, eb) = (f.result() for f in futures)
            if ea or eb:
                diff, nf, nt = f"train.py failed ({'against: ' + ea if ea else 'tree: ' + eb})", 0, 0
            else:
                nf, nt, diff = compare_dirs(os.path.join(ref, "runs", case), os.path.join(new, "runs", case))
            n_events = events_of(os.path.join(new, "runs", case))
            if diff is None and CASES[case]["method"] in EVENTFUL and n_events == 0:
                diff = "no events.jsonl: the run is too short to test the method's operations (--steps)"
            files, tensors = files + nf, tensors + nt
            status = "IDENTICAL" if diff is None else f"DIFFERS: {diff}"
            failed += [case] if diff else []
            print(f"{case:<{width}}  {nf:3d} files  {nt:5d} tensors  {n_events:2d} events  "
                  f"{max(sa, sb):5.1f}s  {status}", flush=True)
    wall = time.time() - t0
    if failed:
        print(f"{len(failed)} of {len(cases)} cases differ ({', '.join(failed)}); {wall:.0f}s")
        sys.exit(1)
    print(f"all {len(cases)} cases identical: {files} files, {tensors} tensors compared bit for bit; {wall:.0f}s")
    return {"cases": len(cases), "files": files, "tensors": tensors, "wall_s": wall}


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, RuntimeError))
