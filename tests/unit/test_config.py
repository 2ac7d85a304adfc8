"""Every config group combination composes; every _target_ is a real class; group errors are clear."""

from __future__ import annotations

import importlib
import itertools
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gencli.config import check_group_overrides, config_dir, group_options
from gencli.errors import ConfigError

# Models that need an extra file to instantiate (e.g. a first-stage checkpoint) are composed only.
NEEDS_FILES = {"ldm"}


def test_every_target_is_a_real_class():
    targets = set()

    def walk(node, where):
        if isinstance(node, dict):
            if "_target_" in node:
                targets.add((node["_target_"], where))
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for path in config_dir().rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()) or {}, path.name)
    assert targets
    for target, where in sorted(targets):
        module, _, name = target.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{target} in {where} does not exist"


def test_all_group_combinations_compose(compose_cfg):
    """Every model x data x trainer x hardware combination resolves fully, and every logger x
    callbacks combination with every model.

    Hydra composes each option of each group once (with the defaults of the others); combinations are
    then assembled by swapping those group nodes, which is what composition does for groups that only
    meet through interpolation (``${data.channels}``, ``${hardware.precision}``, ``${model.monitor}``),
    at a fraction of the cost of ~2,000 full compositions.
    """
    nodes = {g: {o: compose_cfg("train", [f"{g}={o}"])[g] for o in group_options(g)}
             for g in ("data", "trainer", "hardware", "logger", "callbacks")}
    models = {m: compose_cfg("train", [f"model={m}"]) for m in group_options("model")}
    combos = 0

    def check(base, groups):
        nonlocal combos
        for combo in itertools.product(*(nodes[g].values() for g in groups)):
            cfg = base.copy()
            for group, node in zip(groups, combo):
                cfg[group] = node
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert resolved["model"]["_target_"] and resolved["trainer"]["_target_"]
            assert resolved["trainer"]["precision"] == resolved["hardware"]["precision"]
            shape = [resolved["data"]["channels"], resolved["data"]["image_size"], resolved["data"]["image_size"]]
            assert resolved["model"].get("image_shape", shape) == shape
            combos += 1

    for base in models.values():
        check(base, ("data", "trainer", "hardware"))
        check(base, ("logger", "callbacks"))
    n = {g: len(options) for g, options in nodes.items()}
    assert combos == len(models) * (n["data"] * n["trainer"] * n["hardware"] + n["logger"] * n["callbacks"])


def test_gpu_and_ddp_trainers_compose_as_asked(compose_cfg):
    cfg = compose_cfg("train", ["model=vae", "data=mnist", "trainer=gpu"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    cfg = compose_cfg("train", ["trainer=ddp"])
    assert cfg.trainer.devices == -1 and cfg.trainer.strategy.process_group_backend == "nccl"
    cfg = compose_cfg("train", ["trainer=ddp_cpu"])
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2


@pytest.mark.parametrize("model", [m for m in group_options("model") if m not in NEEDS_FILES])
def test_models_instantiate_with_the_data_shape(compose_cfg, model):
    cfg = compose_cfg("train", [f"model={model}", "data=digits", "data.image_size=8"])
    net = instantiate(cfg.model)
    assert tuple(net.image_shape) == (1, 8, 8)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiments_compose(compose_cfg, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("name", ["sample", "eval"])
def test_sample_and_eval_configs_compose(compose_cfg, name):
    cfg = compose_cfg(name, ["ckpt=x.ckpt"])
    assert cfg.ckpt == "x.ckpt" and cfg.get("data") is None


def test_unknown_group_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model=vea is not a known model.*vae"):
        check_group_overrides(["model=vea"])
    with pytest.raises(ConfigError, match="data=nope"):
        check_group_overrides(["-m", "data=digits,nope"])
    check_group_overrides(["model=vae", "model.beta=4", "data=choice(digits,mnist)", "+experiment=vae_mnist"])


def test_a_group_the_job_does_not_compose_is_a_config_error():
    # sampler= belongs to sample/eval; in training the nested default sampler is the way
    with pytest.raises(ConfigError, match=r"sampler= is not an option of gencli train.*sampler@model.sampler=ddpm"):
        check_group_overrides(["model=ddpm", "sampler=ddpm"], config_name="train")
    with pytest.raises(ConfigError, match=r"model= is not an option of gencli sample: its config groups are"):
        check_group_overrides(["ckpt=x.ckpt", "model=vae"], config_name="sample")
    for ok, name in ((["model=ddpm", "sampler@model.sampler=ddpm", "model/net=unet_cpu"], "train"),
                     (["ckpt=x", "sampler=ddim", "sampler.steps=20", "data=mnist"], "sample"),
                     (["ckpt=x", "metric=[fid,kid]", "features=domain"], "eval"),
                     (["+logger=tensorboard"], "sample")):
        check_group_overrides(ok, config_name=name)


def test_conf_dir_is_the_checkout_conf():
    assert (config_dir() / "train.yaml").is_file()
    assert Path(config_dir()).name == "conf"


def test_a_setting_of_a_swept_group_is_applied_job_by_job():
    """gencli eval -m sampler=ddim,heun sampler.steps=20: Hydra composes the sweep's config without a sampler."""
    from gencli.config import settings_of_swept_groups

    args = ["-m", "ckpt=x", "sampler=ddim,heun", "sampler.steps=20", "sampler.sigmas=karras", "n=5"]
    assert settings_of_swept_groups(args, "eval") == ["-m", "ckpt=x", "sampler=ddim,heun", "sampler.steps=choice(20)",
                                                      "sampler.sigmas=choice(karras)", "n=5"]
    kept = ["-m", "sampler=ddim", "sampler.steps=20"]  # not swept: Hydra composes it as it is
    assert settings_of_swept_groups(kept, "eval") == kept
