"""Sweeps you can read and re-run: a record per job, a summary per sweep, finished jobs skipped.

Every gencli job writes ``job.json`` into its output folder when it ends (the job wrapper,
:func:`gencli.jobs.common.run_job`, does it): its status (``completed``, ``failed``, ``interrupted``,
``pruned``, ``skipped``), the value it returned (the train job's ``optimized_metric``), the reason for a
failure in one paragraph, its overrides, its wall time and its final metrics and checkpoint.

In a multirun (``gencli train -m ...``, basic or Optuna sweeper, any launcher) a job that fails is
recorded and the sweep goes on: the job returns NaN, which Optuna records as a failed trial. At the
end, :class:`SweepSummary` (a Hydra callback, ``conf/hydra/default.yaml``) reads every job's record
from the sweep folder, so it works whatever process or machine ran the jobs, writes
``sweep_summary.csv`` and prints a Rich table, best first; the command then exits 1 if any job failed.

``sweep.skip_done=true`` makes a re-run of the same sweep (same ``hydra.sweep.dir``) skip the jobs
whose record says they completed with the same overrides, and continue the unfinished ones from their
last checkpoint (``resume=auto``), so a killed sweep loses at most what its running jobs had not saved.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gencli.io import atomic_write, write_json

log = logging.getLogger(__name__)

JOB_RECORD = "job.json"
SUMMARY = "sweep_summary.csv"


# ----------------------------------------------------------------------------- where a job runs
def hydra_runtime() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    from hydra.types import RunMode

    runtime = hydra_runtime()
    return runtime is not None and runtime.mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    runtime = hydra_runtime()
    return list(runtime.overrides.task) if runtime is not None else []


# ----------------------------------------------------------------------------- the Optuna sweeper's packages
#: sweepers (``hydra.sweeper._target_`` prefixes) that need optuna and hydra-optuna-sweeper
OPTUNA_SWEEPERS = ("hydra_plugins.gencli_sweepers.", "hydra_plugins.hydra_optuna_sweeper.")
#: what gencli's own requirements pin for the Optuna search (pyproject.toml): the plugin, and the SQLite stack its
#: optuna 2.x needs to store a study
OPTUNA_INSTALL = "pip install 'hydra-optuna-sweeper>=1.2' 'sqlalchemy>=1.4,<2' 'alembic>=1.5,<1.14'"


def require_optuna(asked_by: str) -> None:
    """ConfigError, one paragraph with the pip command, when the Optuna search cannot be loaded."""
    import importlib

    try:
        importlib.import_module("optuna")
        importlib.import_module("hydra_plugins.hydra_optuna_sweeper._impl")
    except ImportError as err:
        from gencli.errors import ConfigError

        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise ConfigError(f"{asked_by} runs an Optuna search, which needs the optuna and hydra-optuna-sweeper "
                          f"packages, and they cannot be imported ({reason}). Install them: {OPTUNA_INSTALL} "
                          "(gencli's own requirements; 'pip install -e .' in a gencli checkout installs them too), "
                          "or run a plain sweep without hparams_search= (gencli train -m key=a,b).") from err


def check_sweeper(cfg: Any, multirun: bool) -> None:
    """Before Hydra starts (``gencli.config.precheck``): a search whose sweeper needs optuna, without optuna, is one
    paragraph, not Hydra's 'Unknown plugin class' traceback. Other commands never import optuna."""
    from omegaconf import OmegaConf

    mode = OmegaConf.select(cfg, "hydra.mode", default=None)
    if not (multirun or str(getattr(mode, "name", mode)).upper() == "MULTIRUN"):
        return
    target = OmegaConf.select(cfg, "hydra.sweeper._target_", default=None)
    if isinstance(target, str) and target.startswith(OPTUNA_SWEEPERS):
        choice = OmegaConf.select(cfg, "hydra.runtime.choices.hparams_search", default=None)
        require_optuna(f"hparams_search={choice}" if choice else f"hydra.sweeper._target_={target}")


# ----------------------------------------------------------------------------- the record of one job
def write_job_record(out_dir: str | Path, status: str, value: Any = None, reason: str | None = None,
                     exit_code: int = 0, seconds: float = 0.0) -> Path:
    """``job.json`` in ``out_dir``: what a sweep summary (or a person) needs to know about how the job ended."""
    out = Path(out_dir)
    metrics = read_json(out / "metrics.json") or {}  # train's layout; other verbs' files may differ: read defensively
    files = metrics.get("files") if isinstance(metrics.get("files"), dict) else {}
    values = dict(metrics.get("metrics")) if isinstance(metrics.get("metrics"), dict) else {}
    cost = metrics.get("sampling_cost") if isinstance(metrics.get("sampling_cost"), dict) else {}
    for key, name in COST_COLUMNS.items():  # eval: what each image cost, for NFE-vs-quality tables
        if isinstance(cost.get(key), int | float):
            values[name] = cost[key]
    if status == "completed" and metrics.get("status") == "pruned":
        status, reason = "pruned", metrics.get("reason")
    runtime = hydra_runtime()
    record = {
        "status": status,
        "value": finite_or_none(value),
        "optimized_metric": metrics.get("optimized_metric"),
        "reason": reason,
        "exit_code": exit_code,
        "seconds": round(float(seconds), 2),
        "job": int(runtime.job.num) if runtime is not None and runtime.job.get("num") is not None else None,
        "overrides": job_overrides(),
        "metrics": {k: v for k, v in values.items() if isinstance(v, int | float)},
        "steps": metrics.get("steps"),
        "last_checkpoint": files.get("last_checkpoint"),
    }
    return write_json(out / JOB_RECORD, record)


#: eval's metrics.json "sampling_cost" entries, as job.json metrics
COST_COLUMNS = {"nfe": "nfe", "seconds_per_image": "sample_s_per_image"}


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


#: overrides that say how to run a job, not what it is: a re-run that adds them is the same job
HOW_TO_RUN = frozenset({"sweep.skip_done", "resume"})


def what_the_job_is(overrides: list[str]) -> list[str]:
    """``overrides`` without those in :data:`HOW_TO_RUN` (``sweep.skip_done=true``, ``resume=auto``)."""
    return [item for item in overrides if item.split("=", 1)[0].lstrip("+~") not in HOW_TO_RUN]


def finished_record(out_dir: str | Path) -> dict | None:
    """The record of a job that completed in ``out_dir`` with this job's overrides, if there is one."""
    record = read_json(Path(out_dir) / JOB_RECORD)
    if (record and record.get("status") == "completed"
            and what_the_job_is(list(record.get("overrides") or [])) == what_the_job_is(job_overrides())):
        return record
    return None


# ----------------------------------------------------------------------------- the summary of a sweep
class SweepSummary(Callback):
    """After a multirun: ``sweep_summary.csv`` and a Rich table of every job, best first; exit 1 if any failed."""

    def __init__(self, direction: str | None = None):
        self.direction = direction

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = collect(sweep_dir)
        if not rows:
            return
        direction = self.direction or sweep_direction(config)
        if getattr(config, "task_name", None) == "eval":  # no optimised value: ordered by the swept settings
            rows = sorted(rows, key=lambda row: (what_the_job_is(list(row.get("overrides") or [])),
                                                 (row.get("metrics") or {}).get("nfe") or 0))
            path = write_summary(sweep_dir / SUMMARY, rows)
            print_eval_summary(rows, path)
        else:
            rows = rank(rows, direction)
            path = write_summary(sweep_dir / SUMMARY, rows)
            print_summary(rows, path, direction)
        failed = [row for row in rows if row["status"] not in ("completed", "pruned")]  # failed, interrupted, unfinished
        if failed:
            print(f"gencli: {len(failed)} of {len(rows)} job(s) did not complete (see {path}); "
                  f"re-run the same command with sweep.skip_done=true to run only those.", file=sys.stderr)
            sys.exit(1)


def sweep_direction(config: DictConfig) -> str:
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if isinstance(direction, str) and direction.lower() in ("minimize", "maximize"):
        return direction.lower()
    mode = OmegaConf.select(config, "model.monitor_mode", default="min")
    return "maximize" if mode == "max" else "minimize"


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir()) if sweep_dir.is_dir() else []:
        record = read_json(folder / JOB_RECORD)
        if record is None:
            if (folder / ".hydra").is_dir():  # a job that never got to the end (killed with the sweep)
                record = {"status": "unfinished", "reason": "no job.json: the job was killed or is still running",
                          "overrides": _overrides_of(folder)}
            else:
                continue
        rows.append({"folder": folder.name, **record})
    return rows


def _overrides_of(folder: Path) -> list[str]:
    try:
        import yaml

        return list(yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or [])
    except Exception:  # noqa: BLE001 - a folder without readable overrides is listed without them
        return []


def rank(rows: list[dict], direction: str) -> list[dict]:
    sign = -1.0 if direction == "maximize" else 1.0

    def key(row: dict):
        value = row.get("value")
        ok = row.get("status") == "completed" and value is not None
        return (0 if ok else 1, sign * value if ok else 0.0, str(row.get("folder")))

    return sorted(rows, key=key)


def swept_overrides(rows: list[dict]) -> list[list[str]]:
    """Each job's overrides without those every job shares (the swept values only), nor ``sweep.trial=N`` (an
    Optuna job's folder is its trial number) and the run-how overrides of :data:`HOW_TO_RUN`."""
    lists = [[item for item in what_the_job_is(list(row.get("overrides") or []))
              if item.split("=", 1)[0] != "sweep.trial"] for row in rows]
    common = set.intersection(*(set(items) for items in lists)) if len(lists) > 1 else set()
    return [[item for item in items if item not in common] for items in lists]


def write_summary(path: Path, rows: list[dict]) -> Path:
    metric_names = sorted({name for row in rows for name in (row.get("metrics") or {})})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rank", "job", "overrides", "status", "value", "optimized_metric", "seconds", "steps",
                     "last_checkpoint", "reason", *metric_names])
    for i, (row, swept) in enumerate(zip(rows, swept_overrides(rows)), 1):
        metrics = row.get("metrics") or {}
        writer.writerow([i, row.get("folder"), " ".join(swept), row.get("status"), row.get("value"),
                         row.get("optimized_metric"), row.get("seconds"), row.get("steps"), row.get("last_checkpoint"),
                         row.get("reason"), *(metrics.get(name) for name in metric_names)])
    with atomic_write(path, "w") as f:
        f.write(buffer.getvalue())
    return path


def print_summary(rows: list[dict], path: Path, direction: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    metric = next((row.get("optimized_metric") for row in rows if row.get("optimized_metric")), None) or "value"
    table = Table(title=f"sweep: {len(rows)} job(s), {metric} ({direction}), best first -> {path}")
    for name in ("#", "job", "overrides", "status", metric, "other metrics", "s", "checkpoint / reason"):
        table.add_column(name, overflow="fold")
    for i, (row, swept) in enumerate(zip(rows, swept_overrides(rows)), 1):
        metrics = row.get("metrics") or {}
        others = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                           if k != metric and isinstance(v, int | float) and k.startswith("val/"))[:120]
        value = row.get("value")
        detail = row.get("last_checkpoint") if row.get("status") == "completed" else (row.get("reason") or "")[:160]
        cells = (str(i), str(row.get("folder")), " ".join(swept) or "-", str(row.get("status")),
                 f"{value:.6g}" if isinstance(value, int | float) else "-", others or "-",
                 f"{row.get('seconds') or 0:.0f}", str(detail or ""))
        table.add_row(*(escape(cell) for cell in cells))  # reasons may hold [brackets] that Rich reads as markup
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: wide rows rather than folded cells
    console.print(table)


def print_eval_summary(rows: list[dict], path: Path) -> None:
    """An eval sweep (``gencli eval -m ... sampler=ddim,dpmpp_2m sampler.steps=10,20``): one row per job with its
    settings, network evaluations and seconds per image beside every metric it measured."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    order = ("fid", "kid", "is", "precision", "recall", "density", "coverage")  # the usual reading order; stds in the CSV
    names = sorted({k for row in rows for k in (row.get("metrics") or {}) if not k.endswith("_std")}
                   - set(COST_COLUMNS.values()),
                   key=lambda k: (next((i for i, p in enumerate(order) if k.split("_")[0] == p), len(order)), k))
    table = Table(title=f"eval sweep: {len(rows)} job(s) -> {path} (all columns, stds too, in the CSV)")
    for name in ("job", "settings", "status", "NFE", "s / image", *names):
        table.add_column(name, no_wrap=name == "settings", overflow="fold",
                         justify="left" if name in ("job", "settings", "status") else "right")
    for row, swept in zip(rows, swept_overrides(rows)):
        metrics = row.get("metrics") or {}

        def cell(value: Any, fmt: str = ".4g") -> str:
            return format(value, fmt) if isinstance(value, int | float) else "-"

        table.add_row(*(escape(c) for c in (
            str(row.get("folder")), " ".join(swept) or "-", str(row.get("status")), cell(metrics.get("nfe"), "d")
            if isinstance(metrics.get("nfe"), int) else cell(metrics.get("nfe")), cell(metrics.get("sample_s_per_image")),
            *(cell(metrics.get(name)) for name in names))))
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 220)  # logs and pipes: one line per job
    console.print(table)


# ----------------------------------------------------------------------------- DDP inside a sweep
class ranks_run_this_job:  # noqa: N801 - a context manager, used like a function
    """While a sweep's job fits: the extra ranks Lightning's DDP launcher starts run this job, not the sweep.

    Lightning starts each extra rank by re-running ``sys.argv`` plus ``hydra.run.dir=<HydraConfig run.dir>``.
    In a multirun that command line is the whole sweep (``-m ...`` or ``hparams_search=...``), so every
    rank would run a sweep of its own (with Optuna: other hyper-parameters; lightning-hydra-template #393).
    Inside this block ``sys.argv`` is this job's own overrides with ``hydra.mode=RUN``, and Hydra's run
    folder is this job's folder, so each rank joins exactly this job, in its directory.

    On the way out the launching process forgets the job's process group and the environment Lightning's
    launcher left in it (``LOCAL_RANK``, ``MASTER_PORT``, ...): with ``LOCAL_RANK`` set, the next job's
    Lightning would take the process for a rank that someone else launched, start no ranks and wait for
    them forever.
    """

    #: what Lightning's subprocess launcher writes into the launching process's environment
    LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")

    def __init__(self, output_dir: str | Path, job_module: str = "gencli.jobs.train"):
        self.output_dir = str(output_dir)
        self.job_module = job_module
        self._argv: list[str] | None = None
        self._main_spec: Any = None
        self._run_dir = None
        self._env: dict[str, str | None] = {}

    def __enter__(self):
        if not in_multirun():
            return self
        import os

        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        self._argv = list(sys.argv)
        self._env = {name: os.environ.get(name) for name in self.LAUNCH_ENV}
        # The command is the job's own module, whatever process runs the job: the gencli CLI, or a launcher's
        # worker (submitit runs 'python -m submitit.core._submit', which would not run a gencli job)
        import importlib

        module = importlib.import_module(self.job_module)
        sys.argv = [str(module.__file__), *job_overrides(), "hydra.mode=RUN"]
        main = sys.modules["__main__"]
        self._main_spec = getattr(main, "__spec__", None)
        if self._main_spec is not None:  # Lightning re-runs 'python -m <__main__.__spec__.name>' then
            main.__spec__ = module.__spec__
        run = HydraConfig.instance().cfg.hydra.run
        with read_write(run), open_dict(run):
            self._run_dir = run.dir
            run.dir = self.output_dir
        return self

    def __exit__(self, *exc) -> None:
        if self._argv is None:
            return
        import torch.distributed as dist
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        if dist.is_available() and dist.is_initialized():
            # Lightning keeps the group after fit; the sweep's next job in this process needs a new one (this job's
            # other ranks have exited), so this job leaves it
            dist.destroy_process_group()

        import os

        for name, value in self._env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.argv = self._argv
        if self._main_spec is not None:
            sys.modules["__main__"].__spec__ = self._main_spec
        run = HydraConfig.instance().cfg.hydra.run
        with read_write(run), open_dict(run):
            run.dir = self._run_dir
