"""Run the project's scripts as new processes without paying their imports each time.

A command-line test spends most of its seconds importing torch, Lightning and Hydra. Each pytest worker starts
one server process that imports them once (with the test environment: one thread, unbuffered output) and then
forks a child per command. The child is a process of its own, as `python SCRIPT ARGS` is: its own working
folder, environment, stdin/stdout/stderr, session (so a timeout kills the DDP ranks it starts), exit status,
and every change it makes to global state dies with it. What it does not repeat is the import of modules that
are already loaded; the tests of what a cold start imports or prints run a real `python` (``fresh=True``).

Used only where ``os.fork`` exists and the command's environment matches the server's in every variable read
at import time (thread counts, Python's own, library paths); anything else runs as a plain subprocess.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# variables read when Python, torch or its thread pools start: a command whose values differ runs fresh
_IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "GOMP_", "PYTHON", "LD_", "TORCH", "CUDA", "PYTORCH")
_IGNORED = {"PYTHONUNBUFFERED"}  # the server's output is unbuffered; a child's being so changes no result

# what the server imports before it forks: the modules train.py, generate.py and eval.py reach
_PRELOAD = """
import torch, pytorch_lightning, hydra, omegaconf, rich
import torch.utils.tensorboard
import charlstm.app.train, charlstm.app.generate, charlstm.app.evaluate, charlstm.app.summary, charlstm.app.cli
"""

_SERVER = r"""
import json, os, runpy, sys, threading

def child(req):
    os.setsid()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    streams = ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY), (2, req["stderr"], os.O_WRONLY))
    for fd, path, mode in streams:
        new = os.open(path, mode)
        os.dup2(new, fd)
        os.close(new)
    sys.stdin = open(0, closefd=False)  # not the server's reader, which may hold the next requests
    script = req["argv"][0]
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        sys.excepthook(*sys.exc_info())
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code & 0xFF)

def main():
    replies = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    lock = threading.Lock()

    def say(message):
        data = (json.dumps(message) + "\n").encode()
        with lock:
            os.write(replies, data)

    def reap(pid):
        _, status = os.waitpid(pid, 0)
        say({"pid": pid, "status": os.waitstatus_to_exitcode(status)})

    say({"ready": True})
    for line in sys.stdin.buffer:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(req)
        say({"started": pid})
        threading.Thread(target=reap, args=(pid,), daemon=True).start()

PRELOAD
main()
"""


class _Server:
    """One preloaded server per test process, started on first use; a thread reads its replies."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        code = _SERVER.replace("PRELOAD", _PRELOAD)
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.started: list[int] = []
        self.done: dict[int, int] = {}
        self.ready = False
        threading.Thread(target=self._replies, daemon=True).start()
        with self.changed:
            if not self.changed.wait_for(lambda: self.ready or self.proc.poll() is not None, timeout=120):
                raise RuntimeError("the fork server did not start within 120 s")
        if not self.ready:
            raise RuntimeError(f"the fork server exited ({self.proc.returncode}) before it was ready")

    def _replies(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.changed:
                if message.get("ready"):
                    self.ready = True
                elif "started" in message:
                    self.started.append(message["started"])
                else:
                    self.done[message["pid"]] = message["status"]
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def start(self, argv: list[str], cwd: Path, env: dict[str, str], stdout: Path, stderr: Path) -> int:
        with self.lock:
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            with self.changed:
                if not self.changed.wait_for(lambda: self.started or self.proc.poll() is not None, timeout=60):
                    raise RuntimeError("the fork server did not start the command within 60 s")
                if not self.started:
                    raise RuntimeError(f"the fork server exited ({self.proc.returncode})")
                return self.started.pop(0)

    def poll(self, pid: int, timeout: float | None) -> int | None:
        """The exit status of ``pid`` (negative: the signal that ended it), waiting up to ``timeout`` s."""
        with self.changed:
            self.changed.wait_for(lambda: pid in self.done or self.proc.poll() is not None, timeout=timeout)
            if pid not in self.done and self.proc.poll() is not None:
                raise RuntimeError(f"the fork server exited ({self.proc.returncode})")
            return self.done.pop(pid, None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(10)


_server: _Server | None = None


def _server_for(env: dict[str, str]) -> _Server | None:
    """The running server when ``env`` matches it in every import-time variable, else None."""
    global _server
    if not hasattr(os, "fork") or os.environ.get("CHARLSTM_TESTS_NO_FORKSERVER"):
        return None
    if _server is None:  # the test environment, whatever the first command adds to it
        base = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        base.pop("HYDRA_FULL_ERROR", None)
        _server = _Server(base)
        atexit.register(_server.close)
    keys = {k for k in (*env, *_server.env) if k.startswith(_IMPORT_TIME) and k not in _IGNORED}
    if any(env.get(k) != _server.env.get(k) for k in keys):
        return None
    return _server


class ForkedProcess:
    """A command run by the server: the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], server: _Server) -> None:
        self.args = args
        self.server = server
        self.folder = Path(tempfile.mkdtemp(prefix="charlstm-cli-"))
        self.out, self.err = self.folder / "stdout", self.folder / "stderr"
        self.out.touch()
        self.err.touch()
        self.pid = server.start(args[1:], cwd, env, self.out, self.err)
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            status = self.server.poll(self.pid, timeout)
            if status is None:
                self.kill()
                self.server.poll(self.pid, None)
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = status
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        outputs = tuple(path.read_text(encoding="utf-8") for path in (self.out, self.err))
        for path in (self.out, self.err):
            path.unlink()
        self.folder.rmdir()
        return outputs


def popen(args: list[str], cwd: Path, env: dict[str, str] | None = None, fresh: bool = False):
    """Start ``args`` (``[sys.executable, SCRIPT, ...]``) with stdout and stderr captured as text: forked from the
    preloaded server where it can be, else as a plain subprocess. ``fresh=True`` always starts a real one."""
    env = dict(os.environ if env is None else env)
    script_run = len(args) >= 2 and args[0] == sys.executable and args[1].endswith(".py")
    server = None if fresh or not script_run else _server_for(env)
    if server is None:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                encoding="utf-8")  # fmt: skip
    return ForkedProcess(args, cwd, env, server)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float | None = None,
        fresh: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run(args, capture_output=True, text=True)``, through the server where it can be."""
    proc = popen(args, cwd, env, fresh)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(args, proc.wait(), out, err)
