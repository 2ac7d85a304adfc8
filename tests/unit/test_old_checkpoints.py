"""Checkpoints written by an older gencli keep loading and sample bitwise-identically (issue 23, item 6).

tests/fixtures/checkpoints/ holds one tiny checkpoint of each model config, written before the package layout moved
(scripts/make_fixture_checkpoints.py, which also recorded the sha256 of every file each `gencli sample` case wrote).
Their stored configs name classes by their old dotted paths, so this is also the test of the renamed-targets table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "make_fixture_checkpoints.py"


def fixture_script():
    spec = importlib.util.spec_from_file_location("make_fixture_checkpoints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = fixture_script()


@pytest.mark.parametrize("case", sorted(FIXTURES.CASES))
def test_an_old_checkpoint_samples_bitwise_identically(case, tmp_path):
    expected = json.loads((FIXTURES.EXPECTED / f"{case}.json").read_text())
    assert FIXTURES.sample_outputs(case, tmp_path) == expected


@pytest.mark.parametrize("name", sorted(FIXTURES.MODELS))
def test_every_old_checkpoint_restores_through_the_safe_loader(name):
    from gencli.checkpoints import restore_model

    model, checkpoint = restore_model(FIXTURES.FIXTURES / f"{name}.ckpt")
    assert checkpoint["global_step"] == 2
    assert sum(p.numel() for p in model.parameters()) > 0
