"""Without optuna, only a search needs it: Hydra's plugin scan (every command) stays quiet, and
``hparams_search=...`` is one paragraph naming the pip install. optuna is made unimportable in a subprocess by a
package of that name, first on PYTHONPATH, that raises ModuleNotFoundError as a missing one would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import describe
from gencli.errors import ConfigError

IMPORT_ERROR = "Error importing 'hydra_plugins.gencli_sweepers'"


def without_optuna(tmp_path: Path) -> dict:
    shadow = tmp_path / "no_optuna" / "optuna"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'optuna'\", name='optuna')\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shadow.parent), env.get("PYTHONPATH")]))
    return env


def test_hydra_s_plugin_scan_finds_the_sweeper_without_importing_optuna(tmp_path):
    script = ("import warnings, sys\n"
              "warnings.simplefilter('always')\n"
              "from hydra.core.plugins import Plugins\n"
              "from hydra.plugins.sweeper import Sweeper\n"
              "names = [c.__module__ + '.' + c.__name__ for c in Plugins.instance().discover(Sweeper)]\n"
              "print('\\n'.join(names))\n"
              "print('optuna loaded:', 'optuna' in sys.modules and sys.modules['optuna'] is not None)\n")
    result = subprocess.run([sys.executable, "-c", script], env=without_optuna(tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, describe(result)
    assert "hydra_plugins.gencli_sweepers.GencliOptunaSweeper" in result.stdout  # still a plugin Hydra knows
    assert "optuna loaded: False" in result.stdout
    assert IMPORT_ERROR not in result.stderr and "No module named 'optuna'" not in result.stderr, result.stderr


def test_a_search_without_optuna_is_one_paragraph_with_the_pip_install(monkeypatch):
    from gencli.sweep import check_sweeper

    monkeypatch.setitem(sys.modules, "optuna", None)  # 'import optuna' raises ImportError
    search = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "runtime": {"choices": {"hparams_search": "ae_optuna"}},
                                         "sweeper": {"_target_": "hydra_plugins.gencli_sweepers.GencliOptunaSweeper"}}})
    with pytest.raises(ConfigError) as refused:
        check_sweeper(search, multirun=False)
    message = refused.value.message
    assert message.startswith("hparams_search=ae_optuna runs an Optuna search") and "pip install 'hydra-optuna-sweeper" in message
    assert "No module named" in message or "import of optuna halted" in message
    # the plugin itself says the same when built by a library caller that skipped the CLI's check
    from hydra_plugins.gencli_sweepers import GencliOptunaSweeper

    with pytest.raises(ConfigError, match="pip install"):
        GencliOptunaSweeper()
    # a basic sweep, or one run, never asks for optuna
    basic = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "sweeper": {
        "_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}}})
    check_sweeper(basic, multirun=True)
    check_sweeper(OmegaConf.create({"hydra": {"mode": "RUN", "sweeper": search.hydra.sweeper}}), multirun=False)


@pytest.mark.slow
def test_the_cli_without_optuna_is_quiet_and_a_search_names_the_install(tmp_path):
    env = without_optuna(tmp_path)
    gencli = [sys.executable, "-m", "gencli.cli"]
    shown = subprocess.run([*gencli, "train", "--cfg", "job"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, describe(shown)
    assert IMPORT_ERROR not in shown.stderr and "ModuleNotFoundError" not in shown.stderr, shown.stderr
    search = subprocess.run([*gencli, "train", "hparams_search=ae_optuna", f"hydra.sweep.dir={tmp_path}/sweep"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert search.returncode == 2, describe(search)
    assert "Traceback" not in search.stderr and IMPORT_ERROR not in search.stderr
    paragraph = search.stderr.split("gencli error:", 1)[1].strip()
    assert "\n" not in paragraph and "pip install 'hydra-optuna-sweeper>=1.2'" in paragraph
    assert "hparams_search=ae_optuna" in paragraph and "No module named 'optuna'" in paragraph
    assert not (tmp_path / "sweep").exists()  # refused before Hydra made anything
