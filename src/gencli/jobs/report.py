"""``gencli report path=RUN_DIR|SWEEP_DIR``: one self-contained ``report.html`` about a run or a sweep.

Find the inputs (is ``path`` a run or a sweep?), build the page (:mod:`gencli.reports`: curves, grids, final
metrics with provenance and the config for a run; the summary table, the metric against each swept parameter and
the best and worst grids for a sweep), write it atomically. The page embeds its images and needs no server and no
network; it is written beside what it reports (``<path>/report.html``) unless ``out=`` says where.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gencli.config import CONF_DIR
from gencli.errors import ConfigError, RuntimeFailure
from gencli.jobs.common import run_job

log = logging.getLogger(__name__)


def report(cfg: DictConfig) -> Path:
    from gencli.io import atomic_write
    from gencli.reports import Options, build_report

    if not cfg.get("path"):
        raise ConfigError("gencli report needs path=DIR: a run folder (outputs/train/runs/<name>) or a sweep folder "
                          "(outputs/train/multiruns/<time>).")
    folder = Path(str(cfg.path)).expanduser()
    target = output_path(cfg, folder)
    options = Options(metric=cfg.rank_by, direction=cfg.direction, max_grids=int(cfg.max_grids),
                      related=[str(r) for r in cfg.related or []])
    page, kind, notes = build_report(folder, options)
    try:
        with atomic_write(target, "w") as f:
            f.write(page)
    except OSError as err:
        raise RuntimeFailure(f"the report could not be written to {target} ({err.strerror or err}); choose a "
                             "writable place with out=FILE.html.") from err
    for note in notes:
        log.warning("report: %s", note)
    log.info("%s report of %s: %s (%.0f KiB%s)", kind, folder, target, target.stat().st_size / 1024,
             f", {len(notes)} note(s) on what could not be read" if notes else "")
    return target


def output_path(cfg: DictConfig, folder: Path) -> Path:
    """``out=`` (a file, or a folder to put report.html in), else ``<path>/report.html``."""
    if not cfg.get("out"):
        return folder / "report.html"
    out = Path(str(cfg.out)).expanduser()
    if out.is_dir():
        return out / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"out={cfg.out}: a report is an HTML file; give a name ending in .html (or a folder).")
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def main(cfg: DictConfig) -> Path:
    return run_job(report, cfg)


if __name__ == "__main__":
    main()
