"""Where the Hydra configs live, what each group offers, and early checks of group choices.

Hydra reports an unknown group option (``model=vea``) with a multi-line composition error and exit
code 1; gencli checks group choices before Hydra composes, so the user gets one paragraph naming the
bad value and the choices, with exit code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import gencli.jobs  # noqa: F401 - its warning filters apply to composing configs too
from gencli.errors import ConfigError


def config_dir() -> Path:
    """The ``conf/`` tree: ``$GENCLI_CONFIG_DIR`` if set, else the one beside ``src/`` in this checkout."""
    env = os.environ.get("GENCLI_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = str(config_dir())


def _register_resolvers() -> None:
    """Resolvers the configs use; registered when this module is imported (before any job composes)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gencli.name_or"):
        # ${gencli.name_or:${run_name},${now:...}}: the run's fixed name if it has one, else the fallback
        OmegaConf.register_new_resolver("gencli.name_or", lambda name, fallback: str(name) if name else fallback)
    if not OmegaConf.has_resolver("gencli.cpu_or_digits"):
        # in a defaults list: - net: ${gencli.cpu_or_digits:${trainer},${data},<small>,<large>} (conf/model/ddpm.yaml)
        OmegaConf.register_new_resolver("gencli.cpu_or_digits", cpu_or_digits)
    if not OmegaConf.has_resolver("gencli.first_try"):
        # in conf/train.yaml's defaults list: - optional first_try: ${gencli.first_try:${model},...}
        OmegaConf.register_new_resolver("gencli.first_try", first_try)


def _group_file(group: str, option: object) -> dict:
    """``conf/<group>/<option>.yaml`` with the keys of the configs it builds on (``- default``) under its own;
    {} when there is no such file (an option from another config search path)."""
    import yaml

    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        return {}
    own = yaml.safe_load(path.read_text()) or {}
    merged: dict = {}
    for entry in own.pop("defaults", None) or []:
        if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
            merged.update(_group_file(group, entry))
    return {**merged, **own}


def trains_on_cpu_or_digits(trainer: object, data: object) -> bool:
    """True when the trainer choice runs on a CPU (its file says ``accelerator: cpu``: trainer=cpu, the default,
    default and ddp_cpu) or the data choice is the embedded digits: where a model's first try must stay small.
    A trainer gencli has no file for counts as a CPU one (small is the safe guess: it trains anywhere)."""
    accelerator = _group_file("trainer", trainer).get("accelerator", "cpu")
    embedded = str(_group_file("data", data).get("_target_", "")).endswith(".DigitsDataModule")
    return accelerator == "cpu" or embedded


def cpu_or_digits(trainer: object, data: object, small: str, large: str) -> str:
    """``small`` where the run trains on a CPU or on the embedded digits, else ``large`` (a config group option,
    e.g. the diffusion net: the small CPU UNet for a first try, the paper's UNet on a GPU with real data)."""
    return small if trains_on_cpu_or_digits(trainer, data) else large


def first_try(model: object, trainer: object, data: object, experiment: object = None, search: object = None) -> str:
    """The ``first_try`` option for a run: the model's name (``conf/first_try/<model>.yaml``, where there is one,
    shortens its run to about a minute) when it trains on a CPU or the embedded digits and no recipe
    (``experiment=``) or search (``hparams_search=``) sets the run up; else ``none`` (nothing changes)."""
    if experiment is not None or search is not None or not (config_dir() / "first_try" / f"{model}.yaml").is_file():
        return "none"
    return cpu_or_digits(trainer, data, str(model), "none")


_register_resolvers()


def group_options(group: str) -> list[str]:
    """The options of ``group`` (``model``, or a nested group such as ``model/net``): its YAML files."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def config_groups() -> list[str]:
    """Every config group, nested ones (``model/net``) included; not Hydra's own settings."""
    root = config_dir()
    # (Hydra's own groups, hydra/launcher, hydra/sweeper..., also get options from installed plugins: not ours to check)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_dir() and "hydra" not in p.relative_to(root).parts and any(p.glob("*.yaml")))


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


def check_null_group_choices(args: list[str], config_name: str | None) -> None:
    """``logger=null``: Hydra takes a group's choice as a file name and fails with a ValueError traceback on null
    (``--cfg job`` included, so this runs before the flags that skip the rest of the pre-flight)."""
    groups = set(config_groups())
    own = primary_defaults(config_name) if config_name else {}
    for arg in args:
        key, _, value = arg.partition("=")
        if own and key.lstrip("+") not in own:
            continue  # not this verb's group: check_group_overrides says so
        if value == "null" and not key.startswith(("~", "-")) and key.lstrip("+") in groups:
            raise null_group_choice(key.lstrip("+"), config_name)


def null_group_choice(key: str, config_name: str | None) -> ConfigError:
    options = group_options(key)
    if "none" in options:
        fix = f"{key}=none turns it off (conf/{key}/none.yaml)"
    elif config_name and key in optional_groups(config_name):
        fix = f"leave {key}= out (it is optional), or write ~{key} to drop a choice made elsewhere"
    else:
        fix = f"choose one of {', '.join(options)}"
    return ConfigError(f"{key}=null: a config group is chosen by the name of one of its files, not null; {fix}.")


# ----------------------------------------------------------------------------- the pre-flight check
HYDRA_FLAGS_WITHOUT_A_RUN = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
                             "--resolve", "-p", "--package")


def quote_unlexable(overrides: list[str]) -> list[str]:
    """Quote values Hydra's override grammar cannot read as they are (``data.root=/data/données``: Hydra's
    lexer takes only ASCII in unquoted values), so a path with non-ASCII characters just works."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    fixed = []
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            fixed.append(arg)
            continue
        try:
            parser.parse_overrides([arg])
            fixed.append(arg)
            continue
        except OverrideParseException:
            pass
        key, value = arg.split("=", 1)
        if value and value[0] not in "'\"" and (not value.isascii() or any(c.isspace() for c in value)):
            quoted = f"{key}='{value.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'"
            try:
                parser.parse_overrides([quoted])
                fixed.append(quoted)
                continue
            except OverrideParseException:
                pass
        fixed.append(arg)
    return fixed


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """One job of a multirun (``model.beta=0.5,1,4`` -> ``model.beta=0.5``), to check before the sweep starts;
    sweeps without a first value (Optuna's ``interval(...)``) are left to each job's own check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    single = []
    for override, text in zip(parsed, overrides):
        if not override.is_sweep_override():
            single.append(text)
            continue
        try:
            first = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - interval() and friends have no first value
            continue
        single.append(f"{override.get_key_element()}={first}")
    return single


#: Hydra's flags that would make it compose or load something this pre-flight never saw: refused, with the reason.
HYDRA_FLAGS_REFUSED = {
    "--experimental-rerun": "it re-runs a job from a pickled config file (.hydra/config.pickle), and unpickling a "
                            "file runs any code its author put in it. Re-run a gencli run from its command line or its "
                            ".hydra/overrides.yaml instead",
    **dict.fromkeys(("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn"),
                    "gencli composes conf/<verb>.yaml and checks it (keys, values, the classes it may build) before "
                    "Hydra runs; a config from elsewhere would skip those checks. Put a config tree of your own in a "
                    "folder and point GENCLI_CONFIG_DIR=DIR at it (checked the same way), or choose options with "
                    "group=option"),
}


def precheck(verb: str, config_name: str, args: list[str]) -> list[str]:
    """Everything that can be checked before a job starts: returns the overrides to hand to Hydra (quoted where
    needed), or raises ConfigError with one paragraph. Composition, the schema, the classes the command line may
    build (:func:`gencli.safety.check_command_line`), the output folder, and for ``gencli train`` the run folder:
    resume= and the checkpoints already there (:func:`gencli.jobs.resume.preflight`), then its lock
    (:mod:`gencli.runlock`), all before Hydra creates the folder or writes anything into it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gencli.schema import validate
    from gencli.sweep import check_sweeper

    args = quote_unlexable(args)
    check_null_group_choices(args, config_name)
    for arg in args:
        if arg.split("=", 1)[0].lstrip("+~") == "ckpt_path" and verb == "train":
            raise ConfigError(f"{arg}: gencli train continues a run with resume=PATH (or resume=auto for the run "
                              "directory's own last checkpoint), through gencli's safe loader; ckpt_path= is not an option.")
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in HYDRA_FLAGS_REFUSED:
            raise ConfigError(f"{flag} is not available in gencli {verb}: {HYDRA_FLAGS_REFUSED[flag]}.")
    if any(arg.split("=", 1)[0] in HYDRA_FLAGS_WITHOUT_A_RUN for arg in args):
        return args
    multirun = any(arg in ("-m", "--multirun") for arg in args)
    if multirun:
        args = settings_of_swept_groups(args, config_name)
    overrides = [arg for arg in args if not arg.startswith("-")]
    check_group_overrides(overrides, config_name=config_name)
    try:
        single = first_of_each_sweep(overrides) if multirun else overrides
    except HydraException as err:
        raise ConfigError(f"the command line could not be read: {' '.join(str(err).split())[:400]}.") from err
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            try:
                cfg = compose(config_name=config_name, overrides=single, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as err:
                raise composition_error(err, verb, config_name, single) from err
            check_output_folder(cfg, multirun)
            with_runtime(cfg, multirun)
            check_sweeper(cfg, multirun)  # hparams_search= without optuna: one paragraph, not Hydra's traceback
            validate(cfg, verb)
            # what Hydra itself builds (callbacks, launcher, sweeper, logging) is bounded like the job's config
            check_command_line(cfg, overrides if multirun else [])
            if verb == "train":
                take_run_folder(cfg, multirun)  # the last check: from here on the run may write into its folder
    finally:
        GlobalHydra.instance().clear()
    return args


def settings_of_swept_groups(args: list[str], config_name: str) -> list[str]:
    """In a multirun, ``sampler=ddim,heun sampler.steps=20``: Hydra first composes the sweep's own config with the
    plain overrides alone, where no sampler is chosen yet, and fails on ``sampler.steps``. A setting of a swept
    optional group becomes a one-value sweep (``sampler.steps=choice(20)``), applied job by job like the group."""
    swept = {arg.split("=", 1)[0] for arg in args
             if "=" in arg and not arg.startswith("-") and ("," in arg.split("=", 1)[1] or "(" in arg.split("=", 1)[1])}
    groups = optional_groups(config_name) & swept
    out = []
    for arg in args:
        key, _, value = arg.partition("=")
        if (value and not arg.startswith(("-", "+", "~")) and key.split(".", 1)[0] in groups and "." in key
                and not any(c in value for c in ",()[]{}'\" ")):
            arg = f"{key}=choice({value})"
        out.append(arg)
    return out


def composition_error(err: Exception, verb: str, config_name: str, overrides: list[str]) -> ConfigError:
    """Hydra's composition errors as one paragraph, with the nearest valid key for a misspelled one."""
    import re

    from hydra import compose

    from gencli.schema import suggest_key

    text = " ".join(str(err).split())
    match = re.search(r"Could not override '([^']+)'", text)
    if match:
        key = match.group(1)
        groups = [arg for arg in overrides if arg.split("=", 1)[0].lstrip("+~") in set(config_groups())]
        try:
            base = compose(config_name=config_name, overrides=groups)
            hint = suggest_key(key, base)
        except Exception:  # noqa: BLE001 - no suggestion is better than a second error
            hint = ""
        value = next((arg.split("=", 1)[1] for arg in overrides if arg.split("=", 1)[0] == key), "")
        return ConfigError(f"{key}={value}: there is no such key in gencli {verb}'s config.{hint} See "
                           f"'gencli {verb} --cfg job' for every key (to add a key on purpose, write +{key}={value}).")
    return ConfigError(f"the config could not be composed: {text[:500]}. See 'gencli {verb} --cfg job'.")


def with_runtime(cfg, multirun: bool) -> None:
    """Fill in what Hydra sets when a job starts (its output folder), so ``${hydra:...}`` keys resolve here."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    with open_dict(cfg):
        folder = OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
        cfg.hydra.runtime.output_dir = str(Path(str(folder)) / ("0" if multirun else ""))
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)


def check_output_folder(cfg, multirun: bool) -> None:
    """The run's folder must be creatable: Hydra creates it first thing, with a traceback if it cannot."""
    from omegaconf import OmegaConf

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        folder = Path(str(OmegaConf.select(cfg, key))).expanduser()
    except Exception:  # noqa: BLE001 - left to Hydra when it cannot be resolved here
        return
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    fix = "set paths.log_dir=DIR (where every run goes) or hydra.run.dir=DIR to a writable folder"
    if not existing.is_dir():
        raise ConfigError(f"the run folder {folder} cannot be created: {existing} is a file, not a folder; {fix}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"the run folder {folder} cannot be created: {existing} is not writable (read-only or "
                          f"no permission); {fix}.")


# ----------------------------------------------------------------------------- what Hydra builds, the run folder
def check_command_line(cfg, sweeps: list[str]) -> None:
    """Hydra's own part of the composed config (``hydra.callbacks``, the launcher, the sweeper and its sampler and
    pruner, the logging handlers and formatters) goes through the allow-list like the job's part (which
    :func:`gencli.schema.validate` resolves through it). ``sweeps``: a multirun's overrides, whose every value (not
    only the first, which was composed) is checked where it names a class."""
    from omegaconf import OmegaConf

    from gencli.safety import check_hydra_node, check_swept_values

    try:
        node = OmegaConf.to_container(cfg.hydra, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation that cannot be resolved here: check the text as written
        node = OmegaConf.to_container(cfg.hydra, resolve=False)
    check_hydra_node(node)
    check_swept_values(sweeps)
    params = (node.get("sweeper") or {}).get("params") if isinstance(node.get("sweeper"), dict) else None
    if isinstance(params, dict):  # a sweep's search space from a config: key -> 'a,b' / 'choice(a,b)' / 'interval(...)'
        check_swept_values([f"{key}={value}" for key, value in params.items() if isinstance(value, str)])


def pinned_folder(cfg, key: str) -> Path | None:
    """The folder ``key`` (``hydra.run.dir`` / ``hydra.sweep.dir``) names, or None when its name holds the start
    time (``${now:...}``): Hydra's own composition will pick another time, and no other run can have it."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    marker = "@gencli-start-time@"
    try:
        copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        OmegaConf.register_new_resolver("now", lambda pattern: marker, replace=True)
        value = OmegaConf.select(copy, key)
    except Exception:  # noqa: BLE001 - not resolvable here: the job locks its folder itself
        return None
    finally:
        setup_globals()  # Hydra's own ${now:} (and friends) again
    if value is None or marker in str(value):
        return None
    return Path(str(value)).expanduser()


def take_run_folder(cfg, multirun: bool) -> None:
    """``gencli train``'s run folder: refuse what the job would refuse there (a new run over checkpoints, resume=
    limits, another family), then lock the folder for this process's life. All before Hydra writes its records
    into the folder, so a refused command leaves it byte-for-byte as it was. A multirun locks its sweep folder
    (each job locks its own folder when it starts)."""
    from gencli.runlock import RunLock, check_run_folder, takes_locks

    folder = pinned_folder(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    if folder is not None:
        check_run_folder(folder)  # no link nor special file in it that a write would go through
    lock = RunLock(folder, "sweep" if multirun else "gencli train run") if folder and takes_locks() else None
    if lock is not None:
        lock.probe()  # a live holder: refused here, nothing written
    try:
        point = None
        if not multirun:
            from gencli.jobs.resume import preflight

            point = preflight(cfg)
        if point is not None and point.complete:
            finish_complete_run(cfg, point, lock)
        if lock is not None:
            if not multirun and folder.is_dir():  # put back if the job refuses the run before training starts
                from gencli.runlock import Records

                lock.records = Records(folder)
            lock.claim()  # may still lose the race to a run that created the lock file since the probe
    except BaseException:
        from gencli.jobs import resume

        resume._PREFLIGHT.clear()  # the checkpoint the pre-flight loaded is for no job now
        if lock is not None:
            lock.release()
        raise


class NothingToTrain(Exception):
    """``resume=auto`` found the run already complete: exit 0 with ``note``, without Hydra writing anything."""

    def __init__(self, note: str):
        super().__init__(note)
        self.note = note


def finish_complete_run(cfg, point, lock) -> None:
    """A run ``resume=auto`` finds complete trains nothing, so its folder keeps the records of the run that trained
    (Hydra would rewrite .hydra/ with this command's settings): only a missing metrics.json is written, as the job
    would; then :class:`NothingToTrain`, which the CLI turns into the note and exit code 0."""
    from gencli.jobs import resume

    resume._PREFLIGHT.clear()
    if not (Path(str(cfg.paths.output_dir)) / "metrics.json").is_file():
        from gencli.jobs.train import finished_value

        if lock is not None:
            lock.claim()
        finished_value(cfg, point)
    raise NothingToTrain(point.complete)
