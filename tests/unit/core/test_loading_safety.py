"""What load_model refuses: paths outside the models root (with the same message as missing ones),
pickled weights, custom code in a checkpoint; and the datasets floor that rules out loading scripts."""

from __future__ import annotations

import builtins
import json
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from selprune_core import loading
from selprune_core.errors import ModelLoadError
from selprune_core.loading import load_model

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def models_root(tmp_path: Path, model_dir: Path) -> Path:
    """A models root holding the tiny llama as `llama/`; `model_dir` itself lies outside it."""
    root = tmp_path / "models"
    root.mkdir()
    (root / "llama").symlink_to(model_dir, target_is_directory=True)  # resolves outside: refused
    inside = root / "inside"
    inside.mkdir()
    for file in model_dir.iterdir():
        (inside / file.name).write_bytes(file.read_bytes())
    return root


def _unavailable(ref: str, root: Path, tmp_path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(ref, cache_dir=tmp_path / "cache", device="cpu", models_root=root)
    return str(info.value).replace(repr(ref), "<ref>")


def test_model_paths_outside_the_root_fail_like_missing_ones(models_root, model_dir, tmp_path):
    missing = _unavailable(str(models_root / "no-such-model"), models_root, tmp_path)
    assert "not available" in missing and str(models_root) not in missing
    for ref in (
        str(model_dir),  # an absolute path to a real model outside the root
        "/etc",  # a real folder
        "/etc/passwd",  # a real file
        "../tiny-llama",  # a real model, reached by '..'
        "llama",  # a symlink in the root pointing out of it
        "inside/../../tiny-llama",
        "/no/such/folder",
        "missing-folder/",
        "./missing",
    ):
        assert _unavailable(ref, models_root, tmp_path) == missing, ref


def test_models_inside_the_root_load(models_root, tmp_path):
    relative = load_model("inside", cache_dir=tmp_path, device="cpu", models_root=models_root)
    absolute = load_model(
        str(models_root / "inside"), cache_dir=tmp_path, device="cpu", models_root=models_root
    )
    assert relative.fingerprint == absolute.fingerprint and relative.sites.n_layers == 2


def test_a_hub_id_naming_a_folder_of_the_working_directory_is_refused(
    models_root, model_dir, tmp_path, monkeypatch
):
    # transformers reads a folder of the working directory before the hub: "tiny-llama" must not reach it.
    monkeypatch.chdir(model_dir.parent)
    message = _unavailable("tiny-llama", models_root, tmp_path)
    assert message == _unavailable(str(models_root / "gone"), models_root, tmp_path)


def _pickled_only(src: Path, dest: Path) -> Path:
    """`src`'s checkpoint with its weights as pytorch_model.bin (a pickle) and no safetensors."""
    dest.mkdir(parents=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dest / file.name).write_bytes(file.read_bytes())
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), dest / "pytorch_model.bin")
    return dest


def test_pickled_weights_are_refused(model_dir, tmp_path):
    folder = _pickled_only(model_dir, tmp_path / "models" / "pickled")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(folder), cache_dir=tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model("pickled", cache_dir=tmp_path, device="cpu", models_root=tmp_path / "models")


def test_custom_code_in_a_checkpoint_never_runs(tmp_path, monkeypatch):
    # A checkpoint whose config names its own code. transformers asks on a terminal before running it
    # unless trust_remote_code=False is passed; here the "operator" would answer yes.
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        json.dumps({"model_type": "selprune_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    )
    (folder / "configuration_x.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'selprune_custom'\n"
    )
    asked: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    with pytest.raises(ModelLoadError):
        load_model(str(folder), cache_dir=tmp_path, device="cpu")
    assert not marker.exists() and asked == []


def test_an_embedded_copy_without_safetensors_is_converted_again(tmp_path):
    target = tmp_path / "models" / "m"
    target.mkdir(parents=True)
    (target / loading._CACHE_MARKER).write_text("{}")
    (target / "pytorch_model.bin").write_bytes(b"old")
    calls = []

    def convert(dest: Path) -> None:
        calls.append(dest)
        (dest / "model.safetensors").write_bytes(b"new")

    assert loading._ensure_converted(target, convert, {"file": "x"}) == target
    assert len(calls) == 1 and (target / "model.safetensors").is_file()
    assert not (target / "pytorch_model.bin").exists()


def test_datasets_floor_excludes_releases_that_run_loading_scripts():
    # datasets 4.0 removed loading scripts (and trust_remote_code) altogether.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    spec = next(
        d for d in pyproject["project"]["optional-dependencies"]["worker"] if d.startswith("datasets")
    )
    floor = re.fullmatch(r"datasets>=(\d+)(\.\d+)*", spec.split(";")[0].strip())
    assert floor is not None and int(floor.group(1)) >= 4, spec
    assert int(version("datasets").split(".")[0]) >= int(floor.group(1))
