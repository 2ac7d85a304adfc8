"""Multirun sweeps end to end: failures recorded, summaries, skip_done re-runs, launchers, resumable Optuna
studies and DDP trials.

Every test runs the real ``gencli train -m`` / ``hparams_search=`` command in a subprocess on tiny digits
(8x8, 300 images, one epoch), with the sweep folder under the test's tmp_path.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import describe

pytestmark = pytest.mark.slow

TINY = ["model=ae", "data.image_size=8", "data.max_images=300", "trainer.max_epochs=1", "callbacks=minimal",
        "callbacks.sample_grid.n=4"]


def sweep_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gencli.cli", "train", *args], cwd=tmp_path, env=sweep_env(),
                          capture_output=True, text=True, timeout=timeout)


def records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/job.json"))}


def summary(sweep: Path) -> list[dict]:
    with open(sweep / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def study_trials(sweep: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep}/optuna.db").trials


# ----------------------------------------------------------------------------- basic sweeps
def test_a_failed_job_is_recorded_the_sweep_goes_on_and_skip_done_reruns_only_what_did_not_complete(tmp_path):
    """joblib launcher (2 jobs at once): lr=1e9 diverges (NaN) in job 1; jobs 0 and 2 complete; exit 1 at the end."""
    sweep = tmp_path / "sweep"
    command = ["-m", "hydra/launcher=joblib", *TINY, "model.optimizer.lr=0.001,1e9,0.002", f"hydra.sweep.dir={sweep}"]
    first = run(tmp_path, *command)
    assert first.returncode == 1, describe(first)
    assert "1 of 3 job(s) did not complete" in first.stderr, describe(first)
    jobs = records(sweep)
    assert {k: v["status"] for k, v in jobs.items()} == {"0": "completed", "1": "failed", "2": "completed"}
    assert "the loss is NaN" in jobs["1"]["reason"] and jobs["1"]["exit_code"] == 1
    for done in ("0", "2"):
        assert jobs[done]["value"] == pytest.approx(jobs[done]["metrics"]["val/loss"])
        assert Path(jobs[done]["last_checkpoint"]).is_file()
    rows = summary(sweep)
    # best first: the two completed jobs by val/loss, then the failure with its one-line reason
    assert [row["status"] for row in rows] == ["completed", "completed", "failed"]
    assert float(rows[0]["value"]) <= float(rows[1]["value"])
    assert float(rows[2]["overrides"].removeprefix("model.optimizer.lr=")) == 1e9 and "NaN" in rows[2]["reason"]
    assert rows[0]["optimized_metric"] == "val/loss" and rows[0]["val/recon_mse"]
    assert "sweep: 3 job(s), val/loss (minimize), best first" in first.stdout

    stamps = {k: (sweep / k / "job.json").stat().st_mtime_ns for k in ("0", "2")}
    again = run(tmp_path, *command, "sweep.skip_done=true")
    assert again.returncode == 1, describe(again)  # job 1 diverges again: still reported
    assert {k: (sweep / k / "job.json").stat().st_mtime_ns for k in ("0", "2")} == stamps  # not run again
    assert (sweep / "1" / "job.json").stat().st_mtime_ns > stamps["0"]
    assert "already completed" in again.stdout + again.stderr + (sweep / "0" / "train.log").read_text()
    assert [row["status"] for row in summary(sweep)] == ["completed", "completed", "failed"]


def test_submitit_local_sweep_of_two_ddp_jobs_end_to_end(tmp_path):
    """Each job a submitit process ('python -m submitit.core._submit'), each with 2 DDP ranks: rank 1 must be
    started as the gencli job, not as submitit's runner."""
    sweep = tmp_path / "sweep"
    result = run(tmp_path, "-m", "hydra/launcher=submitit_local", "trainer=ddp_cpu", *TINY, "model.latent_dim=4,8",
                 f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, describe(result)
    jobs = records(sweep)
    assert sorted(jobs) == ["0", "1"] and all(job["status"] == "completed" for job in jobs.values())
    assert (sweep / ".submitit").is_dir()  # each job ran as its own submitit process, with its logs there
    assert any((sweep / ".submitit").rglob("*_result.pkl"))
    rows = summary(sweep)
    assert sorted(row["overrides"] for row in rows) == ["model.latent_dim=4", "model.latent_dim=8"]
    for name, job in jobs.items():
        logs = [(sweep / name / log).read_text() for log in ("train.log", "train_ddp_process_1.log")]
        assert "DDP rank 0 of 2: run config" in logs[0] and "DDP rank 1 of 2: run config" in logs[1]
        ckpt = torch.load(job["last_checkpoint"], map_location="cpu", weights_only=True)
        assert ckpt["global_step"] > 0


# ----------------------------------------------------------------------------- Optuna
def test_an_optuna_study_killed_after_one_trial_resumes_and_ends_with_three_trials(tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "gencli.cli", "train", "hparams_search=ae_optuna", *TINY[1:],
               "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=sweep_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (sweep / "1" / ".hydra").is_dir():  # trial 0 has finished, trial 1 has started
            assert proc.poll() is None and time.time() < deadline, "the sweep ended before trial 1 started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the machine 'reboots': no handler runs
        proc.wait()
    from optuna.trial import TrialState

    before = study_trials(sweep, "ae")
    states = [t.state for t in before]
    assert states[0] == TrialState.COMPLETE and len(states) == 2, states  # trial 1 left RUNNING by the kill

    result = subprocess.run(command, cwd=tmp_path, env=sweep_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, describe(result)
    trials = study_trials(sweep, "ae")
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert "2 trial(s) stored (1 left running by a killed sweep), 1 more to run" in result.stdout + result.stderr
    assert trials[1].params == before[1].params  # the killed trial ran again as itself
    assert trials[2].params != trials[0].params  # the resumed sampler did not start its draws over
    jobs = records(sweep)
    assert sorted(jobs) == ["0", "1", "2"]
    for t in trials:  # each trial ran in its own folder with its own parameters, and its value is the study's
        job = jobs[str(t.number)]
        assert f"sweep.trial={t.number}" in job["overrides"]
        assert f"model.latent_dim={t.params['model.latent_dim']}" in job["overrides"]
        assert job["value"] == pytest.approx(t.value)
    results = (sweep / "optimization_results.yaml").read_text()
    assert "trials: 3" in results and "COMPLETE: 3" in results
    assert min(t.value for t in trials) == pytest.approx(float(summary(sweep)[0]["value"]))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # enqueue_trial, in optuna 2.x
def test_a_crafted_study_file_is_refused_before_any_job_and_a_sound_one_resumes(tmp_path):
    """optuna.db from a stranger: a RUNNING trial whose parameter is not the search's would become an override of
    the job (here: where Hydra writes the job's log). One paragraph, exit 2, no job; a sound trial resumes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_study_file import GOOD, crafted

    log = tmp_path / "owned.log"
    sweep = tmp_path / "crafted"
    sweep.mkdir()
    crafted(sweep / "optuna.db", {**GOOD, "hydra.job_logging.handlers.file.filename": str(log)})
    result = run(tmp_path, "hparams_search=ae_optuna", *TINY[1:], "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr and "gencli error:" in result.stderr
    assert "'hydra.job_logging.handlers.file.filename', which the search space does not declare" in result.stderr
    assert f"{sweep}/optuna.db" in result.stderr
    assert sorted(p.name for p in sweep.iterdir()) == ["optuna.db"] and not log.exists()  # no job ran

    queued = tmp_path / "queued"  # the same parameter on a WAITING trial, which study.ask() would hand out next
    queued.mkdir()
    crafted(queued / "optuna.db", {"hydra.job_logging.handlers.file.filename": str(log)}, state="waiting")
    result = run(tmp_path, "hparams_search=ae_optuna", *TINY[1:], "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={queued}")
    assert result.returncode == 2, describe(result)
    assert "is a queued trial that already carries the parameter 'hydra.job_logging" in result.stderr
    assert "no job was started" in result.stderr and not log.exists()

    sound = tmp_path / "sound"
    sound.mkdir()
    crafted(sound / "optuna.db", GOOD)
    result = run(tmp_path, "hparams_search=ae_optuna", *TINY[1:], "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={sound}")
    assert result.returncode == 0, describe(result)
    from optuna.trial import TrialState

    [trial] = study_trials(sound, "ae")
    assert trial.state == TrialState.COMPLETE and trial.params == GOOD
    assert "model.latent_dim=16" in records(sound)["0"]["overrides"]


def test_ddp_trials_of_an_optuna_sweep_train_the_same_hyperparameters_on_both_ranks(tmp_path):
    """trainer=ddp_cpu: Lightning re-runs the command for rank 1; it must join its trial, not start a sweep."""
    sweep = tmp_path / "sweep"
    result = run(tmp_path, "hparams_search=vae_optuna", "trainer=ddp_cpu", *TINY[1:], "hydra.sweeper.n_trials=2",
                 f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, describe(result)
    from optuna.trial import TrialState

    trials = study_trials(sweep, "vae")
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # one folder per trial, no more
    assert not list(tmp_path.glob("outputs/**/multirun.yaml"))  # no rank started a sweep of its own
    hashes = {}
    for t in trials:
        folder = sweep / str(t.number)
        logs = {rank: (folder / name).read_text() for rank, name in ((0, "train.log"),
                                                                    (1, "train_ddp_process_1.log"))}
        found = {rank: re.findall(rf"DDP rank {rank} of 2: run config (\w+)", text) for rank, text in logs.items()}
        assert len(found[0]) == 1 and found[0] == found[1], found  # both ranks: the same config, checked at setup
        hashes[t.number] = found[0][0]
        config = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        stored = config["gencli"]["config"]["model"]
        assert stored["beta"] == pytest.approx(t.params["model.beta"])
        assert stored["latent_dim"] == t.params["model.latent_dim"]
        assert records(sweep)[str(t.number)]["value"] == pytest.approx(t.value)  # one result per trial
    assert hashes[0] != hashes[1]
    # train returns optimized_metric (val/bpd): the study's best is the smallest bits/dim of the two trials
    results = (sweep / "optimization_results.yaml").read_text()
    best = float(results.split("best_value:")[1].split()[0])
    bpd = [json.loads((sweep / str(t.number) / "metrics.json").read_text())["metrics"]["val/bpd"] for t in trials]
    assert best == pytest.approx(min(bpd), rel=1e-5) and "model.beta" in results
