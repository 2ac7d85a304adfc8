"""gencli as a shell citizen: ``--version``, each verb's ``--help`` and tab completion for bash, zsh and fish.

Completion is answered by gencli itself (``gencli --complete WORD...`` prints one candidate per line), so the three
shell scripts are a few lines each and complete the same things:

- the verb (``train``, ``sample``...) and the global flags;
- after a verb: the groups *that verb composes* (``model=``, ``data=``... for train; ``sampler=``, ``hardware=`` for
  sample and eval), its options (the keys outside the groups: ``n=``, ``seed=``...), and flags (``--help``, ``--cfg``,
  ``-m``);
- ``group=`` -> that group's options (the files in ``conf/<group>/``);
- ``model.`` / ``model.net.`` -> the keys of the config composed with the words already typed (so ``model=ddpm
  model.`` offers the DDPM's own keys), and ``key=`` -> its current value;
- ``ckpt=``, ``samples=``, ``ref=``, ``input=``, ``data.root=``, ``path=``... -> files and folders.

Each verb's ``--help`` lists only the groups it composes (Hydra's own help lists every folder in ``conf/``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Options whose values are paths: completed with files and folders.
PATH_KEYS = ("ckpt", "samples", "ref", "input", "mask", "resume", "path", "out", "root", "weights_path", "cache_dir")

FLAGS = ("--help", "--cfg", "-m", "--multirun", "--info")
GLOBAL_FLAGS = ("--help", "--version", "--install-completion")
SHELLS = ("bash", "zsh", "fish")


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"gencli {of('gencli')} (torch {of('torch')}, lightning {of('lightning')}, hydra-core {of('hydra-core')}, "
            f"python {sys.version.split()[0]})")


# ----------------------------------------------------------------------------- what a verb composes
def compose(verb: str, overrides: list[str]):
    """The verb's config composed with ``overrides`` (those that compose; the rest are dropped), or None."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gencli.cli import VERBS
    from gencli.config import config_dir

    config_name = VERBS[verb][1]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            for attempt in (overrides, [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]], []):
                try:
                    return hydra_compose(config_name=config_name, overrides=list(attempt), return_hydra_config=True)
                except Exception:  # noqa: BLE001 - a half-typed command line: try with less of it
                    continue
    finally:
        GlobalHydra.instance().clear()
    return None


def groups_of(cfg) -> dict[str, str | None]:
    """group -> chosen option, for the groups this composed config has (Hydra's own groups left out)."""
    choices = cfg.hydra.runtime.choices
    return {str(k): (None if v is None else str(v)) for k, v in choices.items() if not str(k).startswith("hydra")
            and "@" not in str(k)}


def options_of(group: str) -> list[str]:
    from gencli.config import config_dir

    folder = Path(config_dir()) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def job_options(cfg, groups) -> dict[str, object]:
    """The verb's own keys (outside the groups): ``n``, ``seed``, ``mode``..."""
    from omegaconf import OmegaConf

    top = {g.split("/", 1)[0] for g in groups} | {"hydra", "paths"}
    return {k: OmegaConf.to_container(cfg, resolve=False).get(k) for k in cfg if k not in top}


# ----------------------------------------------------------------------------- help
def verb_help(verb: str, overrides: list[str]) -> str:
    from gencli.cli import VERBS

    cfg = compose(verb, overrides)
    if cfg is None:
        return f"gencli {verb}: {VERBS[verb][2]}\n(the config could not be composed with these overrides)"
    groups = groups_of(cfg)
    lines = [f"gencli {verb}: {VERBS[verb][2]}", "",
             "Config groups of this verb (group=option; the current choice in brackets):"]
    for group, chosen in sorted(groups.items()):
        options = options_of(group)
        shown = ", ".join(f"[{o}]" if o == chosen else o for o in options) or "-"
        lines.append(f"  {group + '=':<16} {shown}" + ("" if chosen else "   (optional: none chosen)"))
    lines += ["", "Options (key=value):"]
    for key, value in job_options(cfg, groups).items():
        shown = value if not isinstance(value, dict | list) else "{...}" if isinstance(value, dict) else value
        lines.append(f"  {key + '=':<22} {shown}")
    lines += ["", f"Every key you can set, with its value: gencli {verb} [overrides] --cfg job",
              "Complete keys and options with <Tab>: gencli --install-completion bash|zsh|fish",
              "Multirun sweeps: -m key=a,b,c      Hydra's own flags: --hydra-help"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- completion
def complete(words: list[str]) -> list[str]:
    """Candidates for the last word of ``words`` (the words after ``gencli``; the last one may be empty)."""
    from gencli.cli import VERBS

    if not words:
        words = [""]
    current, before = words[-1], words[:-1]
    if not before:
        return [w for w in (*VERBS, *GLOBAL_FLAGS) if w.startswith(current)]
    verb = before[0]
    if verb == "--install-completion" or verb == "completion":
        return [s for s in SHELLS if s.startswith(current)]
    if verb not in VERBS:
        return []
    typed = [w for w in before[1:] if not w.startswith("-")]
    if current.startswith("-"):
        return [f for f in FLAGS if f.startswith(current)]
    if "=" in current:
        key, value = current.split("=", 1)
        return [f"{key}={v}" for v in values_for(verb, key, value, typed)]
    cfg = compose(verb, typed)
    if cfg is None:
        return []
    groups = groups_of(cfg)
    if "." in current:  # a dotted key: the composed config's own keys below it
        return keys_below(cfg, current)
    names = [f"{g}=" for g in groups] + [f"{k}=" for k in job_options(cfg, groups)]
    names += [f"{g}." for g, chosen in groups.items() if chosen and "/" not in g and g in cfg]
    return sorted(n for n in set(names) if n.startswith(current))


def values_for(verb: str, key: str, prefix: str, typed: list[str]) -> list[str]:
    bare = key.lstrip("+~")
    if bare.split(".")[-1] in PATH_KEYS:
        return paths_like(prefix)
    options = options_of(bare)
    if options:
        done, _, last = prefix.rpartition(",")  # a multirun list: model=ae,v<Tab>
        return [f"{done},{o}" if done else o for o in options if o.startswith(last)]
    cfg = compose(verb, typed)
    if cfg is None:
        return []
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, bare, default=None)
    if value is None or isinstance(value, dict) or OmegaConf.is_config(value):
        return []
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return [text] if text.startswith(prefix) else []


def keys_below(cfg, current: str) -> list[str]:
    from omegaconf import OmegaConf

    parent, _, partial = current.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None)
    if not OmegaConf.is_dict(node):
        return []
    out = []
    for key in node:
        child = node._get_node(key)
        leaf = not OmegaConf.is_dict(child)
        if str(key).startswith(partial) and not str(key).startswith("_"):
            out.append(f"{parent}.{key}{'=' if leaf else '.'}")
    return sorted(out)


def paths_like(prefix: str) -> list[str]:
    base = Path(os.path.expanduser(prefix or "."))
    folder, stem = (base, "") if prefix.endswith("/") or not prefix else (base.parent, base.name)
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    shown = prefix[: len(prefix) - len(stem)] if stem else prefix
    return [f"{shown}{e.name}{'/' if e.is_dir() else ''}" for e in entries
            if e.name.startswith(stem) and (stem.startswith(".") or not e.name.startswith("."))]


# ----------------------------------------------------------------------------- the shell scripts
SCRIPTS = {
    "bash": """# gencli completion for bash (gencli --install-completion bash)
# gencli completes key=value as one word, so '=' must not split words (Hydra's own completion does the same)
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
_gencli_complete() {
    local IFS=$'\\n'
    COMPREPLY=($(gencli --complete "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null))
    # key=, model. and folders/ go on being typed: no space after them
    if [[ ${#COMPREPLY[@]} -eq 1 && "${COMPREPLY[0]}" =~ [=./]$ ]]; then compopt -o nospace 2>/dev/null; fi
}
complete -F _gencli_complete gencli
""",
    "zsh": """#compdef gencli
# gencli completion for zsh (gencli --install-completion zsh)
_gencli() {
    local -a candidates
    candidates=("${(@f)$(gencli --complete "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    # key=, model. and folders/ go on being typed: no space after them
    compadd -Q -S '' -- ${(M)candidates:#*[=./]}
    compadd -Q -- ${candidates:#*[=./]}
}
compdef _gencli gencli
""",
    "fish": """# gencli completion for fish (gencli --install-completion fish)
function __gencli_complete
    set -l words (commandline -opc)[2..-1] (commandline -ct)
    gencli --complete $words 2>/dev/null
end
complete -c gencli -f -a '(__gencli_complete)'
""",
}


def install_target(shell: str) -> Path:
    home = Path.home()
    if shell == "bash":
        data = Path(os.environ.get("XDG_DATA_HOME", home / ".local" / "share"))
        return data / "bash-completion" / "completions" / "gencli"
    if shell == "zsh":
        return home / ".zfunc" / "_gencli"
    return Path(os.environ.get("XDG_CONFIG_HOME", home / ".config")) / "fish" / "completions" / "gencli.fish"


def install(shell: str) -> str:
    from gencli.errors import ConfigError
    from gencli.io import atomic_write

    if shell not in SCRIPTS:
        raise ConfigError(f"--install-completion {shell or '(none)'}: gencli completes in {', '.join(SHELLS)}; "
                          "name one, e.g. gencli --install-completion bash.")
    target = install_target(shell)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, "w") as f:
        f.write(SCRIPTS[shell])
    after = {"bash": "new bash shells load it (bash-completion looks there); in this one: source " + str(target),
             "zsh": "add 'fpath=(~/.zfunc $fpath); autoload -U compinit; compinit' to ~/.zshrc (before compinit "
                    "runs), then open a new shell",
             "fish": "new fish shells load it"}[shell]
    return f"gencli completion for {shell} written to {target}: {after}."
