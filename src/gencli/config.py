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
    folder = config_dir() / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir() and p.name != "hydra")


def check_group_overrides(overrides: list[str]) -> None:
    """Raise ConfigError for ``group=option`` overrides that name no config file."""
    groups = set(config_groups())
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
