"""Checkpoints cannot run code: crafted files are refused before anything is built, and no marker appears.

Every hostile checkpoint here, if gencli built what it asks for, would create ``marker`` (or run a
shell command that does). Each is loaded through every door gencli has for files: ``restore_model``
(gencli sample/eval ckpt=), latent diffusion's ``first_stage_ckpt`` and its embedded first-stage
config, ``resume=`` (Lightning's loader goes through SafeCheckpointIO), ``features.ckpt=``, and the
data config that sample/eval rebuild from a checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from conftest import gencli
from gencli.checkpoint_io import SafeCheckpointIO
from gencli.checkpoints import CHECKPOINT_FORMAT, atomic_save, load_checkpoint, restore_model
from gencli.config import config_dir
from gencli.errors import ConfigError
from gencli.safety import GENCLI_TARGETS, LIBRARY_TARGETS, check_config, iter_nodes


class RunsCode:
    """A pickle payload: unpickling calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def good_config() -> dict:
    """A minimal real gencli config: a tiny autoencoder on 8x8 digits."""
    return {
        "model": {
            "_target_": "gencli.families.autoencoder.Autoencoder", "image_shape": [1, 8, 8], "latent_dim": 4,
            "encoder": {"_target_": "gencli.nets.conv.ConvEncoder", "in_channels": 1, "image_size": 8,
                        "out_features": 16, "base_channels": 4, "max_channels": 8, "bottom_size": 4},
            "decoder": {"_target_": "gencli.nets.conv.ConvDecoder", "in_features": 4, "out_channels": 1,
                        "image_size": 8, "base_channels": 4, "max_channels": 8, "bottom_size": 4},
            "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001},
        },
        "data": {"_target_": "gencli.data.DigitsDataModule", "image_size": 8, "channels": 1},
    }


def hostile_configs(marker: Path) -> dict[str, dict]:
    """name -> a config that would create ``marker`` if its targets were built."""
    touch = f"touch {marker}"
    cases = {
        "builtins.open": {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
        "os.system": {"_target_": "os.system", "_args_": [touch]},
        "subprocess.run": {"_target_": "subprocess.run", "args": ["touch", str(marker)]},
        "pathlib.Path.write_text": {"_target_": "pathlib.Path.write_text", "_args_": [str(marker), "x"]},
        "functools.partial": {"_target_": "functools.partial", "_args_": [{"_target_": "os.system", "_partial_": True},
                                                                          touch]},
        "attribute path through an allowed module": {"_target_": "gencli.io.os.system", "_args_": [touch]},
        "eval": {"_target_": "builtins.eval", "_args_": [f"__import__('os').system('{touch}')"]},
    }
    configs = {}
    for name, node in cases.items():
        # as the model itself
        configs[f"model is {name}"] = {**good_config(), "model": node}
        # nested deep inside an allowed model: a net, an _args_ list, a _partial_ optimizer
        nested = good_config()
        nested["model"]["encoder"]["activation"] = node
        configs[f"{name} nested in a net"] = nested
        args = good_config()
        args["model"]["_args_"] = [node]
        configs[f"{name} in the model's _args_"] = args
        optimizer = good_config()
        optimizer["model"]["optimizer"] = {**node, "_partial_": True}
        configs[f"{name} as a _partial_ optimizer"] = optimizer
        data = good_config()
        data["data"] = node
        configs[f"{name} as the data module"] = data
    bad_partial = good_config()
    bad_partial["model"]["optimizer"]["_partial_"] = "yes"
    configs["_partial_ that is not a bool"] = bad_partial
    interpolation = good_config()
    interpolation["model"]["latent_dim"] = "${oc.env:HOME}"
    configs["an interpolation"] = interpolation
    unknown = good_config()
    unknown["model"]["_call_"] = "os.system"
    configs["an unknown Hydra-like key"] = unknown
    return configs


def checkpoint_with(config: dict, **extra) -> dict:
    return {"state_dict": {}, "gencli": {"version": "0.1.0", "format": CHECKPOINT_FORMAT, "config": config, **extra},
            **{k: v for k, v in extra.items() if k in ("global_step", "epoch")}}


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "marker"
    yield path
    assert not path.exists(), "a hostile checkpoint ran code"


def cases(tmp_path: Path) -> list[str]:
    return list(hostile_configs(tmp_path / "marker"))


@pytest.mark.parametrize("case", cases(Path("/x")))
def test_hostile_configs_are_refused_by_every_loader(tmp_path, marker, case):
    config = hostile_configs(marker)[case]
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint_with(config), path)
    with pytest.raises(ConfigError, match="refused"):
        restore_model(path)
    with pytest.raises(ConfigError, match="refused"):
        SafeCheckpointIO().load_checkpoint(path)  # what Lightning calls for resume=
    with pytest.raises(ConfigError, match="refused"):
        check_config(config, "features.ckpt=x")
    # latent diffusion: as the first-stage checkpoint, and as the config embedded in an LDM checkpoint
    from gencli.families.diffusion import LatentDiffusion

    with pytest.raises(ConfigError, match="refused"):
        LatentDiffusion.load_first_stage(str(path), None)
    with pytest.raises(ConfigError, match="refused"):
        LatentDiffusion.load_first_stage(None, json.dumps(config))


def test_the_refusal_names_the_key_and_the_target(tmp_path, marker):
    config = good_config()
    config["model"]["decoder"] = {"_target_": "subprocess.run", "args": ["touch", str(marker)]}
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint_with(config), path)
    with pytest.raises(ConfigError) as err:
        restore_model(path)
    assert f"ckpt={path}" in err.value.message
    assert "model.decoder._target_='subprocess.run'" in err.value.message
    assert "GENCLI_TRUSTED_TARGETS" in err.value.message


@pytest.mark.parametrize("how", ["zip", "raw pickle", "inside state_dict"])
def test_pickle_payloads_are_never_unpickled(tmp_path, marker, how):
    path = tmp_path / "payload.ckpt"
    payload = RunsCode(marker)
    if how == "zip":
        torch.save({"state_dict": {}, "gencli": {"config": good_config()}, "x": payload}, path)
    elif how == "raw pickle":
        path.write_bytes(pickle.dumps({"state_dict": payload}))
    else:
        torch.save({"state_dict": {"w": payload}, "gencli": {"config": good_config()}}, path)
    with pytest.raises(ConfigError):
        load_checkpoint(path)
    with pytest.raises(ConfigError):
        SafeCheckpointIO().load_checkpoint(path)


def test_a_good_checkpoint_still_loads(tmp_path):
    from hydra.utils import instantiate

    model = instantiate(good_config()["model"])
    path = tmp_path / "good.ckpt"
    torch.save(checkpoint_with(good_config()) | {"state_dict": model.state_dict()}, path)
    restored, checkpoint = restore_model(path)
    assert type(restored).__name__ == "Autoencoder"


def test_a_class_of_ones_own_is_trusted_only_when_named(tmp_path, monkeypatch):
    config = good_config()
    config["model"]["encoder"]["_target_"] = "torch.nn.Identity"
    with pytest.raises(ConfigError, match="torch.nn.Identity"):
        check_config(config, "ckpt=x")
    monkeypatch.setenv("GENCLI_TRUSTED_TARGETS", "torch.nn.Identity")
    check_config(config, "ckpt=x")


def test_urls_and_other_formats_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="URL; gencli reads checkpoints from local files only"):
        load_checkpoint("https://example.com/model.ckpt")
    newer = tmp_path / "newer.ckpt"
    torch.save({"state_dict": {}, "gencli": {"config": good_config(), "format": CHECKPOINT_FORMAT + 1,
                                              "version": "9.0"}}, newer)
    with pytest.raises(ConfigError, match=r"newer gencli \(9.0, checkpoint format 2\).*Upgrade"):
        load_checkpoint(newer)
    odd = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "gencli": {"config": good_config(), "format": "one"}}, odd)
    with pytest.raises(ConfigError, match="checkpoint format 'one'"):
        load_checkpoint(odd)


def test_a_checkpoints_data_config_may_not_download(tmp_path):
    """sample/eval rebuild the data module from the checkpoint: a stranger's file does not get to make this
    machine download into a folder it names."""
    from omegaconf import OmegaConf

    from gencli.errors import RuntimeFailure
    from gencli.jobs.common import datamodule_for

    config = good_config()
    config["data"] = {"_target_": "gencli.data.MNISTDataModule", "root": str(tmp_path / "elsewhere"), "download": True,
                      "image_size": 8}
    datamodule = datamodule_for(OmegaConf.create({}), checkpoint_with(config), batch_size=4)
    assert datamodule.download is False
    with pytest.raises(RuntimeFailure, match="is not under data.root"):
        datamodule.setup()
    assert not (tmp_path / "elsewhere").exists()


def test_every_config_target_is_allowed_and_the_list_has_nothing_else():
    used = set()
    for path in config_dir().rglob("*.yaml"):
        for _, node in iter_nodes(yaml.safe_load(path.read_text()) or {}):
            if isinstance(node, dict) and isinstance(node.get("_target_"), str) and not path.parts[-2] == "hydra" \
                    and not node["_target_"].startswith(("hydra_plugins.", "optuna.")):
                used.add(node["_target_"])
    allowed = GENCLI_TARGETS | LIBRARY_TARGETS
    assert used <= allowed, used - allowed
    # every gencli entry is really used by a config or built by the train job, so the list stays reviewable
    assert GENCLI_TARGETS - used <= set(), GENCLI_TARGETS - used
    import importlib

    for target in sorted(allowed):
        module, _, name = target.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), f"{target} is not a class"


def test_saves_are_atomic_and_leave_no_partial_file(tmp_path, monkeypatch):
    import gencli.checkpoints as checkpoints

    path = tmp_path / "last.ckpt"
    atomic_save({"a": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(n):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "before_write", disk_full)
    with pytest.raises(OSError):
        atomic_save({"a": torch.zeros(1000)}, path)
    assert path.read_bytes() == before  # the last good file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # and nothing partial is left
    with pytest.raises(Exception) as err:
        SafeCheckpointIO().save_checkpoint({"a": torch.zeros(1000)}, path)
    assert "No space left on device (ENOSPC)" in str(err.value) and "intact" in str(err.value)


# ----------------------------------------------------------------------------- what the command line makes Hydra build
def test_what_hydra_may_build_exists_and_every_shipped_hydra_option_passes(tmp_path):
    """HYDRA_TARGETS and LOGGING_CLASSES name real classes, and nothing gencli ships (launchers, searches, Hydra's
    logging options) is refused by the pre-flight's check of Hydra's part of the config."""
    import importlib

    from gencli.config import group_options, precheck
    from gencli.runlock import _HELD
    from gencli.safety import HYDRA_TARGETS, LOGGING_CLASSES

    for target in sorted(HYDRA_TARGETS | LOGGING_CLASSES):
        module, _, name = target.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), f"{target} is not a class"
    used = set()
    for path in (config_dir() / "hydra").rglob("*.yaml"):
        used |= {node["_target_"] for _, node in iter_nodes(yaml.safe_load(path.read_text()) or {})
                 if isinstance(node, dict) and isinstance(node.get("_target_"), str)}
    assert used <= HYDRA_TARGETS, used - HYDRA_TARGETS
    runs = [["hydra/job_logging=stdout", "hydra/hydra_logging=hydra_debug"]]
    runs += [["-m", f"hydra/launcher={launcher}"] for launcher in group_options("hydra/launcher")]
    runs += [["-m", f"hparams_search={search}"] for search in group_options("hparams_search")]
    for args in runs:
        precheck("train", "train", [*args, f"paths.log_dir={tmp_path}"])
    assert not _HELD  # (folders named after the start time: nothing locked, nothing created)


@pytest.mark.parametrize("args, needle", [
    (["+hydra.callbacks.x._target_=logging.FileHandler", "+hydra.callbacks.x.filename=/tmp/x.log"],
     "hydra.callbacks.x._target_=logging.FileHandler is refused"),
    (["hydra.job_logging.handlers.file.class=os.system"], "hydra.job_logging.handlers.file.class=os.system"),
    (["hydra.hydra_logging.handlers.console.class=logging.handlers.SocketHandler"], "SocketHandler is refused"),
    (["hydra.job_logging.handlers.console.stream=ext://antigravity.fly"], "ext://antigravity.fly is refused"),
    (["hydra.launcher._target_=os.system"], "hydra.launcher._target_=os.system"),
    (["hparams_search=ae_optuna", "hydra.sweeper.custom_search_space=os.system"], "custom_search_space=os.system"),
    (["hparams_search=ae_optuna", "hydra.sweeper.sampler._target_=builtins.exec"], "builtins.exec is refused"),
    # a multirun's every value, not only the first one the pre-flight composes
    (["-m", "+hydra.callbacks.x._target_=gencli.sweep.SweepSummary,logging.FileHandler"], "logging.FileHandler"),
    (["-m", "model=ae", "model._target_=gencli.families.autoencoder.Autoencoder,os.system"], "os.system"),
    (["-m", "hydra.job_logging.handlers.file={class:logging.FileHandler},{class:os.system}"], "os.system"),
    # flags that would have Hydra load something the pre-flight never saw
    (["--experimental-rerun=run/.hydra/config.pickle"], "unpickling a file runs any code"),
    (["-cn", "mine"], "-cn is not available"),
    (["--config-dir=/tmp"], "--config-dir is not available"),
])
def test_the_command_line_cannot_make_hydra_build_outside_the_allow_list(tmp_path, args, needle):
    from gencli.config import precheck

    with pytest.raises(ConfigError) as err:
        precheck("train", "train", [*args, f"paths.log_dir={tmp_path}"])
    assert needle in err.value.message and "\n" not in err.value.message
    assert not any(tmp_path.iterdir())


def test_a_class_of_ones_own_may_be_trusted_for_hydra_too(tmp_path, monkeypatch):
    from gencli.config import precheck

    monkeypatch.setenv("GENCLI_TRUSTED_TARGETS", "logging.handlers.SocketHandler")
    precheck("train", "train", ["hydra.job_logging.handlers.file.class=logging.handlers.SocketHandler",
                                f"paths.log_dir={tmp_path}"])


@pytest.mark.slow
def test_command_line_classes_outside_the_allow_list_are_refused_before_anything_is_built(tmp_path):
    """issue 30 item 3: Hydra's callbacks and logging handlers go through the allow-list too."""
    target = tmp_path / "written_by_a_handler.log"
    for attack in (["+hydra.callbacks.x._target_=logging.FileHandler", f"+hydra.callbacks.x.filename={target}"],
                   ["hydra.job_logging.handlers.file.class=logging.handlers.SocketHandler"],
                   ["hydra.job_logging.handlers.console.stream=ext://antigravity.fly"]):
        proc = gencli("train", "model=ae", "data.image_size=8", "trainer.max_epochs=1", *attack, cwd=tmp_path)
        err = proc.stderr
        assert proc.returncode == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "is refused: Hydra would build" in lines[0], err
        assert "GENCLI_TRUSTED_TARGETS" in lines[0]
        assert not target.exists() and not (tmp_path / "outputs").exists()  # nothing built, nothing written

