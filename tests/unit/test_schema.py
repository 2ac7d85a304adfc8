"""The schema: one source for each default, every shipped config valid, bad values named."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest
import yaml

from gencli.config import config_dir, group_options
from gencli.errors import ConfigError
from gencli.safety import iter_nodes
from gencli.schema import JOBS, RANGES, OneOf, Range, parameters, type_problem, validate

#: Group options that are presets of another option's class (they exist to differ from its defaults).
PRESETS = {"hardware/cpu_fast.yaml", "hardware/gpu_fast.yaml", "model/net/unet_cpu.yaml", "callbacks/default.yaml",
           "callbacks/minimal.yaml"}


def python_defaults(cls: type) -> dict:
    """Constructor defaults, following **kwargs into base classes (the first default found wins)."""
    found = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        forwards = False
        for name, param in list(inspect.signature(init).parameters.items())[1:]:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif param.default is not inspect.Parameter.empty:
                found.setdefault(name, param.default)
        if not forwards:
            break
    return found


def base_files():
    root = config_dir()
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root).as_posix()
        data = yaml.safe_load(path.read_text()) or {}
        inherits = any(isinstance(d, str) and d != "_self_" for d in data.get("defaults", []))
        if rel in PRESETS or inherits or rel.startswith(("experiment/", "hparams_search/", "hydra/")):
            continue
        yield rel, data


def test_base_configs_and_python_defaults_agree():
    """A value written both in a base YAML file and as a constructor default must be the same value: today's
    VAE likelihood (bernoulli) and diffusion sampler (DDIM-50) once differed between the two."""
    disagreements = []
    for rel, data in base_files():
        for where, node in iter_nodes(data):
            if not (isinstance(node, dict) and isinstance(node.get("_target_"), str)):
                continue
            if not node["_target_"].startswith("gencli."):
                continue  # library classes (Trainer, Adam): gencli's settings differ from theirs on purpose
            module, _, name = node["_target_"].rpartition(".")
            defaults = python_defaults(getattr(importlib.import_module(module), name))
            for key, value in node.items():
                if key.startswith("_") or key not in defaults or isinstance(value, dict):
                    continue
                if isinstance(value, str) and "${" in value:
                    continue
                default = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
                if value != default:
                    disagreements.append(f"{rel} {where or '-'}.{key}: YAML {value!r}, Python {default!r}")
    assert not disagreements, "\n".join(disagreements)


def test_the_diffusion_default_sampler_is_the_configs():
    from gencli.diffusion.samplers import DDIMSampler
    from gencli.families.diffusion import Diffusion
    from gencli.nets.mlp import MLPDenoiser

    model = Diffusion(MLPDenoiser(in_features=4, hidden=8, depth=1, time_dim=8), image_shape=(1, 8, 8), x_shape=(4,))
    sampler_yaml = yaml.safe_load((config_dir() / "sampler" / "ddim.yaml").read_text())
    assert isinstance(model.default_sampler, DDIMSampler)
    assert model.default_sampler.steps == sampler_yaml["steps"] and model.default_sampler.eta == sampler_yaml["eta"]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_options_are_the_yaml_keys(job):
    data = yaml.safe_load((config_dir() / f"{job}.yaml").read_text())
    keys = {k for k in data if k != "defaults"}
    fields = {f.name for f in dataclasses.fields(JOBS[job])}
    assert keys == fields, f"conf/{job}.yaml and schema.{JOBS[job].__name__} differ: {keys ^ fields}"


def test_every_range_names_a_real_option():
    for target, ranges in RANGES.items():
        module, _, name = target.rpartition(".")
        params, _ = parameters(getattr(importlib.import_module(module), name))
        assert set(ranges) <= set(params), f"{target}: {set(ranges) - set(params)}"
        for check in ranges.values():
            if isinstance(check, OneOf):
                assert check.choices()


def test_every_shipped_combination_validates(compose_cfg):
    for model in group_options("model"):
        validate(compose_cfg("train", [f"model={model}"]), "train")
    for group in ("data", "trainer", "hardware", "logger", "callbacks"):
        for option in group_options(group):
            extra = ["data.root=/any/folder"] if (group, option) == ("data", "folder") else []
            try:
                validate(compose_cfg("train", [f"{group}={option}", *extra]), "train")
            except ConfigError as err:  # logger=wandb|mlflow|many without the optional package: refused as designed
                if group != "logger" or "pip install 'gencli[" not in err.message:
                    raise
    with pytest.raises(ConfigError, match=r"data.root is required here \(it is null\): set data.root="):
        validate(compose_cfg("train", ["data=folder"]), "train")
    for experiment in group_options("experiment"):
        validate(compose_cfg("train", [f"experiment={experiment}"]), "train")
    validate(compose_cfg("sample", ["ckpt=x.ckpt", "sampler=ddim"]), "sample")
    validate(compose_cfg("eval", ["ckpt=x.ckpt", "metric=all", "data=mnist"]), "eval")


@pytest.mark.parametrize("value,annotation,ok", [
    (3, int, True), (True, int, False), ("3", int, False), (3, float, True), (2.5, int, False),
    (None, int | None, True), ("x", int | None, False), ([1, 2], list[int], True), ([1, "a"], list[int], False),
    ([0.5, 0.9], tuple[float, float], True), ("gaussian", str, True), (1, bool, False),
])
def test_type_problem(value, annotation, ok):
    assert (type_problem(value, annotation) is None) is ok


def test_ranges_and_messages(compose_cfg):
    assert Range(ge=1).check(0) == ">= 1" and Range(gt=0, lt=1).check(1.0) == "> 0 and < 1"
    assert Range(ge=1).check(float("nan")) == "a number (not NaN)"
    with pytest.raises(ConfigError, match=r"model.encoder.base_channels=0 is not valid: it must be >= 1"):
        validate(compose_cfg("train", ["model.encoder.base_channels=0"]), "train")
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=-5 is not valid: it must be >= 1, or -1, or null: "):
        validate(compose_cfg("train", ["trainer.max_epochs=-5"]), "train")
    with pytest.raises(ConfigError, match=r"model.g_optimizer.betas=\[0.5, 'abc'\] is not valid: it must be a list"):
        validate(compose_cfg("train", ["model=dcgan", "model.g_optimizer.betas=[0.5,abc]"]), "train")


def test_a_range_failure_says_the_range_not_the_type():
    """A number outside its range is told the range (and what the key means), never "must be a number or null",
    which it is: the mechanism, for every optional ranged value and every list of ranged items."""
    from typing import Annotated

    psi = Annotated[float, Range(gt=0, le=1, means="psi")] | None
    assert type_problem(-1, psi) == "> 0 and <= 1, or null: psi"
    assert type_problem("x", psi) == "a number or null"  # a wrong type is still told the type
    assert type_problem(0, Annotated[int, Range(ge=1)] | None) == ">= 1, or null"
    assert type_problem([3, 0], list[Annotated[int, Range(ge=1)]]) == "a list whose every item is >= 1 (item 1 is 0)"
    assert type_problem([3, "a"], list[int]) == "a list whose every item is an integer (item 1 is a)"
    assert Range(ge=1, also=(-1,)).check(-1) is None and Range(ge=1, also=(-1,)).check(0) == ">= 1, or -1"
    # every optional ranged job option: its type passes, the message is its range
    for job, schema in JOBS.items():
        for name, annotation in job_fields_of(schema).items():
            ranged = [a for a in typing_args(annotation) if typing_origin(a) is Annotated]
            for arm in ranged:
                check = next(extra for extra in typing_args(arm)[1:] if isinstance(extra, Range))
                outside = (check.ge - 1) if check.ge is not None else (check.gt - 1) if check.gt is not None \
                    else check.le + 1
                problem = type_problem(outside, annotation)
                assert problem and problem.startswith((">", "<")), (job, name, outside, problem)


def job_fields_of(schema):
    import typing

    return typing.get_type_hints(schema, include_extras=True)


def typing_args(annotation):
    import typing

    return typing.get_args(annotation) if typing.get_origin(annotation) is not None else ()


def typing_origin(annotation):
    import typing

    return typing.get_origin(annotation)


@pytest.mark.parametrize("job, override, says", [
    ("sample", "truncation=-1", "truncation=-1 is not valid: truncation must be > 0 and <= 1, or null: the GAN's "
                                "truncation psi"),
    ("eval", "truncation=0", "truncation=0 is not valid: truncation must be > 0 and <= 1, or null"),
    ("sample", "nrow=0", "nrow=0 is not valid: nrow must be >= 1, or null: the images per row of the PNG grid"),
    ("eval", "n=-5", "n=-5 is not valid: n must be >= 0: how many images"),
    ("eval", "reference.n=-3", "reference.n=-3 is not valid: reference.n must be >= 2, or null: the first n real "
                               "images of the split; null: the whole split"),
    ("eval", "reference.n=0", "reference.n=0 is not valid: reference.n must be >= 2, or null"),
    ("eval", "+reference.nn=3", "reference.nn=3: gencli eval's reference has no option 'nn'. Did you mean reference.n?"),
])
def test_job_options_out_of_range_name_the_range(compose_cfg, job, override, says):
    with pytest.raises(ConfigError) as caught:
        validate(compose_cfg(job, ["ckpt=x.ckpt", override]), job)
    assert says in caught.value.message, caught.value.message
    assert "must be a number or null" not in caught.value.message
    assert "must be an integer or null" not in caught.value.message


@pytest.mark.parametrize("overrides", [["n=0"], ["n=1000"], ["reference.n=null"], ["reference.n=500"],
                                       ["truncation=1"], ["truncation=null"]])
def test_documented_eval_values_stay_valid(compose_cfg, overrides):
    validate(compose_cfg("eval", ["ckpt=x.ckpt", *overrides]), "eval")


@pytest.mark.parametrize("override", ["trainer.max_epochs=0", "trainer.max_steps=0", "trainer.limit_train_batches=0",
                                      "trainer.limit_train_batches=0.0"])
def test_a_trainer_that_would_train_nothing_is_refused(compose_cfg, override):
    """max_epochs=0 (or max_steps=0, or no training batch) used to train nothing, write no checkpoint and still
    report the run "completed"."""
    with pytest.raises(ConfigError) as caught:
        validate(compose_cfg("train", ["callbacks=minimal", override]), "train")
    key, value = override.split("=")
    assert caught.value.message.startswith(f"{key}={value} is not valid: it must be ")
    assert "0 would train nothing" in caught.value.message


@pytest.mark.parametrize("overrides", [
    ["trainer.max_epochs=-1", "trainer.max_time=00:00:01:00"], ["trainer.max_epochs=null"],
    ["trainer.max_steps=-1"], ["trainer.max_steps=5", "trainer.max_epochs=-1"], ["trainer.max_epochs=1"],
    ["trainer.limit_train_batches=0.5"], ["trainer.limit_train_batches=3"], ["trainer.limit_train_batches=null"],
])
def test_trainer_limits_that_train_stay_valid(compose_cfg, overrides):
    from omegaconf import OmegaConf

    from gencli.schema import check_node

    cfg = compose_cfg("train", overrides)
    check_node("trainer", OmegaConf.to_container(cfg.trainer, resolve=True))
