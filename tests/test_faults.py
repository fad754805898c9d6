# The faults of a shared cluster (train.py, rundir.py, eval.py): one live run per out_dir (a lock a dead holder
# does not keep; taken once per torchrun run); preemption by SIGTERM / SIGUSR1 at chosen and at random moments
# (during a prune/expand, during a checkpoint write, a second signal while saving; from outside; on a torchrun
# rank), each a checkpoint, one line and exit 128 + signal, resumed bit-identically; checkpoints by wall time that
# change no number; a full disk (a tmpfs that fills, an injected ENOSPC) as one line naming the file and the last
# good checkpoint; a torchrun rank that leaves its process group in an order that cannot hang, and exits.
import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import beamlora
import cluster
import eval as eval_lib
import peft_io
import rundir
import train
from configurator import ConfigError
from conftest import ROOT, free_port
from test_resume import argv_of, assert_same_run, python, rows, tree
from test_train import cfg_for  # base, demo_data: fixtures in conftest.py

# dt = 4: prune/expand at 4, 8, 12; log rows every 3 steps, scores every 5, checkpoints every 5 (as test_resume's)
KW = dict(max_steps=16, dt=4, p_init=0.6, end_step=16, dropout=0.1, log_interval=3, score_log_interval=5,
          save_interval=5)
HOST = re.escape(socket.gethostname())
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def ckpt_step(d):
    return torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["step"]


@pytest.fixture(scope="module")
def ref_here(base, demo_data, tmp_path_factory):
    """KW's run uninterrupted, in this process (what the runs stopped in this process must equal)."""
    out = tmp_path_factory.mktemp("ref_here") / "out"
    res = train.train(cfg_for(base, demo_data, out, **KW))
    return out, res["wall_s"] / KW["max_steps"]


@pytest.fixture(scope="module")
def ref_sub(base, demo_data, tmp_path_factory):
    """KW's run uninterrupted, as `python train.py` with one thread (what the runs in subprocesses must equal)."""
    out = tmp_path_factory.mktemp("ref_sub") / "out"
    proc = python(os.path.join(ROOT, "train.py"), *argv_of(cfg_for(base, demo_data, out, **KW)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def caught():
    """Real signals in this process: until the test ends, one that comes when no run is listening (a timer firing
    after its run returned) is noted here instead of ending pytest."""
    seen = []
    old = {s: signal.signal(s, lambda n, f: seen.append(n)) for s in cluster.STOP_SIGNALS}
    yield seen
    for s, handler in old.items():
        signal.signal(s, handler)


def signal_during_operation(monkeypatch, step, sig):
    """`sig` to this process in the middle of step `step`'s prune/expand: after the first module's, before the
    second's (Python runs the handler right there, in the main thread)."""
    real_operate, real_pe = beamlora.BeamController.operate, beamlora.BeamController.prune_expand
    seen = {"t": None, "calls": 0}

    def operate(self, t):
        seen.update(t=t, calls=0)
        return real_operate(self, t)

    def prune_expand(self, *args):
        seen["calls"] += 1
        if seen["t"] == step and seen["calls"] == 2:
            os.kill(os.getpid(), sig)
        return real_pe(self, *args)
    monkeypatch.setattr(beamlora.BeamController, "operate", operate)
    monkeypatch.setattr(beamlora.BeamController, "prune_expand", prune_expand)


class FullAfter:
    """A file whose disk fills after `room` more bytes: write() raises ENOSPC (no file name, as the OS's does)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def on_checkpoint_write(monkeypatch, step, action):
    """action(recorder) when the checkpoint of `step` starts writing (recorder: rundir's writer around the file)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "params" in obj and obj["step"] == step:
            action(f)
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


# ---------------------------------------------------------------------------------------------
# preemption

def test_signals_at_chosen_and_random_moments_then_resumed_equals_uninterrupted(base, demo_data, tmp_path,
                                                                               monkeypatch, caught, capsys, ref_here):
    ref, step_s = ref_here
    out = tmp_path / "run"
    cfg = cfg_for(base, demo_data, out, **KW)
    # SIGTERM in the middle of step 8's prune/expand: step 8 ends (its event written), its checkpoint, one line
    with monkeypatch.context() as m:
        signal_during_operation(m, 8, signal.SIGTERM)
        res = train.train(cfg)
    assert res["stopped"] and res["signal"] == signal.SIGTERM and res["steps"] == 8 and ckpt_step(out) == 8
    assert [r["step"] for r in rows(out / "events.jsonl")] == [4, 8]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stopped")]
    assert said == [f"stopped by SIGTERM after step 8: {out}/ckpt.pt holds it and its records; --resume continues"]
    # SIGUSR1 while the checkpoint of step 10 (save_interval) is being written, and SIGTERM later in the same write:
    # the save completes, the run stops there for the first signal, nothing is written twice or torn
    sent = []

    def two_signals(recorder):
        write = recorder.write

        def counted(data):
            sent.append(len(data))
            if len(sent) in (2, 4):
                os.kill(os.getpid(), signal.SIGUSR1 if len(sent) == 2 else signal.SIGTERM)
            return write(data)
        recorder.write = counted
    with monkeypatch.context() as m:
        on_checkpoint_write(m, 10, two_signals)
        res = train.train(dict(cfg, resume=True))
    assert len(sent) > 4 and res["signal"] == signal.SIGUSR1 and res["steps"] == 10 and ckpt_step(out) == 10
    assert "stopped by SIGUSR1 after step 10" in capsys.readouterr().out
    # then at random moments: a timer started with the loop sends SIGTERM or SIGUSR1 within a few steps' time
    seed = random.randrange(10**6)
    rng, timers, stops = random.Random(seed), [], []
    real_arm = cluster.Preemption.arm

    def arm(self):
        real_arm(self)
        timers.append(threading.Timer(rng.uniform(0, 4 * step_s), os.kill,
                                      (os.getpid(), rng.choice(cluster.STOP_SIGNALS))))
        timers[-1].start()
    with monkeypatch.context() as m:
        m.setattr(cluster.Preemption, "arm", arm)
        for _ in range(3):
            res = train.train(dict(cfg, resume=True))
            timers[-1].cancel()
            timers[-1].join()
            stops.append((res["steps"], res.get("signal")))
            if not res.get("signal"):
                break
    if stops[-1][1]:
        train.train(dict(cfg, resume=True))
    assert_same_run(ref, out)
    assert sorted(tree(out)) == sorted(tree(ref)), f"seed {seed}"  # no temp file, no lock left behind
    print(f"random stops (seed {seed}): {stops}")


def test_sigterm_and_sigusr1_from_outside_then_resumed_equals_uninterrupted(base, demo_data, tmp_path, ref_sub):
    # `python train.py` signalled by another process at a random moment: exit 143 (SIGTERM) or 138 (SIGUSR1)
    # and one line; while it runs, a second start on its out_dir (fresh, --overwrite, --resume) stops naming it
    out = tmp_path / "run"
    cfg = cfg_for(base, demo_data, out, **KW)
    rng, stopped = random.Random(), []
    for sig, resume in ((signal.SIGTERM, False), (signal.SIGUSR1, True)):
        with open(tmp_path / "stdout", "w") as log:
            argv = argv_of(dict(cfg, resume=resume))
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], stdout=log,
                                    stderr=subprocess.PIPE, text=True, env=ENV)
        after = stopped[-1] if stopped else 0
        first, pace = wait_for_rows(out, after, proc)  # training, with its handlers set: rows after `after` appear
        if not resume:
            for extra in ({}, {"overwrite": True}, {"resume": True}):
                with pytest.raises(ConfigError, match=rf"^{out}: in use by a live run \(pid {proc.pid} on {HOST}; it "
                                                      rf"holds {out}/run.lock\): wait for it to end or give another "
                                                      "--out_dir$"):
                    train.train(dict(cfg, **extra))
        time.sleep(rng.uniform(0, 2 * pace))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        said = [line for line in open(tmp_path / "stdout").read().splitlines() if line.startswith("stopped")]
        assert proc.returncode == 128 + sig and err == "", (proc.returncode, err[-2000:])
        step = ckpt_step(out)
        assert said == [f"stopped by {sig.name} after step {step}: {out}/ckpt.pt holds it and its records; --resume "
                        "continues"] and step > first
        stopped.append(step)
    proc = python(os.path.join(ROOT, "train.py"), *argv_of(dict(cfg, resume=True)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(ref_sub, out)
    assert sorted(tree(out)) == sorted(tree(ref_sub)), stopped


def wait_for_rows(out, after, proc):
    """Until two record rows of steps after `after` are on disk (the loop runs, its handlers set) -> (the first's
    step, seconds per step between them)."""
    seen, t0 = {}, time.time()
    while len(seen) < 2:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 120
        for name in ("scores.jsonl", "log.jsonl", "events.jsonl"):
            if os.path.exists(out / name):
                for r in rows(out / name):
                    if r["step"] > after and r["step"] not in seen:
                        seen[r["step"]] = time.time()
        time.sleep(0.005)
    (a, ta), (b, tb) = sorted(seen.items())[:2]
    return a, (tb - ta) / (b - a)


# ---------------------------------------------------------------------------------------------
# one live run per out_dir

def test_a_live_run_holds_out_dir_and_a_dead_one_does_not(base, demo_data, tmp_path):
    cfg = cfg_for(base, demo_data, tmp_path / "out", max_steps=4, stop_after=2)
    train.train(cfg)  # a run to resume: ckpt.pt at step 2
    assert not os.path.exists(tmp_path / "out" / rundir.LOCK)  # released (removed) when the run ends
    assert rundir.LOCK not in rundir.RUN_FILES  # not a run's file: --overwrite never deletes it
    hold = ("import sys, time; sys.path.insert(0, sys.argv[1]); import rundir; "
            "rundir.OutDirLock(sys.argv[2], name=sys.argv[3]).acquire(); print('held', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", hold, ROOT, str(tmp_path / "out"), rundir.LOCK],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    before = tree(tmp_path / "out")
    for extra in ({"resume": True}, {"overwrite": True}, {"stop_after": 0}):
        with pytest.raises(ConfigError, match=rf"{tmp_path}/out: in use by a live run \(pid {holder.pid} on {HOST};"):
            train.train(dict(cfg, **extra))
    assert tree(tmp_path / "out") == before  # nothing touched
    proc = python(os.path.join(ROOT, "train.py"), *argv_of(dict(cfg, resume=True)))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path}/out: in use by a live run (pid {holder.pid} on ")
    holder.kill()  # SIGKILL: its lock file stays, with its pid, but the kernel dropped the lock
    holder.wait()
    assert open(tmp_path / "out" / rundir.LOCK).read() == f"{holder.pid} {socket.gethostname()}\n"
    assert train.train(dict(cfg, resume=True, stop_after=0))["steps"] == 4
    assert not os.path.exists(tmp_path / "out" / rundir.LOCK)
    # eval.py: one evaluation at a time writes into --out, taken before the model loads
    ev = tmp_path / "eval"
    args = [f"--model={base}", "--task=gsm8k", "--limit=1", f"--data={os.path.join(demo_data, 'test.jsonl')}",
            f"--out={ev}", "--max_new_tokens=2", "--device=cpu"]
    holder = subprocess.Popen([sys.executable, "-c", hold, ROOT, str(ev), "eval.lock"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(eval_lib.EvalError, match=rf"{ev}: in use by a live run \(pid {holder.pid} on {HOST};.*--out$"):
        eval_lib.main(args)
    assert os.listdir(ev) == ["eval.lock"]
    holder.kill()
    holder.wait()
    assert eval_lib.main(args)["n"] == 1 and sorted(os.listdir(ev)) == ["gsm8k_samples.jsonl", "gsm8k_summary.json"]


def test_the_lock_file_is_never_shared(tmp_path):
    # a run that opened the lock file just before its holder removed it locks the new file, never the removed one
    d = tmp_path / "out"
    first = rundir.OutDirLock(str(d))
    first.acquire()
    fd = os.open(first.path, os.O_RDWR)  # a second run's open, before the holder ends
    first.release()
    assert not os.path.exists(first.path) and not os.path.exists(d)  # the lock's own directory goes too: empty
    second = rundir.OutDirLock(str(d))
    second.acquire()
    try:  # the stale descriptor locks (its file is gone), but a third run still meets the second's lock
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match=rf"pid {os.getpid()} on {HOST}"):
            rundir.OutDirLock(str(d)).acquire()
    finally:
        os.close(fd)
        second.release()


# ---------------------------------------------------------------------------------------------
# checkpoints by wall time

def test_checkpoints_by_time_change_no_number_and_cost_at_most_one_percent(base, demo_data, tmp_path, monkeypatch,
                                                                          ref_here):
    ref, _ = ref_here
    saves = []
    real = train.atomic_save

    def atomic_save(obj, path, tmp=None):
        saves.append(obj["step"])
        real(obj, path, tmp)
    monkeypatch.setattr(train, "atomic_save", atomic_save)
    # a checkpoint after every step (the 1% floor off): the same run, bit for bit
    monkeypatch.setattr(cluster, "SAVE_COST", float("inf"))
    train.train(cfg_for(base, demo_data, tmp_path / "every", **dict(KW, save_interval=0, save_interval_min=1e-9)))
    assert saves == list(range(1, 17))
    assert_same_run(ref, tmp_path / "every")
    ck = torch.load(tmp_path / "every" / "ckpt.pt", weights_only=True)
    assert json.loads(ck["config"])["save_interval_min"] == 1e-9  # recorded, as every setting
    # with the floor: a checkpoint that takes 0.5 s is followed by none for 100 x 0.5 s (the run takes a few)
    monkeypatch.setattr(cluster, "SAVE_COST", 0.01)
    saves.clear()

    def slow(obj, path, tmp=None):
        time.sleep(0.5)
        atomic_save(obj, path, tmp)
    monkeypatch.setattr(train, "atomic_save", slow)
    train.train(cfg_for(base, demo_data, tmp_path / "slow", **dict(KW, save_interval=0, save_interval_min=1e-9)))
    assert saves == [1, 16]  # the first after step 1, then the final one
    assert "save_interval_min" in train.MAY_CHANGE_ON_RESUME and train.DEFAULTS["save_interval_min"] == 30.0


# ---------------------------------------------------------------------------------------------
# a full disk

def test_a_failed_write_names_the_file_and_the_last_good_checkpoint(base, demo_data, tmp_path, monkeypatch, ref_here):
    ref, _ = ref_here
    out = tmp_path / "run"
    cfg = cfg_for(base, demo_data, out, **KW)
    full = "cannot write \\(No space left on device\\)"
    real_append = train.append_jsonl

    def fills_at(name, step):
        def append(path, row):
            if os.path.basename(path) == name and row["step"] == step:
                with open(path, "a") as f:
                    f.write(json.dumps(row)[:10])  # what fit
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file
            real_append(path, row)
        return append
    # the first row of the run, scores.jsonl's of step 1: nothing to resume yet
    with monkeypatch.context() as m:
        m.setattr(train, "append_jsonl", fills_at("scores.jsonl", 1))
        with pytest.raises(rundir.WriteError, match=rf"^{out}/scores.jsonl: {full}; no checkpoint yet: the run starts "
                                                    "over with --overwrite$"):
            train.train(cfg)
    assert not os.path.exists(out / rundir.LOCK)
    # the checkpoint of step 10 (its temp file, removed again: ckpt.pt stays step 5's)
    with monkeypatch.context() as m:
        on_checkpoint_write(m, 10, lambda recorder: setattr(recorder, "f", FullAfter(recorder.f, 5000)))
        with pytest.raises(rundir.WriteError, match=rf"^{out}/ckpt.pt.tmp: {full}; the last good checkpoint is step 5 "
                                                    rf"\({out}/ckpt.pt\); --resume continues from it$"):
            train.train(dict(cfg, overwrite=True))
    assert ckpt_step(out) == 5 and not os.path.exists(out / "ckpt.pt.tmp")
    # log.jsonl's row of step 12, half written
    with monkeypatch.context() as m:
        m.setattr(train, "append_jsonl", fills_at("log.jsonl", 12))
        with pytest.raises(rundir.WriteError, match=rf"^{out}/log.jsonl: {full}; the last good checkpoint is step 10 "):
            train.train(dict(cfg, resume=True))
    # the adapter, after the final checkpoint: --resume redoes only the export
    def save_safetensors(tensors, path, metadata=None):
        with open(path + ".tmp", "wb") as f:
            f.write(b"what fit")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(peft_io, "save_safetensors", save_safetensors)
        with pytest.raises(rundir.WriteError, match=rf"^{out}/adapter/adapter_model.safetensors.tmp: {full}; the last "
                                                    rf"good checkpoint is step 16 \({out}/ckpt.pt\)"):
            train.train(dict(cfg, resume=True))
    assert not os.path.exists(out / "adapter" / "adapter_model.safetensors.tmp")  # its space given back
    train.train(dict(cfg, resume=True))
    assert_same_run(ref, out)
    assert sorted(tree(out)) == sorted(tree(ref))


def can_mount_tmpfs():
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not can_mount_tmpfs(), reason="no tmpfs to mount (unshare -rm: no user namespaces here)")
def test_a_disk_that_fills_during_the_run(base, demo_data, tmp_path, ref_sub):
    # out_dir on a 200 KiB tmpfs (a mount namespace of its own): checkpoint 5 (130 KiB) fits, checkpoint 10 does
    # not beside it. The run stops with one line; what it left is copied out and resumed on a disk with room
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    argv = " ".join(f"'{a}'" for a in argv_of(cfg_for(base, demo_data, mnt / "out", **KW)))
    script = (f"mount -t tmpfs -o size=200k tmpfs {mnt} && {sys.executable} {ROOT}/train.py {argv} 2>{tmp_path}/err; "
              f"echo $? > {tmp_path}/rc; cp -a {mnt}/out {copy}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    err = open(tmp_path / "err").read()
    assert open(tmp_path / "rc").read() == "1\n" and err.count("\n") == 1, err
    m = re.fullmatch(rf"error: {mnt}/out/(\S+): cannot write \(No space left on device\); the last good checkpoint is "
                     rf"step (\d+) \({mnt}/out/ckpt.pt\); --resume continues from it\n", err)
    assert m and int(m[2]) == ckpt_step(copy) == 5, err
    proc = python(os.path.join(ROOT, "train.py"), *argv_of(cfg_for(base, demo_data, copy, resume=True, **KW)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_run(ref_sub, copy)


# ---------------------------------------------------------------------------------------------
# torchrun

def torchrun(script_args, cfg, tmp_path, name):
    """torchrun, 2 processes (gloo), cfg as a config file -> (the process, seconds from the last file written in
    out_dir to torchrun's exit)."""
    path = tmp_path / f"{name}.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in cfg.items() if v != train.DEFAULTS[k]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", *script_args, str(path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    done = time.time()
    last = max(os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(cfg["out_dir"]) for f in fs)
    return proc, done - last


def test_torchrun_preempted_on_one_rank_stops_every_rank_and_resumes_bit_identically(base, demo_data, tmp_path):
    kw = dict(KW, micro_batch_size=2)
    ref, out, report = tmp_path / "ref", tmp_path / "run", tmp_path / "report"
    report.mkdir()
    proc, exit_s = torchrun([os.path.join(ROOT, "train.py")], cfg_for(base, demo_data, ref, **kw), tmp_path, "ref")
    assert proc.returncode == 0 and exit_s < 15, (exit_s, proc.stderr[-3000:])
    # SIGTERM to rank 0 in the middle of step 8's prune/expand, none to rank 1: both stop after step 8 (the flag's
    # all_reduce), rank 0 checkpoints, both exit 143. Rank 1 meets rank 0's lock: one lock per run
    spec = {"signals": [{"signal": "SIGTERM", "rank": 0, "at": "op", "step": 8}], "report": str(report),
            "lock_check": {"rank": 1, "step": 3, "out_dir": str(out)}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc, exit_s = torchrun([os.path.join(ROOT, "tests", "faults_child.py"), str(tmp_path / "spec.json")],
                            cfg_for(base, demo_data, out, **kw), tmp_path, "run")
    ranks = [json.load(open(report / f"{r}.json")) for r in (0, 1)]
    assert proc.returncode != 0 and [r["code"] for r in ranks] == [143, 143], proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 8" in proc.stdout and ckpt_step(out) == 8 and exit_s < 15
    assert ranks[1]["lock"] == f"{ranks[0]['pid']} {socket.gethostname()}\n"
    assert re.match(rf"{out}: in use by a live run \(pid {ranks[0]['pid']} on ", ranks[1]["refused"])
    proc, exit_s = torchrun([os.path.join(ROOT, "train.py")], cfg_for(base, demo_data, out, resume=True, **kw),
                            tmp_path, "resume")
    assert proc.returncode == 0 and exit_s < 15, (exit_s, proc.stderr[-3000:])
    assert_same_run(ref, out)
    assert sorted(tree(out)) == sorted(tree(ref))


@pytest.mark.parametrize("how", ["finished", "stop_after", "signal"])
def test_ddp_teardown_frees_the_wrapper_before_the_process_group(base, demo_data, tmp_path, monkeypatch, caught, how):
    # in this process, a process group of one (gloo): when destroy_process_group runs, no DistributedDataParallel
    # object is left (its reducer would otherwise free the group later, where a rank can hang) and the barrier
    # has run, on every way out of the loop
    from torch.nn.parallel import DistributedDataParallel
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)
    calls = []
    real_barrier, real_destroy = torch.distributed.barrier, torch.distributed.destroy_process_group

    def barrier(*a, **k):
        calls.append("barrier")
        return real_barrier(*a, **k)

    def destroy(*a, **k):
        import gc
        gc.collect()
        calls.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        return real_destroy(*a, **k)
    monkeypatch.setattr(torch.distributed, "barrier", barrier)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", destroy)
    if how == "signal":
        signal_during_operation(monkeypatch, 4, signal.SIGUSR1)
    res = train.train(cfg_for(base, demo_data, tmp_path / how, max_steps=8, stop_after=5 if how == "stop_after" else 0))
    assert res["steps"] == {"finished": 8, "stop_after": 5, "signal": 4}[how]
    assert calls == ["barrier", 0] and not torch.distributed.is_initialized()


def test_demo_ends_where_a_preempted_run_stopped():
    # `python train.py` (the demo) preempted while it pretrains its base: it exits as train.py would (143 for
    # SIGTERM), not on to a fine-tune of a base that was never finished
    import demo
    with pytest.raises(SystemExit) as e:
        demo.stopped({"stopped": True, "signal": signal.SIGTERM, "steps": 61})
    assert e.value.code == 143
    assert demo.stopped({"steps": 3}) == {"steps": 3}
