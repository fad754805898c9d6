"""
Does the demo's result hold? `python demo.py --seed=s` (data, base, fine-tune, eval: the first run a
new user makes, with seed s) for several seeds under one or more Python interpreters (each with its
own torch build), and the table of the adapter's held-out accuracy: mean, range, and the largest
distance from the mean. Each result records the git commit and thread count that made it.

    python bench/demo_seeds.py                                              # seeds 0-4, this python
    python bench/demo_seeds.py --pythons=python,/work/venv214/bin/python --jobs=2 --threads=1

Every run gets its own out_dir (out/demo_seeds/<torch>_s<seed>), so each builds its own base, and
the data is prepared once first. --threads sets OMP_NUM_THREADS (0: torch's default, as a user runs
it); on a shared machine one thread a run, several runs at once, wastes less. Results go to
out_dir/results.json, the table to out_dir/table.md.
"""
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from compare import git_commit  # noqa: E402
from configurator import ConfigError, cli, parse_args  # noqa: E402

DEFAULTS = dict(out_dir="out/demo_seeds", pythons=sys.executable, seeds="0,1,2,3,4", jobs=1, threads=0, demo_args="")


def main(argv):
    cfg = parse_args(argv, DEFAULTS, __file__)
    pythons = [p for p in cfg["pythons"].split(",") if p]
    seeds = [int(s) for s in str(cfg["seeds"]).split(",")]
    extra = cfg["demo_args"].split()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(cfg["threads"])} if cfg["threads"] else {}))
    versions = {}
    for py in pythons:
        try:
            versions[py] = subprocess.run([py, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                          text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as e:
            raise ConfigError(f"--pythons: {py}: cannot import torch ({e})") from None
    # the data once, before runs that would all build it at the same time
    subprocess.run([pythons[0], "-c",
                    "import demo, sys; demo.prepare_data(demo.parse_args(sys.argv[1:], demo.DEFAULTS))"]
                   + extra, cwd=ROOT, check=True)
    todo = [(py, s) for py in pythons for s in seeds]
    running, results = [], []
    os.makedirs(cfg["out_dir"], exist_ok=True)
    # runs of earlier invocations in this out_dir stay in the table (rows can be run a piece at a time); a rerun
    # of the same torch and seed replaces its line
    path = os.path.join(cfg["out_dir"], "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            redo = {(versions[py], s) for py, s in todo}
            results = [x for x in json.load(f) if (x["torch"], x["seed"]) not in redo]
    while todo or running:
        while todo and len(running) < cfg["jobs"]:
            py, s = todo.pop(0)
            out = os.path.abspath(os.path.join(cfg["out_dir"], f"{versions[py]}_s{s}"))
            log = open(out + ".log", "w")
            print(f"torch {versions[py]}, seed {s}: {out}.log", flush=True)
            proc = subprocess.Popen([py, "demo.py", f"--seed={s}", f"--out_dir={out}"] + extra, cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, log, py, s, out, time.time()))
        time.sleep(1)
        for item in [x for x in running if x[0].poll() is not None]:
            running.remove(item)
            proc, log, py, s, out, t0 = item
            log.close()
            if proc.returncode:
                raise RuntimeError(f"torch {versions[py]}, seed {s} failed: see {out}.log")
            method = next(d for d in os.listdir(out) if d != "base")
            with open(os.path.join(out, method, "eval", "gsm8k_summary.json")) as f:
                acc = json.load(f)["accuracy"]
            results.append({"torch": versions[py], "seed": s, "accuracy": acc, "wall_s": time.time() - t0,
                            "threads": cfg["threads"] or "default", "commit": git_commit()})
            print(f"  torch {versions[py]}, seed {s}: {100 * acc:.1f}% in {time.time() - t0:.0f}s", flush=True)
            with open(path + ".tmp", "w") as f:  # after each run: an interrupted table keeps what it has
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
    return results, table(results, cfg["out_dir"])


def table(results, out_dir):
    accs = [100 * x["accuracy"] for x in results]
    mean = statistics.fmean(accs)
    by = {(x["torch"], x["seed"]): 100 * x["accuracy"] for x in results}
    seeds, builds = sorted({x["seed"] for x in results}), sorted({x["torch"] for x in results})
    lines = ["| torch | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    lines += [f"| {v} | " + " | ".join(f"{by[v, s]:.1f}%" if (v, s) in by else "-" for s in seeds) + " |"
              for v in builds]
    lines.append(f"\nmean {mean:.1f}%, range {min(accs):.1f}-{max(accs):.1f}%, largest distance from the mean "
                 f"{max(abs(a - mean) for a in accs):.1f} points ({len(accs)} runs)")
    md = "\n".join(lines)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return md


if __name__ == "__main__":
    cli(main, errors=(ValueError, OSError, RuntimeError, subprocess.CalledProcessError))
