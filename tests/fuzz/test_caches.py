"""The caches gencli eval reuses (``paths.cache_dir``): reference statistics (``reference/*/manifest.json`` +
``stats.npz``) and the domain classifier (``domain/*/manifest.json`` + ``classifier.pt``), each file replaced by an
edited record, damaged bytes, a generated .npz, or junk. A cache entry it cannot use must be recomputed or refused in
one paragraph, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

from . import harness
from .harness import check, fuzz_settings, run, scratch
from .strategies import damaged, edits
from .test_npz import KNOWN as NPZ_KNOWN
from .test_npz import npz_files

KNOWN = dict(NPZ_KNOWN)


def fuzz_cache(world, data, deep: bool = False) -> None:
    harness.COUNTS["reference / domain-classifier cache"] += 1
    with scratch(world.scratch) as folder:
        cache = folder / "cache"
        shutil.copytree(world.cache, cache)
        files = sorted(p for p in cache.rglob("*") if p.is_file())
        for _ in range(data.draw(st.integers(1, 3 if deep else 2))):
            path = data.draw(st.sampled_from(files))
            original = path.read_bytes()
            how = data.draw(st.sampled_from(["edit", "damage", "npz", "junk"]))
            if how == "edit" and path.suffix == ".json":
                try:
                    record = json.loads(original)
                except ValueError:
                    record = {}
                path.write_text(json.dumps(data.draw(edits(record)), default=str))
            elif how == "npz":
                path.write_bytes(data.draw(npz_files()))
            elif how == "junk" or not original:
                path.write_bytes(data.draw(st.binary(max_size=256)))
            else:
                path.write_bytes(data.draw(damaged(original)))
        outcome = run(["eval", f"ckpt={world.ckpt}", "metric=fid", "n=64", "device=cpu", f"paths.cache_dir={cache}",
                       f"run_name={harness.unique()}"], folder)
        check(outcome, names=[str(cache)], may_succeed=True, known=KNOWN, keep=folder)


@fuzz_settings(5)
@given(data=st.data())
def test_caches_damaged_by_strangers(world, data):
    fuzz_cache(world, data)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="the deep run draws new examples each time and still finds the open defects of issue 29 (see the strict xfails of the fast part); strict again once they are fixed")
@fuzz_settings(80, deep=True)
@given(data=st.data())
def test_caches_damaged_by_strangers_deeper(world, data):
    fuzz_cache(world, data, deep=True)
