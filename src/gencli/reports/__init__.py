"""``gencli report``: one self-contained HTML page about a run folder or a sweep folder.

:func:`build_report` tells which of the two ``path`` is (:func:`kind_of`) and hands it to
:func:`gencli.reports.run.run_report` or :func:`gencli.reports.sweep.sweep_report`. Both read the folder as
data that may come from a stranger (:mod:`gencli.reports.read`), draw their plots with matplotlib
(:mod:`gencli.reports.plots`) and write escaped HTML with every image inline (:mod:`gencli.reports.page`).
No Lightning and no model: a report only reads files.
"""

from __future__ import annotations

from pathlib import Path

from gencli.errors import ConfigError
from gencli.reports.read import Notes
from gencli.reports.run import Options

__all__ = ["Notes", "Options", "build_report", "kind_of"]

#: A run folder holds at least one of these (a train run all of them).
RUN_MARKERS = (".hydra/config.yaml", "metrics.json", "job.json", "csv/metrics.csv")
#: A sweep folder holds one of these, or job folders (each with job.json or .hydra/).
SWEEP_MARKERS = ("multirun.yaml", "sweep_summary.csv")

WHAT_TO_GIVE = ("give a run folder (outputs/train/runs/<name>: the one holding metrics.json, csv/ and .hydra/) or a "
                "sweep folder (outputs/train/multiruns/<time>: multirun.yaml and one folder per job)")


def kind_of(path: Path) -> str:
    """``"run"`` or ``"sweep"``; a ConfigError naming the path and what to give instead for anything else."""
    if not path.exists():
        raise ConfigError(f"path={path} does not exist; {WHAT_TO_GIVE}.")
    if path.is_file():
        hint = ""
        if path.suffix in (".ckpt", ".safetensors"):
            hint = f" For this checkpoint's run: path={path.parent.parent}."
        elif path.name in ("metrics.json", "job.json", "multirun.yaml", "sweep_summary.csv", "report.html"):
            hint = f" For this file's folder: path={path.parent}."
        raise ConfigError(f"path={path} is a file, not a folder; {WHAT_TO_GIVE}.{hint}")
    if any((path / marker).is_file() for marker in RUN_MARKERS):
        return "run"
    try:
        children = [p for p in path.iterdir() if p.is_dir()]
    except OSError as err:
        raise ConfigError(f"path={path} cannot be listed ({err.strerror or err}); {WHAT_TO_GIVE}.") from err
    if any((path / marker).is_file() for marker in SWEEP_MARKERS) or any(
            (child / "job.json").is_file() or (child / ".hydra").is_dir() for child in children):
        return "sweep"
    raise ConfigError(f"path={path} is neither a gencli run nor a sweep: it holds none of "
                      f"{', '.join(RUN_MARKERS)}, no multirun.yaml and no job folders; {WHAT_TO_GIVE}.")


def build_report(path: Path, options: Options) -> tuple[str, str, Notes]:
    """(the HTML, ``"run"`` or ``"sweep"``, the notes on what could not be read)."""
    kind = kind_of(path)
    if kind == "run":
        from gencli.reports.run import run_report

        page, notes = run_report(path, options)
    else:
        from gencli.reports.sweep import sweep_report

        page, notes = sweep_report(path, options)
    return page, kind, notes
