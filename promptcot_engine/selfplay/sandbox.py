"""Run one untrusted Python program on one input, with limits; used to execute model-written solutions.

Layers, from the kernel up:
- A separate process: a fresh interpreter in isolated mode (`python -I -B`: no environment variables,
  no user site, no current directory on sys.path, no .pyc writes), in its own session so the wall-time
  kill takes the whole process group.
- Resource limits set in the child before the program runs: RLIMIT_AS (memory), RLIMIT_CPU (a CPU-time
  backstop a little above the wall-time limit), RLIMIT_FSIZE (caps every file it writes, stdout and
  stderr included: they are files here, so an output flood stops at the cap), RLIMIT_NOFILE, and no
  core dumps. RLIMIT_NPROC is not set: Linux counts it per real user over the whole machine and does
  not apply it to root, so no fixed value is both safe and meaningful; process creation is stopped by
  the audit hook below.
- A network namespace (`unshare --net`) where the kernel allows it (it needs CAP_SYS_ADMIN, which
  root has in this project's containers): the program sees only a loopback interface that is down,
  so no address at all is reachable. `isolation()` says whether this machine has it.
- A fresh temporary working directory (also HOME and TMPDIR), removed afterwards.
- A Python audit hook, installed by a bootstrap before the program's first line, that ends the program
  with status "blocked" on: any socket use; process creation or signalling (subprocess, os.system,
  os.exec*, os.spawn*, os.posix_spawn, os.fork, os.kill); loading native code through ctypes or the raw
  _posixsubprocess module; changing resource limits other than the stack size; link/symlink creation;
  and writes, removals, renames and mode changes outside the working directory (/dev/null, /dev/stdout
  and /dev/stderr excepted). Merely importing subprocess counts: it loads _posixsubprocess, whose
  fork_exec raises no audit event of its own. A refusal ends the process at once (os._exit), so the
  program cannot catch it and carry on. The hook keeps its own references to the functions it calls,
  so rebinding names in `os` or `builtins` does not change its decisions, and it cannot be removed.
  Reading is not restricted (the interpreter must read its library): a program can print any file
  this user can read, but its output only comes back to the caller.

Threat model: this contains mistakes and naive misbehaviour of model-written programs (runaway loops,
memory or output floods, stray file writes, network calls, spawning). It is not a boundary against a
determined attacker: Python-level hooks can be escaped by native code (a crafted extension module,
memory corruption through an interpreter bug), and then the process runs with this process's user
and can write wherever that user can. The kernel-level layers (resource limits, the network
namespace, the process-group kill) still hold. For hostile code, run the engine as an unprivileged
user or inside a container or VM made for it.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# Exit codes the bootstrap reserves; a program that exits with one itself is misreported.
BLOCKED_EXIT = 86
MEMORY_EXIT = 87
_MAX_OUTPUT_BYTES = 8 << 20
_MAX_OPEN_FILES = 64


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "ok" | "timeout" | "memory" | "runtime_error" | "blocked"
    returncode: int | None  # negative: killed by that signal
    stdout: str
    stderr: str
    elapsed: float  # wall seconds, interpreter start-up included


@dataclass(frozen=True)
class Isolation:
    network_namespace: bool


@functools.cache
def isolation() -> Isolation:
    """What kernel-level isolation this machine gives the sandbox (probed once)."""
    try:
        probe = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, timeout=30)
        return Isolation(network_namespace=probe.returncode == 0)
    except (OSError, subprocess.TimeoutExpired):
        return Isolation(network_namespace=False)


def run_python(program: str, stdin: str = "", *, timeout: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = _MAX_OUTPUT_BYTES) -> SandboxResult:
    """Run `program` with `stdin` as its standard input; stdout and stderr come back decoded as UTF-8."""
    root = tempfile.mkdtemp(prefix="promptcot-sandbox-")
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        with open(os.path.join(workdir, "solution.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(root, "stdin"), "w+b") as stdin_file, \
                open(os.path.join(root, "stdout"), "w+b") as stdout_file, \
                open(os.path.join(root, "stderr"), "w+b") as stderr_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            limits = [math.ceil(timeout) + 1, memory_mb << 20, max_output_bytes, _MAX_OPEN_FILES]
            command = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, *map(str, limits)]
            if isolation().network_namespace:
                command = ["unshare", "--net", "--", *command]
            env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
                   # One BLAS/OpenMP thread: their per-thread arenas would eat the RLIMIT_AS budget.
                   "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
            started = time.monotonic()
            process = subprocess.Popen(command, stdin=stdin_file, stdout=stdout_file, stderr=stderr_file,
                                       cwd=workdir, env=env, start_new_session=True)
            timed_out = False
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if process.returncode is None:
                    # Not reaped yet, so the group id cannot have been reused: safe to kill the group.
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            elapsed = time.monotonic() - started
            stdout = _read_back(stdout_file)
            stderr = _read_back(stderr_file)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return SandboxResult(_status(process.returncode, timed_out), process.returncode, stdout, stderr, elapsed)


def _read_back(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", errors="replace")


def _status(returncode: int, timed_out: bool) -> str:
    if timed_out or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return "timeout"  # SIGXCPU / SIGKILL: the CPU-time limit, soft then hard
    if returncode == BLOCKED_EXIT:
        return "blocked"
    if returncode == MEMORY_EXIT:
        return "memory"
    return "ok" if returncode == 0 else "runtime_error"


# Runs in the child as `python -I -B -c _BOOTSTRAP cpu_seconds memory_bytes fsize nofile`, in the
# working directory that holds solution.py.
_BOOTSTRAP = r'''
import os, resource, sys

def _limit(kind, value):
    resource.setrlimit(kind, (value, value))

_cpu, _memory, _fsize, _nofile = map(int, sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
_limit(resource.RLIMIT_AS, _memory)
_limit(resource.RLIMIT_FSIZE, _fsize)
_limit(resource.RLIMIT_NOFILE, _nofile)
_limit(resource.RLIMIT_CORE, 0)

with open("solution.py", encoding="utf-8") as _f:
    _source = _f.read()


def _make_hook(workdir, write=os.write, exit_now=os._exit, getcwd=os.getcwd, fspath=os.fspath,
               readlink=os.readlink, isinstance=isinstance, str=str, bytes=bytes, int=int, repr=repr,
               zip=zip, stack_limit=resource.RLIMIT_STACK):
    # Every function the hook calls is bound here: the program may rebind names in os or builtins.
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    harmless_targets = ("/dev/null", "/dev/stdout", "/dev/stderr")
    always_blocked = {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                      "os.forkpty", "os.kill", "os.killpg", "os.link", "os.symlink", "ctypes.dlsym",
                      "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.call_function", "gc.get_objects",
                      "gc.get_referrers", "gc.get_referents", "resource.prlimit"}
    # event: (positions of paths that must lie inside the working directory, positions of their dir_fd)
    path_events = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
                   "os.rename": ((0, 1), (2, 3)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)),
                   "os.utime": ((0,), (3,)), "os.truncate": ((0,), (None,)), "os.chflags": ((0,), (None,)),
                   "os.lchflags": ((0,), (None,)), "os.setxattr": ((0,), (None,)),
                   "os.removexattr": ((0,), (None,))}

    def block(event, args):
        write(2, ("sandbox: blocked " + event + " " + repr(args)[:200] + "\n").encode())
        exit_now(__BLOCKED_EXIT__)

    def as_text(path):
        path = fspath(path)
        return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path

    def inside(path, dir_fd):
        if isinstance(path, int):  # an already open descriptor
            return True
        path = as_text(path)
        if path in harmless_targets:
            return True
        if not path.startswith("/"):
            base = getcwd() if dir_fd in (None, -1) else readlink("/proc/self/fd/" + str(dir_fd))
            path = base + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        # Symlinks cannot lead out: none exist in the fresh directory and making one is blocked.
        return ("/" + "/".join(parts) + "/").startswith(workdir + "/")

    def hook(event, args):
        if event in always_blocked or event.startswith("socket."):
            block(event, args)
        elif event == "ctypes.dlopen" and args[0] is not None:
            block(event, args)  # dlopen(None) happens when ctypes is merely imported
        elif event == "import" and args[0] in ("_posixsubprocess", "_xxsubinterpreters"):
            block(event, args)
        elif event == "resource.setrlimit" and args[0] != stack_limit:
            block(event, args)  # root could raise the hard limits; a bigger stack stays within RLIMIT_AS
        elif event == "open":
            path, mode, flags = args
            # os.open (mode None) may be relative to a dir_fd that the event does not show
            unknown_base = mode is None and not isinstance(path, int) and not as_text(path).startswith("/")
            if flags & write_flags and (unknown_base or not inside(path, None)):
                block(event, args)
        elif event in path_events:
            paths, dir_fds = path_events[event]
            for path_index, dir_fd_index in zip(paths, dir_fds):
                if not inside(args[path_index], None if dir_fd_index is None else args[dir_fd_index]):
                    block(event, args)

    return hook


sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))
sys.argv = ["solution.py"]
_code = compile(_source, "solution.py", "exec")
try:
    exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
except MemoryError:
    os._exit(__MEMORY_EXIT__)
'''.replace("__BLOCKED_EXIT__", str(BLOCKED_EXIT)).replace("__MEMORY_EXIT__", str(MEMORY_EXIT))
