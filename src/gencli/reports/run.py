"""The report of one run folder (``gencli train``, or any verb's run: it shows what the folder holds).

Sections, each built from one kind of file and each saying so when its file is missing:

1. overview — ``job.json``, ``metrics.json``, ``.hydra/config.yaml`` and ``overrides.yaml``: what ran, how it ended;
2. curves — ``csv/metrics.csv``: one small plot per logged quantity, against the step;
3. sample grids — ``samples/step_*.png`` in step order, then ``samples/final*.png`` (``samples.png`` of a sample run);
4. final metrics — ``metrics.json``: the values, their provenance, the files with their size and SHA-256;
5. evaluations and samples of this run's checkpoints — ``gencli eval``/``sample`` runs (under ``related=``
   folders, or inside this one) whose ``ckpt=`` is a file of this run: their metrics, costs, provenance, grids;
6. config — the composed config (``${a.b}`` references resolved, resolver calls as written) and the command line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gencli.reports import page as html
from gencli.reports.page import Page
from gencli.reports.plots import curve_families, curves_png
from gencli.reports.read import (
    Notes,
    TooLarge,
    file_size,
    leads_outside,
    read_curves,
    read_image,
    read_json,
    read_text,
    read_yaml,
    resolve_references,
    sha256_of,
)
from gencli.safety import lies_inside


@dataclass
class Options:
    """What ``conf/report.yaml`` sets (see there)."""

    metric: str | None = None
    direction: str | None = None
    max_grids: int = 12
    related: list[str] = field(default_factory=list)


#: Files whose SHA-256 a report lists (weights: which exact checkpoint produced the numbers).
HASHED_SUFFIXES = (".ckpt", ".safetensors")
MAX_HASHED_BYTES = 8 * 2**30


def run_report(folder: Path, options: Options) -> tuple[str, Notes]:
    notes = Notes()
    pieces = RunFiles.read(folder, notes)
    page = Page(f"gencli report: run {folder.name}")
    page.add(html.table(["", ""], overview(folder, pieces)))
    notes_at = len(page.parts)  # the notes box goes here, once every section has added its notes
    page.section("Training curves", curves_section(folder, notes), anchor="curves")
    page.section("Sample grids during training", grids_section(folder, notes, options.max_grids), anchor="grids")
    page.section("Final metrics and provenance", metrics_section(folder, pieces, notes), anchor="metrics")
    page.section("Evaluations and samples of this run's checkpoints",
                 related_section(folder, options, notes), anchor="related")
    page.section("Config", config_section(folder, pieces, notes), anchor="config")
    page.parts.insert(notes_at, html.notes_box(notes))
    return page.html(), notes


@dataclass
class RunFiles:
    config: Any
    overrides: Any
    metrics: dict | None
    job: dict | None

    @classmethod
    def read(cls, folder: Path, notes: Notes) -> RunFiles:
        return cls(config=read_yaml(folder / ".hydra" / "config.yaml", notes, root=folder),
                   overrides=read_yaml(folder / ".hydra" / "overrides.yaml", notes, root=folder),
                   metrics=read_json(folder / "metrics.json", notes, root=folder),
                   job=read_json(folder / "job.json", notes, root=folder))


def dig(tree: Any, *keys: str) -> Any:
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def overview(folder: Path, pieces: RunFiles) -> list[tuple[str, Any]]:
    metrics, job, config = pieces.metrics or {}, pieces.job or {}, pieces.config
    rows: list[tuple[str, Any]] = [("folder", str(folder))]
    for label, value in (("verb", dig(config, "task_name")), ("model", dig(config, "model", "_target_")),
                         ("data", dig(config, "data", "_target_")), ("data.root", dig(config, "data", "root")),
                         ("status", job.get("status") or metrics.get("status")), ("reason", job.get("reason")),
                         ("steps", metrics.get("steps", job.get("steps"))), ("epochs", metrics.get("epochs")),
                         ("wall time (s)", job.get("seconds")), ("resumed from", metrics.get("resumed_from"))):
        if value not in (None, ""):
            rows.append((label, value))
    objective = metrics.get("optimized_metric") or job.get("optimized_metric")
    if objective:
        rows.append((f"objective: {objective}", job.get("value", dig(metrics, "metrics", objective))))
    if isinstance(pieces.overrides, list):
        rows.append(("command line", " ".join(map(str, pieces.overrides)) or "(defaults)"))
    return rows


# ----------------------------------------------------------------------------- curves
def find_csv(folder: Path) -> Path | None:
    """Lightning's CSVLogger file: ``csv/metrics.csv`` (gencli's ``version: ""``) or ``csv/version_N/metrics.csv``."""
    direct = folder / "csv" / "metrics.csv"
    if direct.is_file():
        return direct
    versions = sorted(folder.glob("csv/*/metrics.csv"))
    return versions[-1] if versions else None


def curves_section(folder: Path, notes: Notes) -> str:
    path = find_csv(folder)
    if path is None:
        return html.paragraph("No csv/metrics.csv in this folder (logger=csv writes it): no curves.")
    curves = read_curves(path, notes, root=folder)
    if curves is None or not curves.series:
        return html.paragraph(f"{path.relative_to(folder)} holds no curves (see the notes above).")
    families = curve_families(curves)
    body = [html.paragraph(f"From {path.relative_to(folder)}: {len(curves.series)} logged value(s) in "
                           f"{len(families)} plot(s), x = optimiser step.")]
    body.append(html.figures(html.image(curves_png(name, columns, curves), f"{name}: {', '.join(columns)}")
                             for name, columns in families.items()))
    if curves.non_finite:
        body.append(html.paragraph("Left out of the plots (not finite): " + ", ".join(
            f"{column} ({count} value(s))" for column, count in sorted(curves.non_finite.items())) + "."))
    return "".join(body)


# ----------------------------------------------------------------------------- grids
STEP_GRID = re.compile(r"^step_(\d+)(_reconstructions)?\.png$")


def training_grids(folder: Path, notes: Notes, root: Path | None = None) -> list[tuple[str, Path]]:
    """(caption, file) of the grids a run wrote, in step order, the final ones last. A ``samples/`` that leads out of
    ``root`` (the folder reported; ``folder`` by default) is not even listed: a note says so."""
    samples = folder / "samples"
    found: list[tuple[int, int, str, Path]] = []
    listed = samples.is_dir()
    if listed and leads_outside(samples, root or folder):
        notes.add(samples, f"is a symbolic link (or lies below one) that leads outside {root or folder}; not listed: "
                           "a report reads only the files inside the folder it reports")
        listed = False
    for path in samples.glob("*.png") if listed else []:
        match = STEP_GRID.match(path.name)
        if match:
            recon = bool(match.group(2))
            found.append((int(match.group(1)), recon, f"step {int(match.group(1))}: "
                          f"{'inputs beside their reconstructions' if recon else 'samples'} ({path.name})", path))
        elif path.name.startswith("final"):
            recon = "reconstruction" in path.name
            found.append((2**62, recon, f"final: {'inputs beside their reconstructions' if recon else 'samples'} "
                          f"({path.name})", path))
    if (folder / "samples.png").is_file():  # a gencli sample run
        found.append((2**62, 0, "samples.png", folder / "samples.png"))
    return [(caption, path) for _, _, caption, path in sorted(found, key=lambda item: item[:2])]


def spread(items: list, most: int) -> list:
    """At most ``most`` items, evenly spaced, always keeping the first and the last."""
    if len(items) <= most or most < 2:
        return items[: max(most, 1)] if len(items) > most else items
    picks = sorted({round(i * (len(items) - 1) / (most - 1)) for i in range(most)})
    return [items[i] for i in picks]


def grids_section(folder: Path, notes: Notes, max_grids: int) -> str:
    grids = training_grids(folder, notes)
    if not grids:
        return html.paragraph("No sample grids in samples/ (callbacks.sample_grid writes them every "
                              "callbacks.sample_grid.every_n_steps steps).")
    steps = [g for g in grids if not g[0].startswith("final")]
    finals = [g for g in grids if g[0].startswith("final")]
    shown = spread(steps, max(max_grids - len(finals), 2)) + finals
    body = [html.paragraph(f"{len(shown)} of {len(grids)} grid(s)" + ("" if len(shown) == len(grids) else
                           f" (evenly spaced; max_grids={max_grids})") + ", the same fixed-seed images at each step.")]
    pictures = [(caption, read_image(path, notes, root=folder)) for caption, path in shown]
    body.append(html.figures(html.image(picture, caption, "grid") for caption, picture in pictures if picture))
    return "".join(body)


# ----------------------------------------------------------------------------- final metrics
def metrics_section(folder: Path, pieces: RunFiles, notes: Notes) -> str:
    metrics = pieces.metrics
    if metrics is None:
        return html.paragraph("No readable metrics.json in this folder: no final metrics.")
    body = []
    values = metrics.get("metrics")
    if isinstance(values, dict) and values:
        body.append(html.table(["metric", "final value"], sorted(values.items())))
    else:
        body.append(html.paragraph("metrics.json has no 'metrics' mapping."))
    non_finite = dig(metrics, "non_finite", "values")
    if isinstance(non_finite, dict) and non_finite:
        body.append(html.paragraph("Written as null because they were not finite: " + ", ".join(
            f"{k} = {v}" for k, v in non_finite.items()) + "."))
    if isinstance(metrics.get("provenance"), dict):
        body.append("<h3>Provenance</h3>" + html.table(["key", "value"], html.flatten(metrics["provenance"])))
    if isinstance(metrics.get("sampling_cost"), dict):
        body.append("<h3>Sampling cost</h3>" + html.table(["key", "value"], html.flatten(metrics["sampling_cost"])))
    files = metrics.get("files")
    if isinstance(files, dict) and files:
        body.append("<h3>Files</h3>" + html.table(["file", "path", "size (bytes)", "SHA-256"],
                                                  [(name, value, *file_facts(folder, value, notes))
                                                   for name, value in files.items()]))
    return "".join(body)


def local_copy(folder: Path, recorded: Any) -> Path | None:
    """The file a record names, in this folder: as recorded, or (a folder that was moved or copied) by its path
    below the folder's own name. Only files inside the folder: a record cannot make the report read elsewhere."""
    if not isinstance(recorded, str) or not recorded:
        return None
    path = Path(recorded)
    candidates = [path if path.is_absolute() else folder / path]
    parts = path.parts
    if folder.name in parts:  # /elsewhere/<run>/checkpoints/last.ckpt -> <this folder>/checkpoints/last.ckpt
        candidates.append(folder.joinpath(*parts[len(parts) - parts[::-1].index(folder.name):]))
    return next((c for c in candidates if lies_inside(c, folder) and c.is_file()), None)


def file_facts(folder: Path, recorded: Any, notes: Notes) -> tuple[Any, Any]:
    path = local_copy(folder, recorded)
    size = None if path is None else file_size(path, folder)
    if path is None or size is None:
        return "-", "not in this folder"
    if path.suffix not in HASHED_SUFFIXES:
        return size, "-"
    if size > MAX_HASHED_BYTES:
        return size, "not hashed (too large)"
    digest = sha256_of(path, notes, root=folder, limit=MAX_HASHED_BYTES)
    return size, digest or "unreadable"


# ----------------------------------------------------------------------------- evaluations / samples
MAX_SCANNED = 5000


def related_runs(folder: Path, roots: list[str]) -> list[Path]:
    """Run folders (up to 3 levels below each root, and below ``folder`` itself) whose ``job.json`` names a
    ``ckpt=`` file inside ``folder``."""
    found: dict[Path, None] = {}
    scanned = 0
    starts = [Path(os.path.expanduser(str(root))) for root in roots] + [folder]
    for start in starts:
        level = [start] if start.is_dir() else []
        for _ in range(4):
            following = []
            for directory in level:
                try:
                    entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue
                for entry in entries:
                    scanned += 1
                    if scanned > MAX_SCANNED:
                        break
                    path = Path(entry.path)
                    if entry.name in ("checkpoints", "csv", ".hydra", "samples", "images"):
                        continue
                    if path.resolve() != folder.resolve():
                        # a run's own record, inside that run (a link out of it is not read); what cannot be read
                        # is simply not a related run: no note for each of the thousands of folders scanned
                        record = read_json(path / "job.json", Notes(), root=path, limit=2**20) or {}
                        overrides = record.get("overrides") if isinstance(record.get("overrides"), list) else []
                        ckpts = [str(o).split("=", 1)[1] for o in overrides if str(o).startswith("ckpt=")]
                        if any(lies_inside(Path(c), folder) for c in ckpts):
                            found[path] = None
                    following.append(path)
            level = following
    return sorted(found)


def related_section(folder: Path, options: Options, notes: Notes) -> str:
    runs = related_runs(folder, options.related)
    searched = ", ".join(map(str, options.related)) or "(none)"
    if not runs:
        return html.paragraph(f"No gencli eval or sample run of this run's checkpoints was found (searched "
                              f"{searched} and this folder, 3 levels deep; related=[DIR,...] adds folders).")
    body = [html.paragraph(f"{len(runs)} run(s) of this run's checkpoints, found under {searched}.")]
    evals, grids = [], []
    for run in runs:
        job = read_json(run / "job.json", notes, root=run) or {}
        settings = " ".join(str(o) for o in job.get("overrides") or [] if not str(o).startswith("ckpt="))
        result = read_json(run / "metrics.json", notes, root=run)
        if result is not None and isinstance(result.get("metrics"), dict):
            evals.append((run, settings, job, result))
        for name in ("samples.png",):
            if (run / name).is_file():
                grids.append((f"{run.name}: {settings or '(defaults)'}", run / name, run))
    if evals:
        names = sorted({k for _, _, _, r in evals for k in r["metrics"]})
        rows = [(str(run.name), settings or "(defaults)", job.get("status"), *(result["metrics"].get(n) for n in names),
                 dig(result, "sampling_cost", "nfe"), dig(result, "sampling_cost", "seconds_per_image"))
                for run, settings, job, result in evals]
        body.append("<h3>gencli eval</h3>" + html.table(["run", "settings", "status", *names, "NFE", "s / image"],
                                                        rows))
        for run, settings, _, result in evals:
            body.append(html.details(f"provenance of {run} ({settings or 'defaults'})",
                                     html.table(["key", "value"], html.flatten(result.get("provenance") or {}))))
    if grids:
        shown = grids[: options.max_grids]
        body.append("<h3>gencli sample</h3>" + html.figures(
            html.image(picture, caption, "grid") for caption, path, run in shown
            if (picture := read_image(path, notes, root=run)) is not None))
        if len(grids) > len(shown):
            body.append(html.paragraph(f"({len(grids) - len(shown)} more not shown; max_grids={options.max_grids})"))
    return "".join(body)


# ----------------------------------------------------------------------------- config
def config_section(folder: Path, pieces: RunFiles, notes: Notes) -> str:
    import yaml

    body = []
    if isinstance(pieces.overrides, list):
        body.append("<h3>Command line</h3>" + html.pre("\n".join(map(str, pieces.overrides)) or "(defaults)"))
    if pieces.config is None:
        return "".join(body) + html.paragraph("No readable .hydra/config.yaml in this folder.")
    try:
        resolved = resolve_references(pieces.config)
        shown = yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, width=110)
        caption = ("The composed config (.hydra/config.yaml), ${a.b} references replaced by their values; resolver "
                   "calls such as ${oc.env:...} are shown as written, never run.")
    except (TooLarge, yaml.YAMLError, RecursionError):
        notes.add(folder / ".hydra" / "config.yaml", "too large to resolve; shown as written")
        shown = read_text(folder / ".hydra" / "config.yaml", notes, root=folder) or ""
        caption = "The composed config as written (.hydra/config.yaml)."
    body.append("<h3>Composed config</h3>" + html.paragraph(caption) + html.pre(shown))
    return "".join(body)
