"""Fixtures of the fuzz tests (issue 29): one tiny trained run made with the real CLI, its export, warm verbs.

Everything gencli is asked here goes through its command line (``gencli.cli.main``), so these tests do not depend on
where gencli's modules live. The root tests/conftest.py (GENCLI_CACHE in a session folder, ``--run-slow``, the
``slow`` marker) applies here too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from . import harness

TRAIN = ["train", "model=ae", "data.image_size=8", "trainer.max_epochs=1", "callbacks=minimal",
         "callbacks.sample_grid.n=4", "run_name=fuzz"]


def must(outcome: harness.Outcome) -> harness.Outcome:
    assert outcome.code == 0, outcome.describe()
    return outcome


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> SimpleNamespace:
    """A 1-epoch autoencoder on 8x8 digits (its run folder and last.ckpt), its safetensors export, a good .npz of
    8x8 images, a filled cache folder (domain classifier and reference statistics); and each verb run once without
    bounds, so that the fuzzed calls find their modules imported (an import under the address-space bound is not
    what is being tested)."""
    base = tmp_path_factory.mktemp("fuzz")
    big = {"seconds": 900, "memory_gib": 1000}
    must(harness.run(TRAIN, base, **big))
    run_dir = base / "outputs" / "train" / "runs" / "fuzz"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    export = base / "export" / "model.safetensors"
    export.parent.mkdir()
    must(harness.run(["export", f"ckpt={ckpt}", f"out={export}", "run_name=export"], base, **big))
    import numpy as np

    good_npz = base / "good.npz"
    np.savez(good_npz, images=np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))
    cache = base / "cache"
    for argv in (["sample", f"ckpt={ckpt}", "n=4", "run_name=warm_sample"],
                 ["sample", f"ckpt={export}", "n=4", "mode=reconstruct", "run_name=warm_export"],
                 ["sample", f"ckpt={ckpt}", "n=4", "mode=inpaint", "run_name=warm_inpaint"],
                 ["eval", f"ckpt={ckpt}", "metric=recon", "n=16", "device=cpu", "run_name=warm_eval"],
                 ["eval", f"samples={good_npz}", "data=digits", "data.image_size=8", "metric=fid", "n=64",
                  "device=cpu", f"paths.cache_dir={cache}", "run_name=warm_fid"],
                 ["report", f"path={run_dir}", f"out={base / 'warm.html'}", "run_name=warm_report"]):
        must(harness.run(argv, base, **big))
    scratch = base / "scratch"
    scratch.mkdir()
    return SimpleNamespace(base=base, run_dir=run_dir, ckpt=ckpt, export=export, export_json=export.with_suffix(".json"),
                           good_npz=good_npz, cache=cache, scratch=scratch)


def copy_run(world: SimpleNamespace, to: Path) -> Path:
    shutil.copytree(world.run_dir, to, ignore=shutil.ignore_patterns(".gencli.lock", "report.html"))
    return to


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if harness.COUNTS:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(harness.COUNTS.items()))
        terminalreporter.write_line(f"fuzz examples run per format: {counts} (total {sum(harness.COUNTS.values())})")
    if harness.TOLERATED:
        known = ", ".join(f"{name} {count}" for name, count in sorted(harness.TOLERATED.items()))
        terminalreporter.write_line(f"fuzz examples that hit a known defect (tolerated, see the xfail tests): {known}")
