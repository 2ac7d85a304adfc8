"""Shared test fixtures: compose the real configs, run the real CLI, and write tiny data sets in
the real file formats (MNIST IDX .gz, CIFAR-10 python pickles, a folder of PNGs)."""

from __future__ import annotations

import gzip
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from gencli.config import CONF_DIR

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # `make test` runs two pytest workers on two cores: one thread each (and in every gencli subprocess,
    # which inherits the environment), since OpenMP threads that outnumber the cores spin against each
    # other and run many times slower than one thread.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (end-to-end runs)")


def pytest_collection_modifyitems(config, items):
    """Fast by default: a bare ``pytest`` (what ``make test`` runs) leaves out the tests marked slow, the end-to-end
    runs that ``make test-slow`` and CI run. Naming tests or files on the command line, ``-m ...`` or ``--run-slow``
    runs what was asked for."""
    if config.getoption("--run-slow") or config.getoption("markexpr") or not default_selection(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def default_selection(config) -> bool:
    """Whether pytest runs its configured testpaths (no paths or test ids given), also in an xdist worker."""
    worker_input = getattr(config, "workerinput", None)
    if worker_input is not None:  # xdist workers get the controller's arguments explicitly
        return bool(worker_input.get("gencli_default_selection"))
    return config.args_source == pytest.Config.ArgsSource.TESTPATHS


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(xdist) Tell each worker whether the controller runs the default selection."""
    node.workerinput["gencli_default_selection"] = default_selection(node.config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if default_selection(config) and not (config.getoption("--run-slow") or config.getoption("markexpr")):
        terminalreporter.write_line("the end-to-end tests marked slow were left out: `make test-slow` runs them "
                                    "(CI runs both)")


# Small and fast everywhere: a couple of epochs, tiny batches, no progress bar noise.
FAST_TRAIN = [
    "trainer.max_epochs=2",
    "callbacks=minimal",
    "callbacks.sample_grid.n=16",
    "data.batch_size=32",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as the CLI would, with hydra's runtime set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path):
    def _compose(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
        return compose_config(config_name, list(overrides or []), tmp_path / "run")

    yield _compose
    GlobalHydra.instance().clear()


def gencli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``gencli`` entry point in a subprocess (``python -m gencli.cli``)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # tracebacks only when asked
    full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "gencli.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture
def run_gencli(tmp_path):
    """``run_gencli("train", "model=ae", ...)`` -> CompletedProcess; runs in tmp_path (outputs/ lands there)."""

    def _run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
        return gencli(*args, cwd=tmp_path, env=env, timeout=timeout)

    return _run


def gencli_in_process(argv: list[str], cwd: Path | None = None) -> tuple[int, str]:
    """``gencli ARGV`` through the real entry point in this process (pre-flight, Hydra, the job): its exit code and
    stderr. A fresh Hydra before and after, so calls do not see each other's global state."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra

    from gencli.cli import main

    GlobalHydra.instance().clear()
    err = io.StringIO()
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext(), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    GlobalHydra.instance().clear()
    return code, err.getvalue()


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


# ----------------------------------------------------------------------------- tiny data in real formats
def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def blob_digits(n: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic grayscale images with structure (a bright square whose place depends on the label)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = (rng.random((n, size, size)) * 40).astype(np.uint8)
    for i, label in enumerate(labels):
        r, c = 2 + (label // 5) * (size // 2), 2 + (label % 5) * (size // 6)
        images[i, r : r + size // 3, c : c + size // 6] = 255
    return images, labels


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A tiny MNIST in the real IDX format: .gz train files and uncompressed t10k files."""
    root = tmp_path_factory.mktemp("mnist")
    for prefix, n, compress in (("train", 96, True), ("t10k", 48, False)):
        images, labels = blob_digits(n, seed=len(prefix))
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return root


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 in the real python-pickle layout (cifar-10-batches-py/data_batch_1..5, test_batch)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (16, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "labels": rng.integers(0, 10, 16).tolist(), "data": data,
                 "filenames": [f"{i}.png" for i in range(16)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """A folder of PNGs in two class subfolders, with odd sizes, plus one corrupt file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir()
        for i in range(12):
            array = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"{i}.png")
    (root / "dogs" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


@pytest.fixture(scope="session")
def shared_mnist() -> Path:
    path = SHARED_DATA / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("../shared/data/mnist is not present")
    return path


# ----------------------------------------------------------------------------- caches
@pytest.fixture(scope="session", autouse=True)
def gencli_cache(tmp_path_factory) -> Path:
    """Every test (and every gencli subprocess, which inherits the environment) caches domain
    classifiers and reference statistics in one session folder, never in ~/.cache/gencli."""
    path = tmp_path_factory.mktemp("gencli_cache")
    previous = os.environ.get("GENCLI_CACHE")
    os.environ["GENCLI_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("GENCLI_CACHE", None)
    else:
        os.environ["GENCLI_CACHE"] = previous


@pytest.fixture
def stop_at(monkeypatch):
    """stop_at["step"] = k makes the process send itself SIGTERM after training step k (GANs count D and G steps)."""
    state = {"step": None}
    from gencli.callbacks.preemption import Preemption

    original = Preemption.on_train_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if state["step"] is not None and trainer.global_step == state["step"]:
            signal.raise_signal(signal.SIGTERM)
        return original(self, trainer, pl_module, outputs, batch, batch_idx)

    monkeypatch.setattr(Preemption, "on_train_batch_end", on_train_batch_end)
    return state
