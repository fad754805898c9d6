"""
python tests/faults_child.py SPEC.json [train.py arguments]: train.py run as __main__ in this process, as
`python train.py` and torchrun run it (exit_at_once included), with real signals sent to this process at
chosen points of the run (for test_faults.py). The points are set by wrapping what train.py calls, so
train.py carries no test hook. SPEC, a JSON object (every key optional):
    signals     [{"signal": "SIGTERM", "rank": 0, "at": "op" | "save", "step": N}, ...]
                op: during the prune/expand of step N (after the first module's, before the next one's);
                save: during the write of the checkpoint of step N (after torch.save's second write)
    lock_check  {"rank": 1, "step": N, "out_dir": D}: that rank, after optimizer step N, reads D/run.lock and
                tries to take it itself (it must be refused: rank 0 holds it for the run)
    report      a directory: each rank writes <rank>.json there as it exits: its pid, exit code, the time
                (time.time()) of the exit, and lock_check's findings
"""
import json
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import beamlora  # noqa: E402
import rundir  # noqa: E402
from configurator import ConfigError  # noqa: E402

spec_path, argv = sys.argv[1], sys.argv[2:]
with open(spec_path) as f:
    spec = json.load(f)
rank = int(os.environ.get("RANK", 0))
mine = [s for s in spec.get("signals", []) if s.get("rank", 0) == rank]
found = {"pid": os.getpid()}


def send(s):
    # delivered to this process; Python runs train.py's handler in the main thread at the next bytecode: here
    os.kill(os.getpid(), signal.Signals[s["signal"]])


real_operate, real_prune_expand, real_step = (beamlora.BeamController.operate, beamlora.BeamController.prune_expand,
                                              beamlora.BeamController.step)


def operate(self, t):
    self.fault_t, self.fault_calls = t, 0
    return real_operate(self, t)


def prune_expand(self, m, P, E, h):
    self.fault_calls += 1
    for s in mine:
        if s["at"] == "op" and s["step"] == self.fault_t and self.fault_calls == 2:
            send(s)
    return real_prune_expand(self, m, P, E, h)


def step(self, t):
    check = spec.get("lock_check")
    if check and check["rank"] == rank and check["step"] == t:
        out_dir = check["out_dir"]
        with open(os.path.join(out_dir, rundir.LOCK)) as f:
            found["lock"] = f.read()
        try:
            rundir.OutDirLock(out_dir).acquire()
            found["refused"] = None
        except ConfigError as e:
            found["refused"] = str(e)
    return real_step(self, t)


real_save = torch.save


def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "params" in obj and hasattr(f, "write"):
        due = [s for s in mine if s["at"] == "save" and s["step"] == obj["step"]]
        if due:
            write, calls = f.write, [0]

            def counted(data):
                calls[0] += 1
                if calls[0] == 2:
                    for s in due:
                        send(s)
                return write(data)
            f.write = counted
    return real_save(obj, f, *args, **kwargs)


real_exit = os._exit


def report_exit(code):
    if spec.get("report"):
        found.update(code=code, t=time.time())
        with open(os.path.join(spec["report"], f"{rank}.json"), "w") as f:
            json.dump(found, f)
    real_exit(code)


beamlora.BeamController.operate, beamlora.BeamController.prune_expand = operate, prune_expand
beamlora.BeamController.step = step
torch.save, os._exit = save, report_exit
sys.argv = [os.path.join(ROOT, "train.py"), *argv]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")  # under torchrun it ends in os._exit: report_exit
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
report_exit(code)
