"""TrainingLog: one line at each tenth of a run and at its end, saying how far it is."""

from __future__ import annotations

import logging

import pytest

from selprune_core.training_log import LOGGER, TrainingLog


@pytest.mark.parametrize(("total", "expected"), [(100, 10), (25, 13), (3, 3), (1, 1)])
def test_a_line_per_tenth_and_one_at_the_end(caplog, total, expected):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress = TrainingLog("a model", total)
        for step in range(1, total + 1):
            progress.step(step, loss=1.0 / step)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == f"training a model: {total} steps"
    assert len(lines) - 1 == expected
    assert lines[-1].startswith(f"training a model: step {total}/{total} (100%), loss {1 / total:.3f}, ")
    assert lines[-1].endswith("about 0 s left")


def test_the_command_line_shows_training_without_verbose(capsys):
    from selprune.cli import main

    logging.getLogger(LOGGER).setLevel(logging.NOTSET)
    assert main(["families"]) == 0
    assert logging.getLogger(LOGGER).level == logging.INFO  # the name cli.py spells out is LOGGER
