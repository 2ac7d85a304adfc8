"""gencli as a shell citizen: --version, per-verb --help with only the verb's groups, and tab completion (answered by
``gencli --complete``; the bash script is run for real in bash)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import describe, gencli
from gencli.shell import SCRIPTS, complete, install, verb_help

BIN = Path(sys.executable).parent


def test_verbs_and_global_flags_complete():
    assert complete([""])[:4] == ["train", "sample", "eval", "export"]
    assert complete(["s"]) == ["sample"]
    assert complete(["--v"]) == ["--version"]
    assert complete(["--install-completion", "z"]) == ["zsh"]


def test_each_verb_completes_only_the_groups_it_composes():
    train = complete(["train", ""])
    for name in ("model=", "data=", "trainer=", "hardware=", "logger=", "callbacks=", "seed=", "resume="):
        assert name in train, name
    sample = complete(["sample", ""])
    assert {"sampler=", "ckpt=", "n=", "mode=", "data=", "hardware="} <= set(sample)
    assert "hardware=" in complete(["eval", ""]) and complete(["sample", "hardware=gpu"]) == ["hardware=gpu_fast"]
    assert not {"trainer=", "logger=", "hparams_search=", "model="} & set(sample)


def test_group_options_and_multirun_lists():
    assert complete(["train", "model=dd"]) == ["model=ddpm"]
    assert "model=ae,vae" in complete(["train", "model=ae,v"])
    assert complete(["eval", "sampler=d"]) == ["sampler=ddim", "sampler=ddpm", "sampler=dpmpp_2m"]


def test_dotted_keys_come_from_the_config_composed_with_what_is_typed():
    ddpm = complete(["train", "model=ddpm", "model."])
    assert "model.net." in ddpm and "model.schedule." in ddpm and "model.guidance=" in ddpm
    vae = complete(["train", "model=vae", "model."])
    assert "model.beta=" in vae and "model.schedule." not in vae
    assert "model.net.ch_mult=" in complete(["train", "model=ddpm", "model.net.ch"])
    assert complete(["train", "trainer.max_st"]) == ["trainer.max_steps="]
    assert complete(["train", "seed="]) == ["seed=0"]  # a key's current value


def test_path_options_complete_files(tmp_path, monkeypatch):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "last.ckpt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert complete(["sample", "ckpt=runs/"]) == ["ckpt=runs/a/", "ckpt=runs/last.ckpt"]
    assert complete(["eval", "ref=ru"]) == ["ref=runs/"]


def test_verb_help_lists_only_the_verbs_groups():
    text = verb_help("sample", [])
    assert "sampler=" in text and "ckpt=" in text and "hardware=" in text  # sampling runs as hardware= says
    for other in ("trainer=", "logger=", "hparams_search="):
        assert other not in text
    train = verb_help("train", ["model=ddpm"])
    assert "[ddpm]" in train and "trainer=" in train and "hparams_search=" in train


def test_cli_version_help_and_hydras_completion_flag(tmp_path):
    version = gencli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("gencli 0.") and "torch" in version.stdout
    helped = gencli("sample", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "sampler=" in helped.stdout and "trainer=" not in helped.stdout
    routed = gencli("train", "-sc", "install=bash", cwd=tmp_path)
    assert routed.returncode == 2 and "--install-completion" in routed.stderr, describe(routed)
    bad = gencli("--frobnicate", cwd=tmp_path)
    assert bad.returncode == 2 and "not a gencli flag" in bad.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_bash_script_completes_through_gencli(tmp_path):
    script = tmp_path / "gencli.bash"
    script.write_text(SCRIPTS["bash"])

    def ask(*words: str) -> list[str]:
        line = " ".join(["gencli", *words])
        program = (f"source {script}; COMP_WORDS=(gencli {' '.join(repr(w) if w else repr('') for w in words)}); "
                   f"COMP_CWORD={len(words)}; COMP_LINE={line!r}; COMP_POINT={len(line)}; _gencli_complete; "
                   "printf '%s\\n' \"${COMPREPLY[@]}\"")
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr
        return [w for w in out.stdout.splitlines() if w]

    assert ask("tr") == ["train"]
    assert ask("train", "model=dd") == ["model=ddpm"]
    assert "sampler=ddim" in ask("sample", "sampler=")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_install_writes_the_script_where_the_shell_looks(tmp_path, monkeypatch, shell):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    message = install(shell)
    target = {"bash": tmp_path / ".local/share/bash-completion/completions/gencli", "zsh": tmp_path / ".zfunc/_gencli",
              "fish": tmp_path / ".config/fish/completions/gencli.fish"}[shell]
    assert target.read_text() == SCRIPTS[shell] and str(target) in message
    assert "gencli --complete" in SCRIPTS[shell]
