"""Every vocabulary the wire contract (protocol/) copies from the core, because the gateway cannot
import it, equals the core's own."""

from __future__ import annotations

import protocol as payloads
from protocol import constants
from selprune_core import corpora, data
from worker.convert import prune_config


def test_dataset_rules_match_the_core():
    assert set(constants.BUILTIN_DATASETS) == set(corpora.BUILTIN_CORPORA)
    assert constants.FILE_SUFFIXES == data.FILE_SUFFIXES
    assert constants.HUB_ID_PATTERN.pattern == data._HUB_ID.pattern
    assert constants.FILTER_PATTERN.pattern == data._FILTER.pattern
    assert constants.PACKAGED_BUILDERS == data._PACKAGED_BUILDERS


def test_embedded_model_name_matches_the_core():
    from selprune_core.loading import EMBEDDED_MODEL

    assert payloads.EMBEDDED_MODEL == EMBEDDED_MODEL


def test_method_names_match_the_core():
    from typing import get_args

    from selprune_core import config

    assert get_args(payloads.ScoringName) == config.SCORING_NAMES
    assert get_args(payloads.OffsetMode) == config.OFFSET_MODES
    assert get_args(payloads.SelectionMode) == config.SELECTION_MODES


def test_every_recipe_is_a_valid_core_config():
    for name in payloads.RECIPES:
        params = payloads.PruneParams(recipe=name)  # type: ignore[arg-type]
        cfg = prune_config(params)
        for field, value in payloads.RECIPES[name].items():
            assert getattr(params, field) == value
        assert cfg.offset_mode == params.offset_mode and cfg.collect.skip_first == params.skip_first


def test_head_reduce_and_toxicity_scorer_names_match_the_core():
    from typing import get_args, get_type_hints

    from selprune_core import config, toxicity

    head_reduce = payloads.PruneParams.model_fields["head_reduce"].annotation
    assert set(get_args(head_reduce)) == set(get_args(get_type_hints(config.PruneConfig)["head_reduce"]))
    scorers = payloads.EvaluateJob.model_fields["toxicity_scorer"].annotation
    assert set(get_args(scorers)) == set(toxicity.SCORER_NAMES)


def test_recipe_and_preset_names_match_their_tables():
    from typing import get_args

    assert set(get_args(payloads.RecipeName)) == set(payloads.RECIPES)
    assert set(get_args(payloads.PresetName)) == set(payloads.PRESETS)


def test_image_vocabularies_match_the_worker():
    from worker import image_data, image_models

    assert constants.BUILTIN_IMAGE_SETS == image_data.IMAGE_SOURCES
    assert constants.IMAGE_MODELS == (constants.VIT_DIGITS_MODEL,) == image_models.BUILTIN_IMAGE_MODELS


def test_masked_lm_vocabularies_match_the_worker():
    from worker import mlm_models

    assert constants.MASKED_LM_MODELS == (constants.MLM_CODE_PROSE_MODEL,) == mlm_models.BUILTIN_MASKED_LMS
