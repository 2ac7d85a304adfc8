"""The layers point one way: nets know no training, families and metrics know no jobs, and the eval job knows no
family and no metric (each describes its own table rows and notes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "gencli"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer, forbidden", [
    ("nets", ("gencli.jobs", "gencli.families", "gencli.metrics", "gencli.callbacks", "lightning")),
    ("diffusion", ("gencli.jobs", "gencli.families", "gencli.metrics", "gencli.callbacks")),
    ("families", ("gencli.jobs", "gencli.callbacks")),
    ("metrics", ("gencli.jobs", "gencli.callbacks")),
    ("data", ("gencli.jobs", "gencli.families", "gencli.metrics", "gencli.callbacks")),
    ("callbacks", ("gencli.jobs",)),
])
def test_lower_layers_do_not_import_higher_ones(layer, forbidden):
    found = {f"{path.relative_to(SRC)} imports {name}" for path in (SRC / layer).rglob("*.py")
             for name in imports_of(path) if name.startswith(forbidden)}
    assert not found, sorted(found)


def code_words(path: Path) -> set[str]:
    """The identifiers and string constants of a module's code (docstrings and comments left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
        elif isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
    return words


def test_the_eval_job_reads_no_family_or_metric_specific_keys():
    words = code_words(SRC / "jobs" / "evaluate.py")
    for word in ("fid", "kid", "prdc", "precision", "recall", "inception", "domain", "held_out_accuracy",
                 "GAN", "Diffusion", "VAE", "generator", "comparable_with_papers", "nfe"):
        used = [w for w in words if " " not in w and (word in w.lower() or word in w)]  # keys, not messages
        assert not used, f"jobs/evaluate.py uses {used}: let the metric or family describe itself"


def test_one_grid_and_one_eval_mode():
    """torchvision's make_grid (no copy of our own) and one eval-then-restore helper."""
    sources = {path: path.read_text() for path in SRC.rglob("*.py")}
    assert not [p for p, s in sources.items() if "def make_grid" in s]
    copies = [p.relative_to(SRC) for p, s in sources.items() if "was_training = " in s]
    assert copies == [Path("nets/modes.py")], copies


def test_one_inside_check_one_process_check_one_duration_format():
    """'Does this path lie inside that folder once links are resolved' is gencli.safety.lies_inside, 'is process N
    alive' gencli.io.process_alive, a duration gencli.progress.format_duration: no second copy to drift apart."""
    sources = {path.relative_to(SRC).as_posix(): path.read_text() for path in SRC.rglob("*.py")}
    where = {
        "commonpath(": ["safety.py"], "is_relative_to(": [], "os.kill(pid, 0)": ["io.py"],
        "def process_alive": ["io.py"], "def _process_alive": [], "def _inside": [], "def inside(": [],
        "def duration(": [], "def format_duration": ["progress.py"],
    }
    found = {needle: sorted(p for p, s in sources.items() if needle in s) for needle in where}
    assert found == where
