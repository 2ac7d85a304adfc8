"""A study file is data: a resumed (or queued) trial runs only with the search space's parameters, each inside its
distribution. The databases here are crafted with Optuna's own API into a real SQLite file, as a stranger's
``optuna.db`` in a copied sweep folder would be; the search space is the real ``hparams_search=ae_optuna``."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from optuna.distributions import (
    CategoricalDistribution,
    DiscreteUniformDistribution,
    IntLogUniformDistribution,
    IntUniformDistribution,
    LogUniformDistribution,
    UniformDistribution,
)
from optuna.trial import TrialState

from gencli.errors import ConfigError
from gencli.optuna_search import ResumableOptunaSweeperImpl, describe_storage, value_problem

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONF = Path(__file__).resolve().parents[2] / "conf" / "hparams_search" / "ae_optuna.yaml"
GOOD = {"model.latent_dim": 16, "model.noise_std": 0.1, "model.optimizer.lr": 0.001}


def ae_space() -> dict:
    """The search space the sweeper builds from conf/hparams_search/ae_optuna.yaml (as ResumableOptunaSweeperImpl.sweep)."""
    params = yaml.safe_load(CONF.read_text())["hydra"]["sweeper"]["params"]
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert not fixed and set(space) == set(GOOD)
    return space


def crafted(db: Path, params: dict, state: str = "running") -> str:
    """A study 'ae' in the SQLite file ``db`` whose one trial carries ``params`` (each through a distribution of the
    file's own choosing, which need not be the search's), left RUNNING as a killed sweep leaves it (or WAITING)."""
    storage = f"sqlite:///{db}"
    study = optuna.create_study(study_name="ae", storage=storage)
    if state == "waiting":
        study.enqueue_trial({})  # a queued trial...
        trial_id = study._storage.get_all_trials(study._study_id)[-1]._trial_id
    else:
        trial_id = study.ask()._trial_id
    for name, value in params.items():
        distribution = CategoricalDistribution([value])  # any value at all: the file picks its distribution
        study._storage.set_trial_param(trial_id, name, distribution.to_internal_repr(value), distribution)
    return storage


def stored_trial(storage: str):
    [trial] = optuna.load_study(study_name="ae", storage=storage).trials
    return trial


def resume(storage: str, db: Path) -> tuple[str, ...]:
    trial = stored_trial(storage)
    assert trial.state == TrialState.RUNNING
    return ResumableOptunaSweeperImpl.trial_overrides(trial, ae_space(), {}, describe_storage(storage, "ae"), 1)


def test_a_stored_trial_inside_the_search_space_resumes_as_itself(tmp_path):
    db = tmp_path / "optuna.db"
    storage = crafted(db, GOOD)
    assert resume(storage, db) == ("model.latent_dim=16", "model.noise_std=0.1", "model.optimizer.lr=0.001",
                                   "sweep.trial=0")
    # the command line fixes a parameter: its value wins over the stored one, as when the sweep first ran
    overrides = ResumableOptunaSweeperImpl.trial_overrides(stored_trial(storage), ae_space(), {"model.latent_dim": "32"},
                                                           "where", 1)
    assert "model.latent_dim=32" in overrides and "model.latent_dim=16" not in overrides


@pytest.mark.parametrize("params, needles", [
    ({**GOOD, "hydra.job_logging.handlers.file.filename": "/tmp/owned.log"},  # (a) an undeclared parameter
     ["'hydra.job_logging.handlers.file.filename'", "which the search space does not declare"]),
    ({**GOOD, "model.noise_std": 50.0}, ["model.noise_std=50.0", "outside its range [0.0, 0.3]"]),  # (b) out of range
    ({**GOOD, "model.latent_dim": 999}, ["model.latent_dim=999", "is not one of its choices (8, 16, 32)"]),  # (c)
    ({**GOOD, "model.latent_dim": "16"}, ["model.latent_dim='16'", "not one of its choices"]),  # the type counts
    ({**GOOD, "model.optimizer.lr": 1}, ["model.optimizer.lr=1", "is a int, not a float"]),
    ({**GOOD, "model.optimizer.lr": 0.5}, ["model.optimizer.lr=0.5", "outside its range"]),  # above the log range
    ({k: v for k, v in GOOD.items() if k != "model.noise_std"}, ["lacks the parameter 'model.noise_std'"]),
    ({**GOOD, "model.noise_std": float("nan")}, ["model.noise_std=nan", "outside its range"]),
])
def test_a_crafted_stored_trial_refuses_the_resume_naming_the_parameter(tmp_path, params, needles):
    db = tmp_path / "optuna.db"
    storage = crafted(db, params)
    with pytest.raises(ConfigError) as refused:
        resume(storage, db)
    message = refused.value.message
    for needle in needles:
        assert needle in message, message
    assert f"the Optuna study 'ae' in {db}: trial 0 " in message  # the file
    assert "hydra.sweeper.study_name=NEW" in message and "delete the study file" in message  # the fix
    assert "model.latent_dim, model.noise_std, model.optimizer.lr" in message  # what the search declares
    assert "\n" not in message


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # enqueue_trial, in optuna 2.x
def test_a_queued_trial_that_carries_parameters_is_refused_before_any_job(tmp_path):
    """A WAITING trial is what study.ask() hands out next: parameters stored on it would reach the job's command
    line beside the drawn ones, so a new trial must arrive empty, and every drawn value is checked too."""
    db = tmp_path / "optuna.db"
    storage = crafted(db, {"hydra.job_logging.handlers.file.filename": "/tmp/owned.log"}, state="waiting")
    impl = ResumableOptunaSweeperImpl.__new__(ResumableOptunaSweeperImpl)
    impl.storage, impl.study_name, impl.custom_search_space_extender, impl.config = storage, "ae", None, None
    study = optuna.load_study(study_name="ae", storage=storage)
    with pytest.raises(ConfigError, match="queued trial that already carries the parameter 'hydra.job_logging"):
        impl._configure_trials([study.ask()], ae_space(), {})
    fresh = optuna.create_study(study_name="ae", storage=f"sqlite:///{tmp_path}/fresh.db")
    [overrides] = impl._configure_trials([fresh.ask()], ae_space(), {})
    assert [item.split("=")[0] for item in overrides] == [*GOOD, "sweep.trial"]


def test_values_are_checked_against_the_search_s_own_distributions():
    assert value_problem(16, CategoricalDistribution([8, 16, 32])) is None
    assert value_problem(16.0, CategoricalDistribution([8, 16, 32]))  # a float is not the int choice
    assert value_problem(True, CategoricalDistribution([1, 2]))  # nor is a bool
    assert value_problem(True, CategoricalDistribution([True, False])) is None
    assert value_problem("cosine", CategoricalDistribution(["linear", "cosine"])) is None
    assert value_problem(0.2, UniformDistribution(0.0, 0.3)) is None
    assert value_problem(0.0, UniformDistribution(0.0, 0.3)) is None
    assert "range" in value_problem(-0.1, UniformDistribution(0.0, 0.3))
    assert "range" in value_problem(float("inf"), UniformDistribution(0.0, 0.3))
    assert value_problem(0.001, LogUniformDistribution(0.0003, 0.005)) is None
    assert "range" in value_problem(0.0001, LogUniformDistribution(0.0003, 0.005))
    top = math.exp(math.log(0.005))  # 0.005000000000000002: how a sampler's log-scale draw can come back
    assert top > 0.005 and value_problem(top, LogUniformDistribution(0.0003, 0.005)) is None
    assert value_problem(0.5, DiscreteUniformDistribution(0.0, 1.0, 0.25)) is None
    assert "step of 0.25" in value_problem(0.3, DiscreteUniformDistribution(0.0, 1.0, 0.25))
    assert value_problem(4, IntUniformDistribution(0, 10, step=2)) is None
    assert "step of 2" in value_problem(3, IntUniformDistribution(0, 10, step=2))
    assert "not an integer" in value_problem(4.0, IntUniformDistribution(0, 10))
    assert "not an integer" in value_problem(True, IntUniformDistribution(0, 10))
    assert value_problem(33, IntLogUniformDistribution(1, 64)) is None  # any integer inside a log range
    assert "range" in value_problem(0, IntLogUniformDistribution(1, 64))


def test_a_file_that_is_not_a_study_and_a_password_in_a_url_are_said_plainly():
    assert describe_storage("sqlite:////runs/s/optuna.db", "ae") == "the Optuna study 'ae' in /runs/s/optuna.db"
    shown = describe_storage("postgresql://me:hunter2@db.example/optuna", "ae")
    assert "hunter2" not in shown and "me:***@db.example" in shown
