"""
The time sandbox.py adds per program: sandbox.run(program) against a bare `python program.py` (same
interpreter, a temp dir as working directory, output to a file), interleaved repeats, medians.

    python bench/bench_sandbox.py              # 20 repeats of each
    python bench/bench_sandbox.py --n=50

The program is a typical MBPP check: a small function and three asserts, done in well under a millisecond,
so the figure is the per-program overhead (interpreter start dominates both sides).
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROGRAM = '''def add(a, b):
    return a + b

assert add(1, 2) == 3
assert add(-1, 1) == 0
assert add(10, 5) == 15
'''


def bare(path, workdir):
    with open(os.path.join(workdir, "out.txt"), "wb") as out:
        return subprocess.run([sys.executable, path], cwd=workdir, stdout=out, stderr=out).returncode == 0


def main(n=20):
    import sandbox
    prefix, drop = sandbox.setup()  # probed once, outside the timing
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "program.py")
        with open(path, "w") as f:
            f.write(PROGRAM)
        times = {"sandbox": [], "bare": []}
        for i in range(n + 2):  # two warm-up rounds, then interleaved
            for name in ("sandbox", "bare") if i % 2 else ("bare", "sandbox"):
                t = time.perf_counter()
                ok = sandbox.run(PROGRAM)["passed"] if name == "sandbox" else bare(path, d)
                if i >= 2:
                    times[name].append(time.perf_counter() - t)
                assert ok, name
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{n} runs each, {os.cpu_count()} CPUs, {'root' if os.geteuid() == 0 else 'user'}, "
          f"namespaces {'on' if prefix else 'off'}, unprivileged uid {'on' if drop else 'off'}")
    print(f"bare python program.py   {med['bare'] * 1e3:7.1f} ms (median)")
    print(f"sandbox.run(program)     {med['sandbox'] * 1e3:7.1f} ms (median)")
    added = 1e3 * (med["sandbox"] - med["bare"])
    print(f"ratio sandbox / bare     {med['sandbox'] / med['bare']:7.2f}   added {added:.1f} ms")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a[2:].split("=") for a in sys.argv[1:])})
