"""
A finished torchrun run exits: RUNS two-process gloo runs of train.py (a tiny BeamLoRA fine-tune with its
prune/expand operations, as users run it: `torchrun --nproc_per_node=2 train.py config.py`), next to LOAD busy
processes, each timed from the last file it wrote to each rank's exit and to torchrun's. A run still alive TIMEOUT
seconds after it started is a hang: killed, and reported as one. The hang this guards against is rare (1 run in
22 before cluster.end_ddp's order: the DDP reducer freed after the process group, pytorch issues 56297 / 75097), so
a clean loop is a check, not the proof: the order is right by construction (cluster.end_ddp, cluster.exit_at_once;
tests/test_faults.py checks it on every way out of the loop).

Also measured in every run: the per-step all_reduce that lets the ranks agree on a stop (SIGTERM / SIGUSR1) and on a
time-based checkpoint (cluster.Preemption.agreed): alone, with the ranks in step (SYNC_CALLS calls before the loop:
its cost), as a share of a step; and the time spent in it inside the loop, which also holds rank 1's wait for rank
0's record writes (a wait the next collective would have had otherwise), as a share of the loop.

    python bench/ddp_exit.py                                   # 20 runs next to 2 busy processes (~5 minutes)
    python bench/ddp_exit.py --runs=50 --load=4 --out_json=bench/results/ddp_exit.json

Each rank runs train.py as __main__ through this file's --child mode, which only times Preemption.agreed and notes
the moment the process ends (os._exit, which train.py's exit_at_once calls under torchrun).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SYNC_CALLS = 200  # the all_reduce timed alone before each run's loop
BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

DEFAULTS = dict(
    runs=20,  # two-process torchrun runs, one after the other
    load=2,  # busy processes (a Python loop each) running beside them the whole time
    steps=16,  # --max_steps of each run (BeamLoRA, dt = 4: prune/expand at 4, 8, 12)
    timeout=180.0,  # seconds a run may take before it counts as a hang (and is killed)
    exit_limit=10.0,  # seconds from a run's last file to torchrun's exit that still count as "exits"
    out_json="",  # also write the result here
)


def child(spec_path, argv):
    """Under torchrun: train.py as __main__, with Preemption.agreed timed and the exit's moment noted."""
    import cluster
    import train
    with open(spec_path) as f:
        spec = json.load(f)
    rank, stats = int(os.environ["RANK"]), {"agreed_s": 0.0, "calls": 0}
    real_agreed, real_arm, real_exit = cluster.Preemption.agreed, cluster.Preemption.arm, os._exit

    def agreed(self, *args):
        t = time.perf_counter()
        out = real_agreed(self, *args)
        stats["agreed_s"] += time.perf_counter() - t
        stats["calls"] += 1
        stats["loop_end"] = time.perf_counter()
        return out

    def arm(self):  # every rank, right before the loop: the all_reduce alone, ranks in step, SYNC_CALLS times
        import torch.distributed as dist
        dist.barrier()
        t = time.perf_counter()
        for _ in range(SYNC_CALLS):
            real_agreed(self, True, "cpu", False)
        stats["sync_us"] = 1e6 * (time.perf_counter() - t) / SYNC_CALLS
        dist.barrier()
        stats["loop_start"] = time.perf_counter()
        return real_arm(self)

    def exit_now(code):
        stats.update(code=code, t_exit=time.time())
        with open(os.path.join(spec["report"], f"{rank}.json"), "w") as f:
            json.dump(stats, f)
        real_exit(code)
    cluster.Preemption.agreed, cluster.Preemption.arm, os._exit = agreed, arm, exit_now
    sys.argv = [os.path.join(ROOT, "train.py"), *argv]
    cluster.script(train.main)  # what `torchrun train.py` runs as __main__


def build(work):
    """The tiny base and demo data of tests/test_train.py's fixtures."""
    import importlib.util

    import torch

    from model import Transformer
    from tokenizer import Tokenizer
    spec = importlib.util.spec_from_file_location("demo_prepare", os.path.join(ROOT, "data", "demo", "prepare.py"))
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    data = prep.prepare(os.path.join(work, "data"), seed=1, n_train=64, n_test=8, n_pretrain=400, vocab_size=420)
    n_vocab = Tokenizer(os.path.join(data, "tokenizer.model")).n_words
    cfg = dict(model_type="llama", vocab_size=n_vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
               eos_token_id=2)
    torch.manual_seed(0)
    m = Transformer.from_config(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=1.0 if p.shape[0] == n_vocab else p.shape[1] ** -0.5)
    base = os.path.join(work, "base")
    m.save_pretrained(base)
    shutil.copy(os.path.join(data, "tokenizer.model"), base)
    return base, data


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(i, work, base, data, cfg):
    out, report = os.path.join(work, f"run{i}"), os.path.join(work, f"report{i}")
    os.makedirs(report)
    opts = dict(init_from=base, data=os.path.join(data, "train.jsonl"), out_dir=out, method="beamlora", r=4,
                alpha=8.0, dropout=0.1, batch_size=8, micro_batch_size=2, max_steps=cfg["steps"], dt=4, p_init=0.6,
                end_step=cfg["steps"], lr=1e-2, dtype="float32", device="cpu", log_interval=4, seed=i)
    config = os.path.join(work, f"config{i}.py")
    with open(config, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in opts.items())
    spec = os.path.join(work, f"spec{i}.json")
    with open(spec, "w") as f:
        json.dump({"report": report}, f)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={free_port()}", os.path.abspath(__file__), f"--child={spec}", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=cfg["timeout"])
        hang = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and both ranks
        _, err = proc.communicate()
        hang = True
    t_end = time.time()
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    last = max(map(os.path.getmtime, files)) if files else None
    ranks = []
    for r in (0, 1):
        try:
            with open(os.path.join(report, f"{r}.json")) as f:
                ranks.append(json.load(f))
        except OSError:
            ranks.append(None)  # this rank never reached its exit
    row = {"run": i, "code": proc.returncode, "hang": hang, "wall_s": t_end - t0,
           "torchrun_exit_after_s": None if last is None else t_end - last,
           "rank_exit_after_s": [None if r is None or last is None else r["t_exit"] - last for r in ranks],
           "rank_codes": [None if r is None else r["code"] for r in ranks],
           "sync_us": [None if r is None else r["sync_us"] for r in ranks],
           "step_ms": [None if r is None or "loop_end" not in r else
                       1e3 * (r["loop_end"] - r["loop_start"]) / r["calls"] for r in ranks],
           "in_loop_share": [None if r is None or "loop_end" not in r else
                             r["agreed_s"] / (r["loop_end"] - r["loop_start"]) for r in ranks]}
    row["sync_share"] = [None if a is None or b is None else a / (1e3 * b) for a, b in zip(row["sync_us"],
                                                                                        row["step_ms"])]
    if proc.returncode != 0 and not hang:
        row["stderr"] = err[-1500:]
    return row


def main(argv):
    if argv and argv[0].startswith("--child="):
        return child(argv[0][len("--child="):], argv[1:])
    from configurator import ConfigError, parse_args
    cfg = parse_args(argv, DEFAULTS, __file__)
    if cfg["runs"] < 1 or cfg["load"] < 0 or cfg["steps"] < 4 or cfg["timeout"] <= 0:
        raise ConfigError("--runs >= 1, --load >= 0, --steps >= 4 and --timeout > 0")
    work = tempfile.mkdtemp(prefix="ddp_exit_")
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cfg["load"])]
    rows = []
    try:
        base, data = build(work)
        print(f"{cfg['runs']} two-process gloo runs of train.py ({cfg['steps']} steps each) beside {cfg['load']} busy "
              f"processes; seconds from the last file written to each rank's exit and to torchrun's", flush=True)
        for i in range(cfg["runs"]):
            row = one_run(i, work, base, data, cfg)
            rows.append(row)
            ok = not row["hang"] and row["code"] == 0 and row["torchrun_exit_after_s"] <= cfg["exit_limit"]
            fmt = lambda xs: ", ".join("-" if x is None else f"{x:.2f}" for x in xs)  # noqa: E731
            print(f"run {i + 1:2d}: {'ok  ' if ok else 'FAIL'} exit code {row['code']}"
                  f"{' HANG (killed)' if row['hang'] else ''}, ranks exited {fmt(row['rank_exit_after_s'])} s and "
                  f"torchrun {fmt([row['torchrun_exit_after_s']])} s after the last file; the all_reduce "
                  f"{fmt(row['sync_us'])} us = {fmt([100 * x for x in row['sync_share'] if x is not None])} % of a "
                  f"{fmt(row['step_ms'])} ms step (in the loop, waits included: "
                  f"{fmt([100 * x for x in row['in_loop_share'] if x is not None])} %)", flush=True)
            if "stderr" in row:
                print(row["stderr"])
    finally:
        for p in load:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    good = [r for r in rows if not r["hang"] and r["code"] == 0]
    tr = [r["torchrun_exit_after_s"] for r in good]
    ranks = [x for r in good for x in r["rank_exit_after_s"] if x is not None]
    us = [x for r in good for x in r["sync_us"] if x is not None]
    share = [x for r in good for x in r["sync_share"] if x is not None]
    in_loop = [x for r in good for x in r["in_loop_share"] if x is not None]
    summary = {"runs": len(rows), "clean": sum(r["torchrun_exit_after_s"] <= cfg["exit_limit"] for r in good),
               "hangs": sum(r["hang"] for r in rows), "failed": len(rows) - len(good) - sum(r["hang"] for r in rows),
               "rank_exit_after_s": {"median": statistics.median(ranks), "max": max(ranks)} if ranks else None,
               "torchrun_exit_after_s": {"median": statistics.median(tr), "max": max(tr)} if tr else None,
               "all_reduce_us": {"median": statistics.median(us), "max": max(us)} if us else None,
               "all_reduce_share_of_step": {"median": statistics.median(share), "max": max(share)} if share else None,
               "in_loop_share": {"median": statistics.median(in_loop), "max": max(in_loop)} if in_loop else None,
               "load": cfg["load"], "steps": cfg["steps"]}
    print(f"{summary['clean']} of {len(rows)} runs exited within {cfg['exit_limit']:.0f} s of their last file "
          f"({summary['hangs']} hangs, {summary['failed']} failed)"
          + (f"; ranks: median {summary['rank_exit_after_s']['median']:.2f} s, max "
             f"{summary['rank_exit_after_s']['max']:.2f} s; torchrun: median "
             f"{summary['torchrun_exit_after_s']['median']:.2f} s, max {summary['torchrun_exit_after_s']['max']:.2f} s"
             f"; the stop/save all_reduce: median {summary['all_reduce_us']['median']:.0f} us, "
             f"{100 * summary['all_reduce_share_of_step']['median']:.2f} % of a step (max "
             f"{100 * summary['all_reduce_share_of_step']['max']:.2f} %); in the loop, waits for rank 0 included: "
             f"median {100 * summary['in_loop_share']['median']:.2f} %" if good else ""))
    if cfg["out_json"]:
        import rundir
        rundir.atomic_json({"summary": summary, "runs": rows}, cfg["out_json"])
    if summary["clean"] < len(rows):
        sys.exit(1)
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("--child="):
        main(sys.argv[1:])
    else:
        from configurator import cli
        cli(main)
