"""logger=wandb|mlflow|many: composition, the missing-package refusal, and gencli.loggers against the real loggers
(an offline W&B run and a SQLite MLflow store in tmp_path, read back with each library's own reader)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import describe
from gencli.config import precheck
from gencli.errors import ConfigError
from gencli.loggers import (
    MLFLOW_PARAM_VALUE,
    close,
    flatten,
    kind,
    log_config,
    log_final_metrics,
    log_image,
    mlflow_params,
)

CONFIG = {"task_name": "train", "seed": 0, "run_name": None, "model": {"_target_": "gencli.families.vae.VAE",
          "latent_dim": 8, "image_shape": [1, 16, 16], "optimizer": {"lr": 0.001}}, "hydra": {"not": "logged"}}


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    """W&B offline, silent, with its own folders in tmp_path (nothing in ~), and WANDB_MODE restored afterwards
    (Lightning's WandbLogger(offline=True) sets it for the whole process)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))


def test_logger_options_compose(compose_cfg, tmp_path):
    cfg = compose_cfg("train", ["logger=wandb"])
    wandb = cfg.logger.wandb
    assert wandb._target_ == "lightning.pytorch.loggers.WandbLogger"
    assert wandb.offline is True and wandb.log_model is False and wandb.project == "gencli"
    assert wandb.save_dir == str(tmp_path / "run") and wandb.settings.console == "off"
    mlflow = compose_cfg("train", ["logger=mlflow", "run_name=r1"]).logger.mlflow
    assert mlflow.tracking_uri == "sqlite:///./outputs/mlflow.db" and mlflow.run_name == "r1"
    assert mlflow.artifact_location == "./outputs/mlartifacts" and mlflow.log_model is False
    assert set(compose_cfg("train", ["logger=many"]).logger) == {"csv", "tensorboard", "wandb", "mlflow"}
    # Hydra composes a list of options, each under its own key
    assert list(compose_cfg("train", ["logger=[csv,wandb]"]).logger) == ["csv", "wandb"]
    assert list(compose_cfg("train", ["logger=[tensorboard,mlflow]"]).logger) == ["tensorboard", "mlflow"]


def test_cfg_job_shows_every_logger_key(run_gencli):
    result = run_gencli("train", "logger=many", "--cfg", "job")
    assert result.returncode == 0, describe(result)
    logger = yaml.safe_load(result.stdout)["logger"]
    assert logger["wandb"] == {"_target_": "lightning.pytorch.loggers.WandbLogger", "_convert_": "all",
                               "project": "gencli", "name": "${run_name}", "job_type": "${task_name}",
                               "save_dir": "${paths.output_dir}", "offline": True, "log_model": False,
                               "settings": {"silent": True, "console": "off"}}
    assert set(logger["mlflow"]) == {"_target_", "experiment_name", "run_name", "tracking_uri", "artifact_location",
                                     "log_model"}


@pytest.mark.parametrize("option,package", [("wandb", "wandb"), ("mlflow", "mlflow"), ("many", "wandb"),
                                            ("[csv,mlflow]", "mlflow")])
def test_a_missing_package_is_refused_before_anything_runs(monkeypatch, tmp_path, option, package):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: find_spec answers None
    with pytest.raises(ConfigError, match=rf"logger={package} needs the {package} package, which is not installed: "
                                          rf"pip install 'gencli\[{package}\]'"):
        precheck("train", "train", [f"logger={option}"])
    assert not (tmp_path / "outputs").exists()


def test_the_cli_names_the_missing_package(tmp_path):
    code = "import sys; sys.modules['wandb'] = None; from gencli.cli import main; main(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, "train", "logger=wandb"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, describe(result)
    assert "gencli error: logger=wandb needs the wandb package" in result.stderr, describe(result)
    assert "pip install 'gencli[wandb]'" in result.stderr and "Traceback" not in result.stderr, describe(result)
    assert not (tmp_path / "outputs").exists()


def test_flatten_and_mlflow_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": None}) == {"a.b": 1, "a.c.d": [1, 2], "e": {},
                                                                                 "f": None}
    long = "x" * (MLFLOW_PARAM_VALUE + 50)
    params = mlflow_params({"model": {"latent_dim": 8, "names": ["a", "b"], "beta": None, "long": long},
                            "k" * 300: 1})
    assert params["model.latent_dim"] == "8" and params["model.names"] == '["a", "b"]'
    assert params["model.beta"] == "null"
    assert len(params["model.long"]) == MLFLOW_PARAM_VALUE and params["model.long"].endswith("config.yaml)")
    assert "k" * 300 not in params  # longer than MLflow's key limit: only in config.yaml


def test_loggers_without_images_are_left_alone(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    csv = CSVLogger(tmp_path, name="csv", version="")
    assert kind(csv) == "csv" and not log_image(csv, "samples", torch.rand(1, 8, 8), 1)
    log_config([csv], CONFIG)
    log_final_metrics([csv], {"val/loss": 1.0}, "completed", 1)  # metrics.json is the file form: no final/ columns
    csv.save()
    assert not (tmp_path / "csv" / "metrics.csv").exists()


def test_wandb_gets_images_config_and_final_metrics(tmp_path, quiet_wandb):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from wandb_records import OfflineRun

    logger = WandbLogger(project="gencli", name="unit", save_dir=str(tmp_path), offline=True,
                         settings={"silent": True, "console": "off"})
    assert kind(logger) == "wandb"
    log_config([logger], CONFIG)
    logger.log_metrics({"train/loss": 2.5}, step=3)
    assert log_image(logger, "samples", torch.rand(1, 10, 12), 3)
    assert log_image(logger, "rgb", torch.rand(3, 10, 12), 4)
    log_final_metrics([logger], {"val/loss": 1.25, "val/bpd": 0.5}, "completed", 4)
    close([logger])

    run = OfflineRun.read(tmp_path / "wandb")
    assert run.config["model"]["latent_dim"] == 8 and run.config["seed"] == 0 and "hydra" not in run.config
    assert any(row.get("train/loss") == 2.5 for row in run.history)
    images = [row for row in run.history if row.get("samples/_type") == "images/separated"]
    assert images and images[0]["trainer/global_step"] == 3
    (png,) = (run.directory / "files").glob(images[0]["samples/filenames"][0])
    from PIL import Image

    assert Image.open(png).size == (12, 10)
    assert run.summary["final/val/loss"] == 1.25 and run.summary["final/status"] == "completed"


def test_mlflow_gets_images_config_and_final_metrics(tmp_path):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="gencli", run_name="unit", tracking_uri=uri,
                          artifact_location=str(tmp_path / "artifacts"))
    assert kind(logger) == "mlflow"
    log_config([logger], {**CONFIG, "data": {"root": "r" * (MLFLOW_PARAM_VALUE + 10)}})
    logger.log_metrics({"train/loss": 2.5}, step=3)
    assert log_image(logger, "samples", torch.rand(1, 10, 12), 3)
    log_final_metrics([logger], {"val/loss": 1.25}, "completed", 3)
    logger.finalize("success")

    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.data.params["model.latent_dim"] == "8" and run.data.params["model.image_shape"] == "[1, 16, 16]"
    assert run.data.params["data.root"].endswith("(cut: the full value is in config.yaml)")
    assert not any(key.startswith("hydra") for key in run.data.params)
    assert run.data.metrics["final/val/loss"] == 1.25 and run.data.tags["gencli.status"] == "completed"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.5]
    artifacts = tmp_path / "artifacts" / run.info.run_id / "artifacts"
    config = yaml.safe_load((artifacts / "config.yaml").read_text())
    assert config["data"]["root"] == "r" * (MLFLOW_PARAM_VALUE + 10) and config["model"]["latent_dim"] == 8
    (png,) = (artifacts / "images").glob("samples+step+3+*[0-9a-f].png")
    from PIL import Image

    assert Image.open(png).size == (12, 10)
    assert run.info.status == "FINISHED"
    json.dumps(run.data.params)  # plain strings throughout
