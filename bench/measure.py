"""
What the bench scripts share: a measurement in a child process of its own (a clean peak memory), and the
timing of a run's steps. (Not named common.py: data/common.py is imported as `common`, in the same test session.)

    res = run_child(__file__, spec, "ours LoRA")   # parent: python SCRIPT --child=SPEC.json -> its result dict
    ...
    reset_peak_rss()                               # child: after the imports
    base = peak_rss()
    ...
    print_result({"peak_mem": peak_rss() - base})  # child: the last line the parent reads
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(script, args, what):
    """`python SCRIPT ARGS` with the repository root as working directory -> the dict the child printed last with
    print_result. A child that fails or prints none: RuntimeError naming `what`, with the end of its output."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *args], capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what}: child failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_child_spec(script, spec, what):
    """run_child with the spec (a JSON-able dict) in a temporary file, given as --child=FILE."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        return run_child(script, [f"--child={f.name}"], what)
    finally:
        os.remove(f.name)


def print_result(obj):
    print("RESULT " + json.dumps(obj))


def reset_peak_rss():
    """Restart this process's high-water mark (VmHWM) at its current RSS: the imports' transient peak can exceed a
    small model's footprint. Linux only; elsewhere nothing happens."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss():
    """This process's peak RSS in bytes (train.py's reading: VmHWM, not the ru_maxrss a child inherits)."""
    import meter
    return meter.peak_rss_gib() * 2**30


def timed(run, steps, batch):
    """Seconds per step of run.step(*batch) over `steps` steps (CUDA synchronised around them)."""
    import torch
    cuda = getattr(run, "device", "cpu").startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        run.step(*batch)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps
