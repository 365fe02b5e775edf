"""Masked LMs in the worker's one model cache: which refs name one, the models-root confinement
("not allowed" reads like "not there"), and a ConfigError naming the kind when a caller asks for
another kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from selprune_core.errors import ConfigError, ModelLoadError
from tests.helpers import build_vit, local_runtime
from tests.mlm_helpers import build_mlm_model, roberta_tokenizer
from worker.runtime import ModelRuntime


def _save_mlm(folder: Path) -> None:
    tokenizer = roberta_tokenizer()
    build_mlm_model("roberta", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    _save_mlm(tmp_path / "models" / "mlm")
    build_vit().save_pretrained(tmp_path / "models" / "vit")
    return local_runtime(tmp_path)


def test_a_masked_lm_folder_loads_into_the_one_cache_as_its_own_kind(runtime):
    assert runtime.kind("mlm") == "masked_lm" and runtime.kind("vit") == "image_classifier"
    assert runtime.kind("builtin:mlm-code-prose") == "masked_lm" and runtime.kind("gpt2") == "causal_lm"
    target = runtime.masked_lm("mlm")
    assert target.tokenizer.mask_token == "<mask>" and target.max_tokens == 62
    runtime.classifier("vit")
    assert runtime.loaded_models() == ["mlm", "vit"]
    with pytest.raises(ConfigError, match="'mlm' is a masked LM; this needs a causal language model"):
        runtime.model("mlm")
    with pytest.raises(ConfigError, match="'mlm' is a masked LM; this needs an image classifier"):
        runtime.classifier("mlm")
    with pytest.raises(ConfigError, match="'vit' is an image classifier; this needs a masked LM"):
        runtime.masked_lm("vit")


def test_a_masked_lm_outside_the_models_root_is_not_available(runtime, tmp_path):
    _save_mlm(tmp_path / "elsewhere")
    assert runtime.kind(str(tmp_path / "elsewhere")) == "causal_lm"  # not seen: loads as "not there"
    with pytest.raises((ModelLoadError, ConfigError)):
        runtime.masked_lm(str(tmp_path / "elsewhere"))
