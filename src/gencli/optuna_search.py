"""Hydra's Optuna sweeper, made resumable and able to prune: ``hparams_search=<family>_optuna``.

The search itself is Optuna's (the TPE sampler, the study in SQLite, MedianPruner) and the jobs are
Hydra's (any launcher); this subclass of ``hydra-optuna-sweeper``'s sweeper changes only what a
re-run and pruning need:

- **Resume.** With a storage (the configs use ``sqlite:///<sweep dir>/optuna.db``) the same command,
  re-run after the machine rebooted, loads the study, runs each trial that a killed sweep left
  ``RUNNING`` again as itself (same number, parameters and job folder, with ``resume=auto``, so its
  training continues from its last checkpoint) and tells the study its result, then runs only the
  trials still missing to reach ``n_trials``, numbering their job folders after the existing ones.
- **Pruning.** Each job gets its trial number as ``sweep.trial=N``; the ``OptunaPruning`` callback in
  the job reports the optimised metric at every validation and stops the run when the pruner says so.
  The job's ``job.json`` then says ``pruned``, and the sweeper records the trial as PRUNED (with its last
  reported value), which the TPE sampler and the MedianPruner treat as such.
- **Failures.** A job that fails (gencli records it and returns NaN) is a FAIL trial; the study goes on
  (``max_failure_rate`` 1 in gencli's configs).
- **A study file is data.** ``optuna.db`` may come from someone else (a copied sweep folder), and every
  parameter of a trial becomes ``name=value`` on its job's command line. So a trial is run only with exactly the
  search space's parameters, each value inside its distribution (a choice among its choices; a number of the
  right type inside its range, on its step): :func:`check_params`, for the trials a resume re-runs and for every
  new one (a queued WAITING trial in the file could carry parameters of its own). Anything else refuses the whole
  sweep in one paragraph, before any job starts, naming the parameter, the study file and the fix.

The loop below follows the plugin's own ``OptunaSweeperImpl.sweep`` (hydra-optuna-sweeper 1.3), with
those changes marked.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from gencli.errors import ConfigError, GencliError, RuntimeFailure

log = logging.getLogger(__name__)


class ResumableOptunaSweeper(OptunaSweeper):
    """``hydra.sweeper._target_`` for gencli's searches: the plugin's sweeper with :class:`ResumableOptunaSweeperImpl`."""

    def __init__(self, *args: Any, pruner: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        impl = self.sweeper
        self.sweeper = ResumableOptunaSweeperImpl.__new__(ResumableOptunaSweeperImpl)
        self.sweeper.__dict__.update(impl.__dict__)
        self.sweeper.pruner = pruner


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    pruner: Any = None

    def _configure_trials(self, trials, search_space_distributions, fixed_params):
        # gencli: a new trial is a fresh one, or a WAITING trial the study file queued: that one must not bring
        # parameters of its own, and every value drawn must lie inside the search space (see check_params)
        # (the sweep checked the stored queue before it started; this catches what was queued since, from elsewhere)
        where, stop = self.study_file(), "so the sweep stops before that trial's job starts"
        for trial in trials:
            check_queued(trial.number, trial.params, search_space_distributions, where, stop)
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        for trial in trials:
            space = dict(search_space_distributions)
            if self.custom_search_space_extender:  # the config's own code suggested these, in this process
                space.update({name: dist for name, dist in trial.distributions.items() if name not in space})
            check_params(trial.number, trial.params, space, fixed_params, where, stop)
        # gencli: every job knows its trial, so its OptunaPruning callback can report to it
        return [(*items, f"sweep.trial={trial.number}") for items, trial in zip(overrides, trials)]

    def study_file(self) -> str:
        """Where the study is stored, as a refusal names it: the SQLite file, else the storage URL (no password)."""
        return describe_storage(self.storage, self.study_name)

    def sweep(self, arguments: list[str]) -> None:
        """The search; a refusal (a crafted or unreadable study file) is one paragraph and exit 2 (1), as in a job."""
        try:
            self._sweep(arguments)
        except GencliError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"gencli error: {err.message}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)

    def _sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        search_space_distributions, fixed_params = create_params_from_overrides(params_conf)
        if self.search_space_distributions:
            search_space_distributions = {**self.search_space_distributions, **search_space_distributions}
        for name in fixed_params:
            search_space_distributions.pop(name, None)
        directions = self._get_directions()
        pruner = self.pruner() if callable(self.pruner) else self.pruner
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)  # the study's SQLite file is there
        try:
            study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                        pruner=pruner, directions=directions, load_if_exists=True)
            stored = study.trials
        except GencliError:
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt or foreign file, a database that is down: one paragraph
            first = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            raise RuntimeFailure(f"{self.study_file()} could not be opened as an Optuna study ({first}). Start a fresh "
                                 "study (hydra.sweeper.study_name=NEW, or another hydra.sweep.dir), or delete the "
                                 "file if it is not a study you want to keep.") from err

        if stored:
            self.reseed_sampler(len(stored))
        # gencli: resume what a killed sweep left behind: each trial it left running is run again as itself (same
        # trial number, parameters and job folder, with resume=auto: its training continues from its checkpoint).
        # Every one is checked against the search space before any job starts (the file may be a stranger's).
        stale = [t for t in stored if t.state == TrialState.RUNNING]
        resumed = [(t, self.trial_overrides(t, search_space_distributions, fixed_params, self.study_file(),
                                            len(stored))) for t in stale]
        for trial in stored:  # what study.ask() will hand out next must not bring parameters of its own either
            if trial.state == TrialState.WAITING:
                check_queued(trial.number, trial.params, search_space_distributions, self.study_file())
        log.info("Study %s in %s: %d trial(s) stored (%d left running by a killed sweep), %d more to run",
                 study.study_name, self.study_file(), len(stored), len(stale), max(0, self.n_trials - len(stored)))
        for trial, trial_overrides in resumed:
            overrides = (*trial_overrides, "resume=auto")
            [ret] = self.launcher.launch([overrides], initial_job_idx=trial.number)
            self.tell(study, trial.number, ret, len(directions))
        n_to_go = self.n_trials - len(study.trials)
        self.job_idx = len(study.trials)

        while n_to_go > 0:
            batch = min(n_to_go, self.n_jobs)
            trials = [study.ask() for _ in range(batch)]
            overrides = self._configure_trials(trials, search_space_distributions, fixed_params)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                self.tell(study, trial, ret, len(directions))
            n_to_go -= batch

        finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
        results: dict[str, Any] = {"name": "optuna", "trials": len(study.trials),
                                   "states": {s.name: sum(t.state == s for t in study.trials) for s in TrialState}}
        if finished and len(directions) == 1:
            best = study.best_trial
            results.update(best_params=best.params, best_value=best.value, best_trial=best.number)
            log.info("Best trial %d: %s = %s", best.number, best.params, best.value)
        OmegaConf.save(OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml")

    def reseed_sampler(self, n_stored: int) -> None:
        """A resumed study must not draw the parameters of its first trials again.

        The sampler was built from ``seed`` as in the first run, so its random start-up trials would repeat
        trial 0, 1, ... word for word. Reseed it, deterministically, from (seed, trials already stored).
        """
        import numpy as np

        seed = OmegaConf.select(self.config, "hydra.sweeper.sampler.seed", default=None)
        state = np.random.RandomState(None if seed is None else (int(seed) * 1_000_003 + n_stored) % 2**32)
        sampler = self.sampler
        if hasattr(sampler, "_rng"):
            sampler._rng = state
            inner = getattr(sampler, "_random_sampler", None)
            if inner is not None and hasattr(inner, "_rng"):
                inner._rng = np.random.RandomState(state.randint(2**31))
        elif hasattr(sampler, "reseed_rng"):
            sampler.reseed_rng()

    @staticmethod
    def trial_overrides(trial: Any, space: dict[str, BaseDistribution], fixed_params: dict[str, Any], where: str,
                        n_stored: int | None = None) -> tuple[str, ...]:
        """The overrides a stored trial ran with (as the plugin builds them), and its number; a ConfigError unless its
        parameters are exactly the search space's, each inside its distribution (:func:`check_params`)."""
        number = trial.number
        if type(number) is not int or number < 0 or (n_stored is not None and number >= n_stored):
            raise ConfigError(refusal(where, number, f"has the number {show(number)}, which is not one of the study's "
                                      f"(0 to {(n_stored or 1) - 1})", space))
        check_params(number, trial.params, space, fixed_params, where)
        params = {**trial.params, **fixed_params}
        return (*(f"{name}={value}" for name, value in params.items()), f"sweep.trial={number}")

    @staticmethod
    def tell(study: optuna.Study, trial: optuna.trial.Trial | int, ret: Any, n_objectives: int) -> None:
        """Record a job's outcome: COMPLETE with its value, PRUNED (its job.json says so), or FAIL."""
        number = trial if isinstance(trial, int) else trial.number
        record = job_record(ret)
        status = (record or {}).get("status")
        try:
            value = ret.return_value
        except Exception as err:  # noqa: BLE001 - a job that raised (HYDRA_FULL_ERROR=1): a failed trial
            log.warning("trial %d failed: %s", number, err)
            study.tell(trial, state=TrialState.FAIL)
            return
        if status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            return
        values = list(value) if isinstance(value, list | tuple) else [value]
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            values = []
        if status not in (None, "completed") or len(values) != n_objectives or not all(map(math.isfinite, values)):
            reason = (record or {}).get("reason") or f"returned {value!r}"
            log.warning("trial %d failed: %s", number, reason)
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, values=values)


def job_record(ret: Any) -> dict | None:
    """The ``job.json`` of a finished job (gencli.sweep), found through its Hydra config."""
    try:
        folder = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
        return json.loads((folder / "job.json").read_text())
    except Exception:  # noqa: BLE001 - no record: judge the job by its return value alone
        return None


# ----------------------------------------------------------------------------- a stored trial is data
def check_params(number: Any, params: dict[str, Any], space: dict[str, BaseDistribution],
                 fixed_params: dict[str, Any], where: str, stop: str = "") -> None:
    """A ConfigError, one paragraph, unless ``params`` (a trial's, as the study file stores them) name exactly the
    parameters of ``space`` (those the command line fixed may be there too: the command line's value wins) and each
    value lies inside its distribution."""
    for name in params:
        if name not in space and name not in fixed_params:
            raise ConfigError(refusal(where, number, f"has the parameter {show(name)}, which the search space does not "
                                      "declare", space, stop))
    for name, distribution in space.items():
        if name not in params:
            raise ConfigError(refusal(where, number, f"lacks the parameter {show(name)} of the search space", space,
                                      stop))
        problem = value_problem(params[name], distribution)
        if problem:
            raise ConfigError(refusal(where, number, f"has {name}={show(params[name])}, which {problem}", space, stop))


def value_problem(value: Any, distribution: BaseDistribution) -> str | None:
    """Why ``value`` is not a value of ``distribution`` (choices, range, step, log scale and type), or None."""
    if isinstance(distribution, CategoricalDistribution):
        if any(type(value) is type(choice) and value == choice for choice in distribution.choices):
            return None
        return f"is not one of its choices ({', '.join(show(c) for c in distribution.choices)})"
    low, high = getattr(distribution, "low", None), getattr(distribution, "high", None)
    if low is None or high is None:
        return f"cannot be checked: gencli does not know the distribution {type(distribution).__name__}"
    integer = "Int" in type(distribution).__name__  # IntUniform, IntLogUniform (optuna 2), IntDistribution (3)
    if integer and type(value) is not int:
        return f"is a {type(value).__name__}, not an integer"
    if not integer and type(value) is not float:
        return f"is a {type(value).__name__}, not a float"
    # a float drawn on a log scale comes back through exp(log(x)), which may land an ulp past a bound: let it
    slack = 0 if integer else 1e-12 * max(1.0, abs(low), abs(high))
    if not math.isfinite(value) or not low - slack <= value <= high + slack:
        return f"is outside its range [{low}, {high}]"
    log_scale = bool(getattr(distribution, "log", False)) or "Log" in type(distribution).__name__
    if log_scale and value <= 0:
        return "is not positive (the range is on a log scale)"
    step = getattr(distribution, "q", None) or (None if log_scale else getattr(distribution, "step", None))
    if step:
        if integer and (value - low) % int(step):
            return f"is not on its step of {step} from {low}"
        k = (value - low) / step
        if not integer and abs(k - round(k)) > 1e-8:
            return f"is not on its step of {step} from {low}"
    return None


def check_queued(number: Any, params: dict[str, Any], space: dict[str, BaseDistribution], where: str,
                 stop: str = "") -> None:
    """A queued (WAITING) trial is what ``study.ask()`` hands out next, and any parameter stored on it would reach the
    job's command line beside those drawn: a ConfigError if it carries any (Optuna's own queue, ``enqueue_trial``,
    keeps its values elsewhere, checked against the distributions when they are drawn)."""
    if params:
        raise ConfigError(refusal(where, number, f"is a queued trial that already carries the parameter "
                                  f"{show(next(iter(params)))} before any is drawn", space, stop))


def refusal(where: str, number: Any, what: str, space: dict[str, BaseDistribution], stop: str = "") -> str:
    names = ", ".join(space) or "none"
    return (f"{where}: trial {show(number)} {what}. gencli runs a stored trial only with the parameters the search "
            f"declares ({names}), each inside its range, as each becomes name=value on the job's command line; "
            f"{stop or 'so this study is not resumed and no job was started'}. Start a fresh study "
            "(hydra.sweeper.study_name=NEW, or another hydra.sweep.dir), or delete the study file to start this one "
            "over.")


def describe_storage(storage: Any, study_name: Any) -> str:
    """'the Optuna study 'ae' in /path/optuna.db' (a URL's password left out)."""
    text = str(storage)
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///"):]
    else:
        text = re.sub(r"(//[^:/@]*):[^@/]*@", r"\1:***@", text)
    return f"the Optuna study {show(study_name)} in {text}"


def show(value: Any, most: int = 120) -> str:
    """A value from a file, for a message: repr (quotes, escapes), cut short."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."
