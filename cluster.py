"""
What a shared cluster does to a run, for train.py: torchrun's processes that must agree, preemption signals,
checkpoints by wall time, and a finished process that must exit. None of it changes what a run computes.

    setup_ddp(cfg)      join torchrun's process group (one GPU per process) -> (ddp, rank, world)
    Preemption          SIGTERM / SIGUSR1 only noted, read after each optimizer step; agreed(): under DDP every
                        process stops, and saves, at the same step (one all_reduce of two numbers)
    CheckpointClock     when to checkpoint: every save_interval steps, or save_interval_min of wall time (never sooner
                        than 100 times the last write, so saving costs at most 1% of the run: bench/bench_checkpoint.py)
    rng_states          each process's random state, for a checkpoint (dropout draws differ by process)
    check_replicas      every process holds the same trained weights
    end_ddp             leave the process group in an order that cannot hang
    script              a script's entry under torchrun: the process ends at once when the run is done
"""
import gc
import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from configurator import cli

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # a preemption (SLURM, Kubernetes: SIGTERM; SLURM --signal: USR1)
SAVE_COST = 0.01  # a time-based checkpoint waits for at least 1 / SAVE_COST times the last one's write time


def setup_ddp(cfg):
    """Under torchrun: join the process group, one GPU per process. -> (ddp, rank, world)"""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1
    dist.init_process_group(backend="nccl" if cfg["device"].startswith("cuda") else "gloo")
    if cfg["device"].startswith("cuda"):
        cfg["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg["device"])
    return True, dist.get_rank(), dist.get_world_size()


class Preemption:
    """SIGTERM / SIGUSR1 from the loop's start to train()'s return: the handler only notes the first signal (so a
    second one, during the checkpoint it causes, changes nothing: that save and every other is a temp file renamed
    into place); the loop reads it after each optimizer step. Before the loop the signals keep their own action (this
    run has done no step to save); after the last step the run finishes (its final checkpoint first; a kill during
    the export is what --resume redoes). Only the main thread may set handlers (train() in another thread: none)."""

    def __init__(self):
        self.signum, self.old = 0, {}

    def arm(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self.note) for s in STOP_SIGNALS}

    def note(self, signum, frame):
        self.signum = self.signum or signum

    def disarm(self):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        self.old = {}

    def agreed(self, ddp, device, save):
        """-> (the signal every process stops for after this step, or 0; whether every process checkpoints now).
        Under DDP the largest signal any process has seen, and process 0's `save` (a time-based checkpoint is its
        clock's call): one all_reduce of two numbers per step (bench/ddp_exit.py measures it), so that every process
        stops, and saves, at the same step. Else this process's own."""
        if not ddp:
            return self.signum, save
        flag = torch.tensor([self.signum, int(save)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag[0]), bool(flag[1])


class CheckpointClock:
    """When to checkpoint: by steps (save_interval) or by wall time (save_interval_min since the last one, or since
    the loop's start), and never sooner than 1 / SAVE_COST times the last write, however slow the disk. Read from
    the clock only: it decides when to save, never what is computed."""

    def __init__(self, cfg, total, step):
        self.steps, self.minutes, self.total = cfg["save_interval"], cfg["save_interval_min"], total
        self.step, self.at, self.took = step, time.time(), 0.0  # the last checkpoint: its step, when, how long

    def due(self, step):
        if step >= self.total:  # the final checkpoint follows the loop
            return False
        if self.steps and step % self.steps == 0:
            return True
        wait = max(60 * self.minutes, self.took / SAVE_COST)
        return self.minutes > 0 and time.time() - self.at >= wait

    def saved(self, step, started):
        self.step, self.at, self.took = step, time.time(), time.time() - started


def rng_states(world, cuda):
    """Every process's (cpu, cuda or None) random state, gathered: under DDP each draws its own dropout masks, so a
    resume on as many processes needs each one's. Called by every process at the same step."""
    states = [None] * world
    dist.all_gather_object(states, (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None))
    return states


def check_replicas(params, rank):
    """Every process holds the same trained parameters as process 0 (sums and sums of squares, in fp64)."""
    sums = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for p in params])
    ref = sums.clone()
    dist.broadcast(ref, 0)
    if not torch.equal(sums, ref):
        raise RuntimeError(f"process {rank}: trained parameters differ from process 0's")


def end_ddp(wrapper=None):
    """Leaves the process group in an order that cannot hang. A DDP wrapper still alive when the group is destroyed
    keeps its reducer, whose deallocation later (when train() returns, or at the garbage collector's whim) drops the
    last reference to the destroyed gloo group: the group's destructor then joins a worker thread that waits for the
    GIL this thread holds, and the process hangs for good (pytorch issues 56297, 75097; 1 of 22 2-process runs here).
    So: the caller drops its references to the wrapper, the collector frees any cycle still holding it (checked:
    `wrapper` is a weakref to it), the barrier waits until every process got here and the group's outstanding work
    is done, and only then is the group destroyed, with nothing left that refers to it."""
    gc.collect()
    if wrapper is not None and wrapper() is not None:
        raise RuntimeError("end_ddp: the DDP wrapper is still referenced; destroying the process group now could "
                           "hang this process when it is freed later")
    dist.barrier()
    dist.destroy_process_group()


def exit_at_once(code):
    """Under torchrun, after the run (its files written and closed, the process group destroyed): the process ends
    here, with its exit code, without the interpreter's teardown. That teardown frees whatever is left in any order
    (a late destructor of a torch.distributed object, a thread join) and is where a finished rank could still hang;
    nothing the run wrote is lost by skipping it (only Python's own buffers, flushed here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def script(main):
    """A script's entry: main() through configurator.cli (bad input: one line, no traceback; BEAMLORA_DEBUG=1 shows
    it); under torchrun the process then ends in exit_at_once, whatever happened."""
    if int(os.environ.get("RANK", -1)) == -1:
        return cli(main)
    code = 1
    try:
        cli(main)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        exit_at_once(code)
