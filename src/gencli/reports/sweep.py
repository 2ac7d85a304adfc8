"""The report of a sweep folder (``gencli train -m ...``, an Optuna search, ``gencli eval -m ...``).

Built from the jobs' ``job.json`` records (what :class:`gencli.sweep.SweepSummary` reads too) and the sweep's
``multirun.yaml``:

1. overview — how many jobs, how they ended, the metric that ranks them and its direction;
2. summary table — one row per job: its swept values, status (failed jobs with their reason), the ranking metric
   and its other final metrics; best row green, worst red;
3. the metric against each swept parameter — a numeric axis when every value is a number, else categories;
4. the final sample grids of the best and the worst job.

The ranking metric is ``rank_by=`` or, by default, the sweep's own objective (the ``optimized_metric`` its jobs
recorded), in ``direction=`` or, by default, the sweep's own direction (Optuna's ``hydra.sweeper.direction``, else
the jobs' ``model.monitor_mode``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gencli.errors import ConfigError
from gencli.reports import page as html
from gencli.reports.page import Page
from gencli.reports.plots import metric_vs_param_png
from gencli.reports.read import Notes, read_image, read_json, read_yaml
from gencli.reports.run import Options, dig, training_grids

#: Final metrics shown beside the ranking metric in the table (all of them are in sweep_summary.csv).
MAX_METRIC_COLUMNS = 10


@dataclass
class Job:
    folder: Path
    record: dict
    params: dict[str, str]
    value: float | None = None

    @property
    def status(self) -> str:
        return str(self.record.get("status"))

    @property
    def metrics(self) -> dict:
        metrics = self.record.get("metrics")
        return metrics if isinstance(metrics, dict) else {}


def jobs_of(folder: Path, notes: Notes) -> list[Job]:
    """One :class:`Job` per job folder: its ``job.json``, or, without one, an unfinished job."""
    from gencli.sweep import swept_overrides

    jobs = []
    children = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
    for child in children:
        record = read_json(child / "job.json", notes, root=folder)
        if record is None:
            if not (child / ".hydra").is_dir():
                continue  # not a job folder (an Optuna study's files, a report's own folder...)
            overrides = read_yaml(child / ".hydra" / "overrides.yaml", notes, root=folder)
            record = {"status": "unfinished", "reason": "no readable job.json: the job was killed, is still running, "
                      "or its record is corrupt", "overrides": overrides if isinstance(overrides, list) else []}
        if not isinstance(record.get("overrides"), list):
            record["overrides"] = []
        jobs.append(Job(child, record, {}))
    for job, swept in zip(jobs, swept_overrides([j.record for j in jobs])):
        job.params = dict(item.split("=", 1) if "=" in item else (item, "") for item in map(str, swept))
    return jobs


def objective_of(jobs: list[Job]) -> str | None:
    return next((str(j.record["optimized_metric"]) for j in jobs if j.record.get("optimized_metric")), None)


def direction_of(folder: Path, jobs: list[Job], notes: Notes) -> str | None:
    """The sweep's own direction: Optuna's ``hydra.sweeper.direction``, else the jobs' ``model.monitor_mode``."""
    multirun = read_yaml(folder / "multirun.yaml", notes, root=folder)
    direction = dig(multirun, "hydra", "sweeper", "direction")
    if isinstance(direction, list) and len(direction) == 1:
        direction = direction[0]
    if isinstance(direction, str) and direction.lower() in ("minimize", "maximize"):
        return direction.lower()
    for job in jobs:
        config = read_yaml(job.folder / ".hydra" / "config.yaml", notes, root=folder)
        mode = dig(config, "model", "monitor_mode")
        if mode in ("min", "max"):
            return "maximize" if mode == "max" else "minimize"
    return None


def finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def sweep_report(folder: Path, options: Options) -> tuple[str, Notes]:
    notes = Notes()
    jobs = jobs_of(folder, notes)
    if not jobs:
        raise ConfigError(f"path={folder} holds no job folders with a job.json or .hydra/: it is not a gencli sweep.")
    objective = objective_of(jobs)
    metric = options.metric or objective
    direction = options.direction
    if direction is None and metric is not None:
        if metric != objective:
            raise ConfigError(f"rank_by={metric} is not the sweep's own objective ({objective or 'none recorded'}), so "
                              "its direction is unknown: add direction=minimize or direction=maximize.")
        direction = direction_of(folder, jobs, notes) or "minimize"
    for job in jobs:
        ok = job.status == "completed"
        raw = job.record.get("value") if options.metric is None else job.metrics.get(metric)
        job.value = finite(raw) if ok and metric else None
    ranked = sorted((j for j in jobs if j.value is not None),
                    key=lambda j: -j.value if direction == "maximize" else j.value)
    best, worst = (ranked[0], ranked[-1]) if ranked else (None, None)

    page = Page(f"gencli report: sweep {folder.name}")
    page.add(html.table(["", ""], overview(folder, jobs, metric, direction, ranked, notes)))
    notes_at = len(page.parts)
    page.section("Jobs", summary_table(jobs, ranked, metric, best, worst), anchor="jobs")
    page.section(f"{metric or 'metric'} against each swept parameter", plots_section(jobs, ranked, metric, best),
                 anchor="plots")
    page.section("Best and worst job: final sample grids", grids_section(folder, best, worst, metric, notes),
                 anchor="grids")
    page.parts.insert(notes_at, html.notes_box(notes))
    return page.html(), notes


def overview(folder: Path, jobs: list[Job], metric: str | None, direction: str | None, ranked: list[Job],
             notes: Notes) -> list[tuple[str, Any]]:
    statuses = Counter(job.status for job in jobs)
    multirun = read_yaml(folder / "multirun.yaml", notes, root=folder)
    rows: list[tuple[str, Any]] = [("folder", str(folder)), ("jobs", len(jobs)),
                                   ("status", ", ".join(f"{n} {s}" for s, n in statuses.most_common()))]
    sweeper = dig(multirun, "hydra", "sweeper", "_target_")
    if sweeper:
        rows.append(("sweeper", sweeper))
    task = dig(multirun, "hydra", "overrides", "task")
    if isinstance(task, list):
        rows.append(("command line", " ".join(map(str, task))))
    if metric:
        rows.append(("ranked by", f"{metric} ({direction}); {len(ranked)} job(s) with a finite value"))
    else:
        rows.append(("ranked by", "nothing: the jobs recorded no objective (an eval sweep?); give rank_by=NAME "
                                  "direction=minimize|maximize to rank them and plot it"))
    return rows


def summary_table(jobs: list[Job], ranked: list[Job], metric: str | None, best: Job | None,
                  worst: Job | None) -> str:
    params = list(dict.fromkeys(name for job in jobs for name in job.params))
    names = sorted({name for job in jobs for name in job.metrics if name != metric})
    preferred = [n for n in names if n.startswith("val/")] or names
    others = preferred[:MAX_METRIC_COLUMNS]
    order = ranked + [job for job in jobs if job not in ranked]
    place = {id(job): i + 1 for i, job in enumerate(ranked)}
    rows, classes = [], []
    for job in order:
        reason = job.record.get("reason") if job.status != "completed" else ""
        rows.append((place.get(id(job), "-"), job.folder.name, *(job.params.get(p, "-") for p in params), job.status,
                     job.value if job.value is not None else "-",
                     *(job.metrics.get(n, "-") for n in others), job.record.get("seconds"), job.record.get("steps"),
                     reason or ""))
        classes.append("best" if job is best else "worst" if job is worst and worst is not best
                       else "failed" if job.status not in ("completed", "pruned") else "")
    headers = ["rank", "job", *params, "status", metric or "value", *others, "s", "steps", "reason"]
    more = len(preferred) - len(others)
    tail = html.paragraph(f"({more} more metric column(s) in sweep_summary.csv.)") if more > 0 else ""
    return html.table(headers, rows, classes) + tail


def plots_section(jobs: list[Job], ranked: list[Job], metric: str | None, best: Job | None) -> str:
    if not metric or not ranked:
        return html.paragraph("No job has a finite value of the ranking metric: nothing to plot.")
    params = list(dict.fromkeys(name for job in jobs for name in job.params))
    pictures = []
    for param in params:
        points = [job for job in ranked if param in job.params]
        if len({job.params[param] for job in points}) < 2:
            continue
        xs, ys = [job.params[param] for job in points], [job.value for job in points]
        marked = next((i for i, job in enumerate(points) if job is best), None)
        groups = [" ".join(f"{k}={v}" for k, v in job.params.items() if k != param) for job in points]
        if len(set(groups)) > 8:  # too many lines to tell apart: the points alone
            groups = None
        pictures.append(html.image(metric_vs_param_png(param, xs, ys, metric, marked, groups),
                                   f"{metric} against {param} ({len(points)} completed job(s))"))
    left_out = len(jobs) - len(ranked)
    note = html.paragraph(f"{left_out} job(s) without a finite {metric} are not plotted.") if left_out else ""
    if not pictures:
        return html.paragraph("No parameter takes two or more values among the completed jobs: nothing to plot.") + note
    return html.figures(pictures) + note


def grids_section(folder: Path, best: Job | None, worst: Job | None, metric: str | None, notes: Notes) -> str:
    if best is None:
        return html.paragraph("No ranked job: no best or worst grids.")
    parts = []
    for label, job in (("best", best), ("worst", worst)) if worst is not best else (("best (the only one)", best),):
        every = training_grids(job.folder, notes, root=folder)
        grids = [(c, p) for c, p in every if c.startswith("final") or p.name == "samples.png"]
        if not grids:
            grids = every[-1:]  # no final grid: the last one written during training
        settings = " ".join(f"{k}={v}" for k, v in job.params.items()) or "(defaults)"
        caption = f"{label}: job {job.folder.name}, {settings}, {metric} = {job.value:.6g}"
        pictures = [(f"{caption} — {c}", read_image(p, notes, root=folder)) for c, p in grids]
        pictures = [(c, p) for c, p in pictures if p is not None]
        if not pictures:
            parts.append(html.paragraph(f"{caption}: no sample grid in {job.folder.name}/samples/."))
        parts.extend(html.image(p, c, "grid") for c, p in pictures)
    return html.figures(parts)
