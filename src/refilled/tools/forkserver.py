"""A warm `refilled` for the jobs of one local Snakemake run.

Every training job is a new process, and a new process spends seconds importing torch (and,
at its first optimiser, torch._dynamo) before it trains: on the demo's jobs of 5 to 15 s
that was a third of their time. So a local Snakemake run starts one server process that
imports all of that once, then, for each `refilled` command a job runs, forks a child that
runs the command with the job's arguments, working directory, environment and standard
streams. Snakemake still schedules every job; a job's shell command is unchanged.

    job shell -> `refilled ...` (client) --unix socket--> server --fork--> child runs cli.main

- The client (`run_via_server`) is the `refilled` command itself: when ``REFILLED_FORKSERVER``
  names a socket it can reach, it sends its arguments, environment and its standard streams'
  file descriptors, then waits for the child's exit status and exits with it. SIGTERM, SIGINT
  and SIGHUP that reach the client are passed on to the child; a client that dies (SIGKILL)
  takes its child with it (the server kills it). Without a server, or refused, the client
  runs the command itself, exactly as before.
- The server refuses a job it cannot run as a fresh process would: another Python
  environment, a source file of `refilled` changed since it started, or another value of an
  environment variable that is read at import (``IMPORT_TIME_ENV``: thread counts, torch's
  and CUDA's settings). Inside a Slurm job the client never asks.
- A child's results are those of a fresh process: the server runs no torch operation before it
  forks (no thread pool, no CUDA), the child sets its own threads, seeds and device.
- The server stops when Snakemake ends (`stop`, from the Snakefile's onsuccess/onerror:
  running jobs get SIGTERM). When Snakemake dies (it watches its parent), it takes no new job
  and lets the running ones finish, as a killed Snakemake's jobs do without a server. Its
  children die with it (Linux: PR_SET_PDEATHSIG).

Torch-free at import: the Snakefile imports `start` and `stop` from here.
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

SOCKET_ENV = "REFILLED_FORKSERVER"
SOCKET_NAME = ".snakemake/refilled-forkserver.sock"   # relative to Snakemake's working directory
# read when modules are imported, so a job must agree with the server on them (CUDA_VISIBLE_DEVICES
# is read at CUDA's start, in the child, so it may differ)
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOTO", "VECLIB_", "NUMEXPR_", "TORCH", "PYTORCH", "CUDA",
                   "CUBLAS", "CUDNN", "NCCL", "NVIDIA", "LD_", "PYTHON")
# what Snakemake sets to a job's `threads` (snakemake/shell.py); the server starts with the
# training jobs' value, so that their environments agree with its own
THREAD_ENV = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
CALL_TIME_ENV = ("CUDA_VISIBLE_DEVICES",)
PRELOAD = ("torch", "torch._dynamo", "refilled.training.run", "refilled.tools.pin", "refilled.evaluate")   # and the
# command line, which the server's program (refilled.serve) imports and hands to `Server` as `run`
_HEADER = struct.Struct("!I")


# ---- client -------------------------------------------------------------------------------
def run_via_server(argv: list[str]) -> int | None:
    """Run `refilled argv` in the server's child; its exit status, or None to run it here
    (no server, not reachable, inside Slurm, or refused)."""
    path = os.environ.get(SOCKET_ENV)
    if not path or "SLURM_JOB_ID" in os.environ:
        return None
    from refilled.training.phases import JOB_START_ENV, process_start_time

    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        env = dict(os.environ)
        env.setdefault(JOB_START_ENV, repr(process_start_time() or time.time()))
        payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": env, "prefix": sys.prefix}).encode()
        conn.sendmsg([_HEADER.pack(len(payload))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        conn.sendall(payload)
        reader = conn.makefile("r", encoding="utf-8")
        answer = reader.readline().split(" ", 1)
    except OSError:
        conn.close()
        return None
    if answer[0] != "accepted":
        print(f"refilled: the fork server did not take this job ({answer[-1].strip()}); running it here", file=sys.stderr)
        conn.close()
        return None

    def pass_on(signum, _frame):
        try:
            conn.sendall(f"signal {signum}\n".encode())
        except OSError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, pass_on)
    while True:
        try:
            line = reader.readline()
        except InterruptedError:   # pragma: no cover - Python retries reads after a signal handler
            continue
        except OSError:
            line = ""
        if line.startswith("exit "):
            return int(line.split()[1])
        if not line:
            print("refilled: the fork server went away while it ran this job", file=sys.stderr)
            return 1


# ---- the Snakefile's side -----------------------------------------------------------------
_server: subprocess.Popen | None = None


def start(threads: int, socket_path: str = SOCKET_NAME, log_path: str = ".snakemake/refilled-forkserver.log") -> None:
    """Start the server for this Snakemake process, for jobs of `threads` threads (it does not
    wait for it: jobs that come before it listens run as fresh processes)."""
    global _server
    if _server is not None:
        return
    Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        _server = subprocess.Popen([sys.executable, "-m", "refilled.serve", "--socket", socket_path,
                                    "--parent", str(os.getpid())], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, **dict.fromkeys(THREAD_ENV, str(threads))})


def stop(timeout: float = 30.0) -> None:
    global _server
    if _server is None:
        return
    _server.terminate()
    try:
        _server.wait(timeout)
    except subprocess.TimeoutExpired:
        _server.kill()
        _server.wait()
    _server = None


# ---- server -------------------------------------------------------------------------------
def _import_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV) and k not in CALL_TIME_ENV}


def _source_stamps() -> dict[str, int]:
    """mtime of every loaded module file of refilled: a job after an edit runs as a fresh process."""
    stamps = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and (name == "refilled" or name.startswith("refilled.")):
            try:
                stamps[path] = os.stat(path).st_mtime_ns
            except OSError:
                stamps[path] = -1
    return stamps


class Server:
    def __init__(self, socket_path: str, parent: int | None, run):
        """`run(argv)`: the `refilled` command (refilled.cli.main), handed in by refilled.serve so
        that this module imports nothing from the layer above it."""
        self.socket_path, self.parent, self.run = socket_path, parent, run
        self.children: dict[int, socket.socket] = {}     # child pid -> its client's connection
        self.by_conn: dict[socket.socket, int] = {}
        self.stopping = False

    def preload(self) -> None:
        import importlib

        self.env = _import_time_env(os.environ)   # before the imports: torch._dynamo sets some
        for name in PRELOAD:
            importlib.import_module(name)
        from refilled.methods import catalog

        for entry in catalog.CATALOG.values():   # every method's module (a job builds one by name)
            entry.load()
        self.stamps = _source_stamps()

    def refusal(self, request: dict) -> str | None:
        if request.get("prefix") != sys.prefix:
            return f"another Python environment ({request.get('prefix')}, the server's is {sys.prefix})"
        env = _import_time_env(request.get("env", {}))
        if env != self.env:
            differ = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
            return f"environment variables read at import differ: {', '.join(differ)}"
        changed = [p for p, t in self.stamps.items() if (os.stat(p).st_mtime_ns if os.path.exists(p) else -1) != t]
        if changed:
            return f"refilled's source changed since the server started ({changed[0]})"
        return None

    def serve(self) -> int:
        self.preload()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = f"{self.socket_path}.{os.getpid()}"
        listener.bind(bound)
        os.chmod(bound, 0o600)
        listener.listen(64)
        os.replace(bound, self.socket_path)   # appears only once it listens
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the jobs through their clients
        self.selector = selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        print(f"refilled fork server {os.getpid()}: listening on {self.socket_path}", flush=True)
        listening = True
        try:
            while not self.stopping:
                if listening and self.parent is not None and os.getppid() != self.parent:
                    # Snakemake died: take no new job, and let the running ones finish, as the jobs of
                    # a killed Snakemake do without a server (their outputs are kept: refilled.training.finished)
                    print("refilled fork server: Snakemake is gone; finishing the running jobs", flush=True)
                    selector.unregister(listener)
                    listener.close()
                    Path(self.socket_path).unlink(missing_ok=True)
                    listening = False
                if not listening and not self.children:
                    break
                for key, _ in selector.select(timeout=0.2):
                    try:
                        if key.fileobj is listener:
                            self.accept(listener)
                        else:
                            self.from_client(key.fileobj)
                    except Exception:   # a bug here must not take the running jobs down with the server
                        import traceback

                        print("refilled fork server: internal error:", traceback.format_exc(), flush=True)
                self.reap()
        finally:
            if listening:   # (otherwise the path may be a new server's by now)
                Path(self.socket_path).unlink(missing_ok=True)
                listener.close()
            self.shutdown()
        return 0

    def accept(self, listener) -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        fds: list[int] = []
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                raise OSError("a client of another user")
            head, ancdata, _, _ = conn.recvmsg(_HEADER.size, socket.CMSG_SPACE(3 * array.array("i").itemsize))
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", data[: len(data) - len(data) % array.array("i").itemsize]))
            size = _HEADER.unpack(head)[0]
            payload = b""
            while len(payload) < size:
                chunk = conn.recv(size - len(payload))
                if not chunk:
                    raise OSError("the client hung up")
                payload += chunk
            request = json.loads(payload)
            reason = self.refusal(request) if len(fds) == 3 else "the client sent no standard streams"
            if reason is not None:
                conn.sendall(f"refused {reason}\n".encode())
                conn.close()
                return
            pid = self.fork(request, fds, conn)
        except (OSError, ValueError) as exc:
            print(f"refilled fork server: dropped a client: {exc}", flush=True)
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = conn
        self.by_conn[conn] = pid
        print(f"job {pid}: refilled {' '.join(request['argv'])}", flush=True)
        self.selector.register(conn, selectors.EVENT_READ)
        conn.sendall(f"accepted {pid}\n".encode())

    def fork(self, request: dict, fds: list[int], conn) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            _become_job(request, fds)
            code = self.run(list(request["argv"]))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)

    def from_client(self, conn) -> None:
        pid = self.by_conn[conn]
        try:
            data = conn.recv(256)
        except OSError:
            data = b""
        if not data:   # the client died (or was killed): its job dies too
            print(f"job {pid}: its client went away; killing it", flush=True)
            _kill_group(pid, signal.SIGKILL)
            self.forget(pid)
            return
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("signal "):
                _kill_group(pid, int(line.split()[1]))

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code   # killed by signal N: 128 + N, as a shell reports it
            print(f"job {pid}: exit {code}", flush=True)
            conn = self.children.get(pid)
            if conn is not None:
                try:
                    conn.sendall(f"exit {code}\n".encode())
                except OSError:
                    pass
                self.forget(pid)

    def forget(self, pid: int) -> None:
        conn = self.children.pop(pid, None)
        if conn is not None:
            self.by_conn.pop(conn, None)
            self.selector.unregister(conn)
            conn.close()

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop the running jobs as a cluster would (SIGTERM, then SIGKILL after `grace`)."""
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pid in list(self.children):
                _kill_group(pid, signum)
            deadline = time.monotonic() + grace
            while self.children and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.05)


def _kill_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _become_job(request: dict, fds: list[int]) -> None:
    """In the child: the job's process group, signals, streams, directory and environment."""
    os.setpgid(0, 0)
    _die_with_parent()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import tempfile

    tempfile.tempdir = None   # found again from the job's TMPDIR (the server may have looked it up)
    sys.argv = ["refilled", *request["argv"]]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=stream.isatty())


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
