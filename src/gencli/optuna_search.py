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

The loop below follows the plugin's own ``OptunaSweeperImpl.sweep`` (hydra-optuna-sweeper 1.3), with
those changes marked.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import OmegaConf
from optuna.trial import TrialState

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
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params)
        # gencli: every job knows its trial, so its OptunaPruning callback can report to it
        return [(*items, f"sweep.trial={trial.number}") for items, trial in zip(overrides, trials)]

    def sweep(self, arguments: list[str]) -> None:
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
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=self.sampler,
                                    pruner=pruner, directions=directions, load_if_exists=True)

        if study.trials:
            self.reseed_sampler(len(study.trials))
        # gencli: resume what a killed sweep left behind: each trial it left running is run again as itself (same
        # trial number, parameters and job folder, with resume=auto: its training continues from its checkpoint)
        stale = [t for t in study.trials if t.state == TrialState.RUNNING]
        log.info("Study %s in %s: %d trial(s) stored (%d left running by a killed sweep), %d more to run",
                 study.study_name, self.storage, len(study.trials), len(stale), max(0, self.n_trials - len(study.trials)))
        for trial in stale:
            overrides = (*self.trial_overrides(trial, fixed_params), "resume=auto")
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
    def trial_overrides(trial: Any, fixed_params: dict[str, Any]) -> tuple[str, ...]:
        """The overrides a stored trial ran with (as the plugin builds them), and its number."""
        params = {**trial.params, **fixed_params}
        return (*(f"{name}={value}" for name, value in params.items()), f"sweep.trial={trial.number}")

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
