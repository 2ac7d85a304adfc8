"""Where the Hydra configs live, what each group offers, and early checks of group choices.

Hydra reports an unknown group option (``model=vea``) with a multi-line composition error and exit
code 1; gencli checks group choices before Hydra composes, so the user gets one paragraph naming the
bad value and the choices, with exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from gencli.errors import ConfigError


def config_dir() -> Path:
    """The ``conf/`` tree: ``$GENCLI_CONFIG_DIR`` if set, else the one beside ``src/`` in this checkout."""
    env = os.environ.get("GENCLI_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = str(config_dir())


def group_options(group: str) -> list[str]:
    """The options of ``group`` (``model``, or a nested group such as ``model/net``): its YAML files."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def config_groups() -> list[str]:
    """Every config group, nested ones (``model/net``) included; not Hydra's own settings."""
    root = config_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml")))


def primary_defaults(config_name: str) -> dict[str, str | None]:
    """The groups the primary config ``conf/<config_name>.yaml`` composes, with their default option
    (None for groups left unselected: ``- sampler: null``)."""
    import yaml

    path = config_dir() / f"{config_name}.yaml"
    if not path.is_file():
        return {}
    defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
    return {key.replace("optional ", "").strip(): value for entry in defaults if isinstance(entry, dict)
            for key, value in entry.items()}


def optional_groups(config_name: str) -> set[str]:
    """Groups that the primary config ``conf/<config_name>.yaml`` leaves unselected (``- sampler: null``)."""
    return {key for key, value in primary_defaults(config_name).items() if value is None}


def check_group_overrides(overrides: list[str], config_name: str | None = None) -> None:
    """Raise ConfigError for ``group=option`` overrides that name no config file, and for settings
    inside a group (``sampler.steps=20``) that ``config_name`` leaves unselected unless it is chosen too."""
    groups = set(config_groups())
    chosen = {arg.split("=", 1)[0].lstrip("+~") for arg in overrides if "=" in arg and not arg.startswith("-")}
    own = primary_defaults(config_name) if config_name else {}
    plain = {arg.split("=", 1)[0].lstrip("~") for arg in overrides if "=" in arg and arg[0] not in "-+"}
    for key in sorted(plain):  # (+group=option appends a group on purpose)
        if own and key in groups and "/" not in key and key not in own and key != "hydra":
            hint = (" In training, a diffusion model's default sampler is set with sampler@model.sampler=ddpm "
                    "(or ddim), e.g. sampler@model.sampler=ddpm model.sampler.steps=100."
                    if key == "sampler" and config_name == "train" else "")
            raise ConfigError(
                f"{key}= is not an option of gencli {config_name}: its config groups are {', '.join(sorted(own))} "
                f"(conf/{config_name}.yaml).{hint}"
            )
    for key in sorted(optional_groups(config_name) if config_name else ()):
        inner = next((arg for arg in overrides if arg.lstrip("+~").startswith(f"{key}.")), None)
        if inner is not None and key not in chosen:
            options = group_options(key)
            raise ConfigError(
                f"{inner.split('=', 1)[0]} sets an option of the {key} group, but no {key} is chosen: add {key}=<option> "
                f"before it ({', '.join(options)}), e.g. {key}={options[0] if options else '...'} {inner}."
            )
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in groups or "(" in value or value in ("", "null"):
            continue  # not a group choice, or a sweep function Hydra will expand
        options = group_options(key)
        if value.startswith("[") and value.endswith("]"):  # a list of options of one group: metric=[fid,kid]
            value = value[1:-1]
        for choice in value.split(","):
            choice = choice.strip()
            if choice and choice not in options:
                raise ConfigError(
                    f"{key}={choice} is not a known {key}: the choices are {', '.join(options)} "
                    f"(the files in conf/{key}/). For example: {key}={options[0] if options else '...'}."
                )
