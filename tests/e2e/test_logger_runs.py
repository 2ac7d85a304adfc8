"""logger=many through the real CLI: a two-job multirun (one process) trains tiny VAEs, and every logger holds what
it should: the scalars, the sample grids, the resolved config and the final metrics of metrics.json. Read back with
each library's own reader: MLflow's client, TensorBoard's event reader, wandb's protobuf records."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from conftest import FAST_TRAIN, describe

pytestmark = pytest.mark.slow

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two jobs (latent_dim 4 and 8), one epoch each, grids every 20 steps, all four loggers."""
    from conftest import gencli

    root = tmp_path_factory.mktemp("loggers")
    home = root / "wandb_home"
    env = {"WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home), "WANDB_DATA_DIR": str(home)}
    result = gencli("train", "-m", "logger=many", "model.latent_dim=4,8", *FAST_TRAIN, "trainer.max_epochs=1",
                    "callbacks.sample_grid.every_n_steps=20", f"hydra.sweep.dir={root / 'sweep'}", cwd=root, env=env)
    assert result.returncode == 0, describe(result)
    jobs = [root / "sweep" / str(i) for i in (0, 1)]
    return root, jobs, [json.loads((job / "metrics.json").read_text()) for job in jobs], result


def test_mlflow_store_holds_both_runs(sweep):
    from mlflow import MlflowClient

    root, jobs, reports, _ = sweep
    client = MlflowClient(f"sqlite:///{root}/outputs/mlflow.db")
    experiment = client.get_experiment_by_name("gencli")
    runs = client.search_runs([experiment.experiment_id], order_by=["params.`model.latent_dim` ASC"])
    assert [r.data.params["model.latent_dim"] for r in runs] == ["4", "8"]  # one store: the runs side by side
    for run, report in zip(runs, reports):
        assert run.info.status == "FINISHED" and run.data.tags["gencli.status"] == "completed"
        assert run.data.params["model._target_"] == "gencli.families.vae.VAE"
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2
        for name, value in report["metrics"].items():
            assert run.data.metrics[f"final/{name}"] == pytest.approx(value, rel=1e-6), name
        artifacts = root / "outputs" / "mlartifacts" / run.info.run_id / "artifacts"
        config = yaml.safe_load((artifacts / "config.yaml").read_text())
        assert config["model"]["latent_dim"] == int(run.data.params["model.latent_dim"])
        steps = {int(p.name.split("+")[2]) for p in (artifacts / "images").glob("samples+step+*[0-9a-f].png")}
        assert {20, 40, report["steps"]} <= steps
        assert list((artifacts / "images").glob("reconstructions+step+*.png"))


def test_wandb_offline_runs_hold_scalars_grids_config_and_summary(sweep):
    from wandb_records import OfflineRun

    _, jobs, reports, result = sweep
    for job, report in zip(jobs, reports):
        run = OfflineRun.read(job / "wandb")  # exactly one offline run per job: the first job's run was ended
        assert "wandb sync" in (job / "train.log").read_text()
        assert run.config["model"]["_target_"] == "gencli.families.vae.VAE"
        assert sum("train/loss" in row for row in run.history) >= 2
        grids = [row for row in run.history if row.get("samples/_type") == "images/separated"]
        assert [row["trainer/global_step"] for row in grids][:2] == [20, 40]
        for row in grids:
            assert (run.directory / "files" / row["samples/filenames"][0]).is_file()
        for name, value in report["metrics"].items():
            assert run.summary[f"final/{name}"] == pytest.approx(value, rel=1e-6), name
        assert run.summary["final/status"] == "completed"
    latent = [OfflineRun.read(job / "wandb").config["model"]["latent_dim"] for job in jobs]
    assert latent == [4, 8]
    # silent: no banner or end-of-run summary from wandb (gencli's log line says where the run is and how to sync)
    assert "Run summary" not in result.stdout + result.stderr


def test_tensorboard_and_csv(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, jobs, reports, _ = sweep
    for job, report in zip(jobs, reports):
        events = EventAccumulator(str(job / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        assert {20, 40, report["steps"]} <= {e.step for e in events.Images("samples")}
        assert events.Images("reconstructions")
        final = events.Scalars("final/val/loss")
        assert final[-1].value == pytest.approx(report["metrics"]["val/loss"], rel=1e-5)
        with open(job / "csv" / "metrics.csv") as f:
            columns = next(csv.reader(f))
        assert "train/loss" in columns and not any(c.startswith("final/") for c in columns)
