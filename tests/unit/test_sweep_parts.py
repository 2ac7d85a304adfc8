"""The parts of gencli's sweeps, one at a time: the summary, the skip rule, Optuna's tell and pruning, and the
check that every DDP rank trains the same config."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import torch.multiprocessing as mp
from optuna.trial import TrialState

from gencli.callbacks.optuna_pruning import OptunaPruning
from gencli.optuna_search import ResumableOptunaSweeperImpl
from gencli.sweep import SweepSummary, collect, rank, swept_overrides, what_the_job_is, write_summary

optuna.logging.set_verbosity(optuna.logging.WARNING)


def job(folder: Path, status: str, value=None, lr: str = "0.1", reason=None) -> Path:
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({
        "status": status, "value": value, "optimized_metric": "val/loss", "reason": reason, "exit_code": 0,
        "seconds": 1.5, "overrides": ["model=ae", f"model.optimizer.lr={lr}"], "metrics": {"val/loss": value},
        "steps": 10, "last_checkpoint": str(folder / "last.ckpt") if status == "completed" else None}))
    return folder


# ----------------------------------------------------------------------------- the summary
def test_summary_ranks_best_first_lists_failures_and_unfinished_jobs_and_exits_1(tmp_path, capsys):
    job(tmp_path / "0", "completed", 3.0, "0.1")
    job(tmp_path / "1", "failed", None, "9", reason="the loss is NaN [rank 1]")
    job(tmp_path / "2", "completed", 1.0, "0.2")
    (tmp_path / "3" / ".hydra").mkdir(parents=True)  # killed before it could write job.json
    (tmp_path / "3" / ".hydra" / "overrides.yaml").write_text("- model=ae\n- model.optimizer.lr=0.3\n")
    (tmp_path / "not_a_job").mkdir()
    config = SimpleNamespace(hydra=SimpleNamespace(sweep=SimpleNamespace(dir=str(tmp_path))))
    with pytest.raises(SystemExit) as stop:
        SweepSummary(direction="minimize").on_multirun_end(config)
    assert stop.value.code == 1
    out, err = capsys.readouterr()
    assert "2 of 4 job(s) did not complete" in err and "sweep.skip_done=true" in err
    assert "[rank 1]" in out  # Rich markup in a reason is printed as text
    import csv

    rows = list(csv.DictReader((tmp_path / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("2", "completed"), ("0", "completed"), ("1", "failed"),
                                                       ("3", "unfinished")]
    assert [r["overrides"] for r in rows] == [f"model.optimizer.lr={lr}" for lr in ("0.2", "0.1", "9", "0.3")]
    assert rows[0]["val/loss"] == "1.0"


def test_maximize_ranks_the_largest_first_and_a_clean_sweep_does_not_exit(tmp_path):
    rows = rank([{"folder": "a", "status": "completed", "value": 1.0},
                 {"folder": "b", "status": "completed", "value": 5.0}], "maximize")
    assert [r["folder"] for r in rows] == ["b", "a"]
    job(tmp_path / "0", "completed", 2.0)
    config = SimpleNamespace(hydra=SimpleNamespace(sweep=SimpleNamespace(dir=str(tmp_path))))
    SweepSummary(direction="minimize").on_multirun_end(config)  # no SystemExit
    assert len(collect(tmp_path)) == 1 and write_summary(tmp_path / "s.csv", collect(tmp_path)).is_file()
    assert swept_overrides([{"overrides": ["a=1", "b=1"]}, {"overrides": ["a=1", "b=2"]}]) == [["b=1"], ["b=2"]]
    assert swept_overrides([{"overrides": ["b=1", "sweep.trial=0"]},
                            {"overrides": ["b=2", "sweep.trial=1", "resume=auto"]}]) == [["b=1"], ["b=2"]]


def test_skip_done_ignores_how_a_job_was_run_but_not_what_it_is():
    assert what_the_job_is(["model=ae", "sweep.skip_done=true", "resume=auto", "+resume=x"]) == ["model=ae"]
    assert what_the_job_is(["model.optimizer.lr=0.1"]) != what_the_job_is(["model.optimizer.lr=0.2"])


# ----------------------------------------------------------------------------- Optuna
def returned(value, folder: Path | None = None, raises: Exception | None = None):
    class Ret:
        hydra_cfg = SimpleNamespace(hydra=SimpleNamespace(runtime=SimpleNamespace(output_dir=str(folder or "/nowhere"))))

        @property
        def return_value(self):
            if raises is not None:
                raise raises
            return value

    return Ret()


def test_tell_records_complete_pruned_and_failed_trials(tmp_path):
    study = optuna.create_study()
    for _ in range(4):
        study.ask()
    ResumableOptunaSweeperImpl.tell(study, 0, returned(0.5), 1)
    ResumableOptunaSweeperImpl.tell(study, 1, returned(float("nan")), 1)  # gencli's failed job returns NaN
    pruned = job(tmp_path / "2", "pruned", 0.9)
    ResumableOptunaSweeperImpl.tell(study, 2, returned(0.9, pruned), 1)
    ResumableOptunaSweeperImpl.tell(study, 3, returned(None, raises=RuntimeError("boom")), 1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED,
                                               TrialState.FAIL]
    assert study.best_value == 0.5


class FakeTrainer:
    def __init__(self, epoch: int, value: float):
        self.current_epoch, self.callback_metrics = epoch, {"val/fid_domain": torch.tensor(value)}
        self.is_global_zero, self.world_size, self.should_stop, self.sanity_checking = True, 1, False, False


def test_pruning_reports_each_epoch_once_and_stops_a_lagging_trial():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    for epoch in range(3):
        good.report(1.0, step=epoch)
    study.tell(good, 1.0)

    callback = OptunaPruning(trial=1, monitor="val/fid_domain")
    callback.trial = study.ask()
    trainer = FakeTrainer(0, 0.5)  # better than the median: goes on
    callback.on_validation_end(trainer, None)
    callback.on_train_epoch_end(trainer, None)  # the same epoch again: not reported twice
    stored = study._storage.get_trial(callback.trial._trial_id)
    assert not trainer.should_stop and not callback.pruned and stored.intermediate_values == {0: 0.5}

    lagging = OptunaPruning(trial=2, monitor="val/fid_domain")
    lagging.trial = study.ask()
    trainer = FakeTrainer(0, 40.0)  # far worse than the median at epoch 0: pruned
    lagging.on_validation_end(trainer, None)
    assert trainer.should_stop and lagging.pruned


def test_pruning_is_idle_outside_an_optuna_search():
    callback = OptunaPruning(trial=None, monitor="val/loss")
    trainer = FakeTrainer(0, 1.0)
    callback.setup(trainer, None, "fit")
    callback.on_validation_end(trainer, None)
    assert not trainer.should_stop and callback.trial is None


# ----------------------------------------------------------------------------- every rank, the same run
def rank_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    from gencli.errors import RuntimeFailure
    from gencli.families.base import GenerativeModel

    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        outcomes = []
        for same in (True, False):
            model = GenerativeModel(image_shape=(1, 8, 8))
            beta = 1.0 if same or rank == 0 else 4.0
            model.run_config = {"model": {"beta": beta, "latent_dim": 8}, "seed": 0, "hydra": {"rank": rank}}
            model._trainer = SimpleNamespace(world_size=2)
            try:
                model.setup("fit")
                outcomes.append("ok")
            except RuntimeFailure as err:
                outcomes.append(err.message)
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(outcomes))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_with_different_configs_stop_before_training(tmp_path):
    mp.spawn(rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for r in range(2):
        same, different = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert same == "ok"  # the hydra part may differ (each rank's own runtime)
        assert "different configs" in different and "model.beta" in different  # every rank stops, naming the key


def test_a_job_record_reads_any_verb_s_metrics_file(tmp_path):
    """eval's metrics.json lists its files: the record takes what it understands and never fails the job."""
    from gencli.sweep import write_job_record

    (tmp_path / "metrics.json").write_text(json.dumps({"metrics": {"fid_domain": 3.5, "note": "x"},
                                                       "files": ["samples.npz"]}))
    record = json.loads(write_job_record(tmp_path, "completed", 3.5).read_text())
    assert record["metrics"] == {"fid_domain": 3.5} and record["last_checkpoint"] is None
    (tmp_path / "metrics.json").write_text("[1, 2]")
    assert json.loads(write_job_record(tmp_path, "failed", reason="r").read_text())["reason"] == "r"


# ----------------------------------------------------------------------------- configs
def test_every_search_validates_and_every_launcher_composes_with_gencli_defaults(compose_cfg):
    from gencli.config import group_options
    from gencli.schema import validate

    searches = group_options("hparams_search")
    assert {"ae_optuna", "vae_optuna", "gan_optuna", "ddpm_optuna"} <= set(searches)
    for search in searches:
        cfg = compose_cfg("train", [f"hparams_search={search}"])
        validate(cfg, "train")
        assert cfg.hydra.sweeper.storage.startswith("sqlite:///") and cfg.hydra.sweeper.pruner is not None
        assert cfg.optimized_metric in ("val/loss", "val/bpd", "val/fid_domain")
    slurm = compose_cfg("train", ["hydra/launcher=submitit_slurm"]).hydra.launcher
    local = compose_cfg("train", ["hydra/launcher=submitit_local"]).hydra.launcher
    joblib = compose_cfg("train", ["hydra/launcher=joblib"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.additional_parameters.signal == "USR1@300"
    assert slurm.qos is None and slurm.max_num_timeout == 3  # the plugin's own keys are there too
    assert local._target_.endswith("LocalLauncher") and local.gpus_per_node == 0
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 2


def test_a_job_judges_its_trial_with_the_pruner_the_search_configured(tmp_path):
    """The study in SQLite does not store its pruner: the job must build the configured one, not Optuna's default."""
    from gencli.callbacks.optuna_pruning import load_trial

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="s", storage=storage)
    for value in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0):  # more than the default pruner's 5 start-up trials
        trial = study.ask()
        trial.report(value, step=0)
        study.tell(trial, value)
    study.ask()  # trial 6, RUNNING: the job's
    sweeper = {"storage": storage, "study_name": "s",
               "pruner": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 1}}
    trial = load_trial(sweeper, 6)
    assert trial.number == 6 and trial.study.pruner._n_warmup_steps == 1
    trial.report(100.0, step=0)  # far worse, but inside the configured warm-up: not pruned
    assert not trial.should_prune()
    trial.report(100.0, step=1)
    assert trial.should_prune() is False  # no other trial reported step 1: nothing to compare with
    assert isinstance(load_trial({**sweeper, "pruner": None}, 6).study.pruner, optuna.pruners.NopPruner)
    from gencli.errors import ConfigError

    with pytest.raises(ConfigError, match="is not one of Optuna's pruners"):  # built from config: Optuna's only
        load_trial({**sweeper, "pruner": {"_target_": "os.system", "command": "echo owned"}}, 6)
    with pytest.raises(ConfigError, match="plain value"):  # nor anything nested inside an allowed pruner
        load_trial({**sweeper, "pruner": {"_target_": "optuna.pruners.MedianPruner",
                                          "n_startup_trials": {"_target_": "os.getpid"}}}, 6)
