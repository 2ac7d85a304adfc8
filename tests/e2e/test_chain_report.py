"""gencli report on folders that real gencli commands wrote: a tiny train run, and a tiny sweep with a failed job.

The unit tests (tests/unit/test_report.py) cover the builder on hand-made folders; this checks that the files
gencli train writes today are the ones the report reads (curves from csv/metrics.csv, grids from samples/,
metrics.json, the sweep's job.json records).
"""

from __future__ import annotations

import pytest

from conftest import FAST_TRAIN, describe, gencli
from report_html import Parsed

pytestmark = pytest.mark.slow

TINY = [*FAST_TRAIN, "data.image_size=8", "data.max_images=200", "trainer.max_epochs=1",
        "callbacks.sample_grid.every_n_steps=2"]


def test_report_of_a_real_run_and_a_real_sweep(tmp_path):
    run = tmp_path / "run"
    trained = gencli("train", "model=vae", *TINY, f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, describe(trained)
    made = gencli("report", f"path={run}", cwd=tmp_path)
    assert made.returncode == 0, describe(made)
    parsed = Parsed((run / "report.html").read_text())
    captions = [alt for _, alt in parsed.images]
    assert captions[0].startswith("loss: ") and "val/loss" in captions[0]  # the loss plot first
    assert any(alt.startswith("step 2: samples") for alt in captions)
    assert "final: samples (final.png)" in captions
    assert parsed.row("val/loss")[1] and "Composed config" in parsed.headings

    sweep = tmp_path / "sweep"
    swept = gencli("train", "-m", "model=vae", "model.beta=0.5,4", "model.optimizer.lr=0.001,1e12", *TINY,
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert (sweep / "sweep_summary.csv").is_file(), describe(swept)
    made = gencli("report", f"path={sweep}", cwd=tmp_path)
    assert made.returncode == 0, describe(made)
    parsed = Parsed((sweep / "report.html").read_text())
    header = next(r for r in parsed.rows if r and r[0] == "rank")
    assert {"model.beta", "model.optimizer.lr", "status", "val/loss"} <= set(header)
    jobs = [r for r in parsed.rows if len(r) == len(header) and r[0] != "rank"]
    assert len(jobs) == 4
    captions = [alt for _, alt in parsed.images]
    assert any(alt.startswith("val/loss against model.beta") for alt in captions)
    assert any(alt.startswith("best: job ") for alt in captions)
