import os
import socket
import subprocess
import sys

import pytest

from promptcot_engine.selfplay.sandbox import isolation, run_python


def test_program_reads_stdin_and_writes_stdout():
    result = run_python("import sys\nxs = sys.stdin.read().split()\nprint(sum(map(int, xs)))\n", "1 2\n3\n")
    assert (result.status, result.returncode, result.stdout, result.stderr) == ("ok", 0, "6\n", "")
    assert result.elapsed > 0


def test_infinite_loop_times_out():
    result = run_python("while True:\n    pass\n", timeout=1)
    assert result.status == "timeout"
    assert result.returncode < 0


def test_program_ignoring_termination_signals_is_still_killed():
    program = "import signal\nfor s in (signal.SIGTERM, signal.SIGXCPU):\n    signal.signal(s, signal.SIG_IGN)\n" \
              "while True:\n    pass\n"
    assert run_python(program, timeout=1).status == "timeout"


@pytest.mark.parametrize("program", [
    "x = bytearray(10 ** 11)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n",
])
def test_memory_bomb_is_stopped(program):
    result = run_python(program, timeout=10, memory_mb=128)
    assert result.status == "memory"


def test_output_flood_stops_at_the_file_size_cap():
    result = run_python("while True:\n    print('x' * 1000)\n", timeout=10, max_output_bytes=1 << 16)
    assert result.status == "runtime_error"
    assert len(result.stdout) <= 1 << 16


def test_writes_inside_the_working_directory_work_and_the_directory_is_removed():
    program = ("import os, shutil\nopen('a.txt', 'w').write('hello')\nos.mkdir('sub')\n"
               "os.rename('a.txt', 'sub/b.txt')\nprint(open('sub/b.txt').read())\nshutil.rmtree('sub')\n"
               "import tempfile\nwith tempfile.TemporaryFile() as f:\n    f.write(b'scratch')\nprint(os.getcwd())\n")
    result = run_python(program)
    assert result.status == "ok", result.stderr
    greeting, workdir = result.stdout.split()
    assert greeting == "hello"
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("action", [
    "open({target!r}, 'w').write('pwned')",
    "open({target!r}, 'a')",
    "import os\nos.open({target!r}, os.O_WRONLY | os.O_CREAT)",
    "import os\nos.chdir({outside!r})\nopen('escaped.txt', 'w')",
    "open('../../escaped.txt', 'w')",
    "import os\nos.symlink({outside!r}, 'link')\nopen('link/escaped.txt', 'w')",
    "import os\nos.remove({existing!r})",
    "import os\nos.rename({existing!r}, 'stolen.txt')",
    "import os\nfd = os.open({outside!r}, os.O_RDONLY)\nos.remove('keep.txt', dir_fd=fd)",
    "import builtins, os\nos.getcwd = lambda: {outside!r}\nbuiltins.isinstance = lambda *a: True\n"
    "open({target!r}, 'w')",
])
def test_writes_outside_the_working_directory_are_blocked(tmp_path, action):
    existing = tmp_path / "keep.txt"
    existing.write_text("keep")
    target = tmp_path / "escaped.txt"
    program = action.format(target=str(target), outside=str(tmp_path), existing=str(existing))
    result = run_python(program)
    assert result.status == "blocked", result.stderr
    assert "sandbox: blocked" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert existing.read_text() == "keep"


def test_reading_outside_is_allowed_and_numpy_imports():
    program = "import numpy\nprint(open(numpy.__file__).read(1) != '')\nprint(int(numpy.arange(5).sum()))\n"
    result = run_python(program)
    assert (result.status, result.stdout) == ("ok", "True\n10\n"), result.stderr


@pytest.fixture
def listening_socket():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.0)
    yield server
    server.close()


def test_network_connection_to_a_local_listener_fails(listening_socket):
    host, port = listening_socket.getsockname()
    # The listener is reachable from an ordinary process, so a failure below is the sandbox's doing.
    subprocess.run([sys.executable, "-c", f"import socket; socket.create_connection(({host!r}, {port}), 5).close()"],
                   check=True, timeout=60)
    listening_socket.accept()[0].close()

    program = f"import socket\ns = socket.create_connection(({host!r}, {port}), 5)\nprint('connected')\n"
    result = run_python(program)
    assert result.status == "blocked"
    assert "connected" not in result.stdout
    with pytest.raises(BlockingIOError):
        listening_socket.accept()


@pytest.mark.skipif(not isolation().network_namespace, reason="the kernel here refuses network namespaces")
def test_network_namespace_has_only_a_loopback_interface():
    result = run_python("import os\nprint(os.readlink('/proc/self/ns/net'))\nprint(open('/proc/net/dev').read())\n")
    assert result.status == "ok", result.stderr
    namespace, *table = result.stdout.splitlines()
    assert namespace != os.readlink("/proc/self/ns/net")
    interfaces = [line.split(":")[0].strip() for line in table[2:] if ":" in line]
    assert interfaces == ["lo"]


@pytest.mark.parametrize("program", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess\nsubprocess.run(['echo', 'hi'])\n",
    "import os\nos.system('echo hi')\n",
    "import os\nos.execv('/bin/echo', ['echo', 'hi'])\n",
    "import os\nos.posix_spawn('/bin/echo', ['echo', 'hi'], {})\n",
    "import ctypes\nctypes.CDLL(None).fork()\n",
    "import ctypes\nctypes.CDLL('libc.so.6')\n",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
])
def test_process_creation_and_escapes_are_blocked(program):
    result = run_python(program, timeout=2)  # short: were the hook broken, the fork bomb would be real
    assert result.status == "blocked", result.stderr
    assert "hi" not in result.stdout


def test_signalling_another_process_is_blocked():
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        result = run_python(f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)\n")
        assert result.status == "blocked"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_deep_recursion_solution_with_a_bigger_stack_runs():
    program = ("import sys, threading, resource\nresource.setrlimit(resource.RLIMIT_STACK, (1 << 26, 1 << 26))\n"
               "sys.setrecursionlimit(10 ** 6)\nthreading.stack_size(1 << 26)\n"
               "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
               "t = threading.Thread(target=lambda: print(depth(50000)))\nt.start()\nt.join()\n")
    result = run_python(program)
    assert (result.status, result.stdout) == ("ok", "50000\n"), result.stderr
