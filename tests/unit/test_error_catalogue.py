"""Every row of the catalogue in docs/errors.md, run: the exit code, one paragraph, no traceback.

The test reads the table between ``<!-- catalogue -->`` markers, so the documentation and the behaviour
cannot drift apart. Each row's command runs in-process through ``gencli.cli.main`` (the real entry
point: the pre-flight check, Hydra, the job), in a fresh folder, with the files the row names made
here.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pickle
import re
import shlex
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import blob_digits, gencli_in_process, write_idx

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def catalogue() -> list[tuple[int, str, int, list[str]]]:
    text = DOC.read_text()
    table = text.split("<!-- catalogue -->")[1].split("<!-- /catalogue -->")[0]
    rows = []
    for line in table.splitlines():
        match = re.match(r"\| (\d+) \| `gencli ([^`]*)`[^|]* \| (\d+) \| (.*) \|$", line)
        if match:
            number, command, code, says = match.groups()
            rows.append((int(number), command, int(code), re.findall(r"`([^`]*)`", says)))
    return rows


ROWS = catalogue()


def test_the_catalogue_is_complete():
    assert len(ROWS) >= 40
    assert [row[0] for row in ROWS] == list(range(1, len(ROWS) + 1))


def run(argv: list[str]) -> tuple[int, str]:
    return gencli_in_process(argv)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """{ckpt}: a 1-epoch autoencoder on 8x8 digits, from the real CLI."""
    folder = tmp_path_factory.mktemp("catalogue_ckpt")
    with contextlib.chdir(folder):
        code, err = run(["train", "model=ae", "data.image_size=8", "trainer.max_epochs=1", "callbacks=minimal",
                         "callbacks.sample_grid.n=4", "run_name=fixture"])
    assert code == 0, err
    return folder / "outputs" / "train" / "runs" / "fixture" / "checkpoints" / "last.ckpt"


@functools.lru_cache(maxsize=1)
def crafted_study_bytes() -> bytes:
    """optuna.db of a study 'ae' whose trial 0, left RUNNING, carries a parameter hparams_search=ae_optuna does not
    declare (as a stranger's copied sweep folder could); built once with Optuna's own API, copied per row."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "optuna.db"
        study = optuna.create_study(study_name="ae", storage=f"sqlite:///{db}")
        trial = study.ask()
        for name, value in (("model.latent_dim", 16), ("model.noise_std", 0.1), ("model.optimizer.lr", 0.001),
                            ("hydra.job_logging.handlers.file.filename", "/tmp/gencli_owned.log")):
            trial.suggest_categorical(name, [value])
        return db.read_bytes()


def make_files(tmp: Path, ckpt: Path) -> dict[str, str]:
    files = {"ckpt": str(ckpt), "tmp": str(tmp), "missing": str(tmp / "missing.ckpt")}
    (tmp / "notes.ckpt").write_text("my notes, not weights")
    files["notes"] = str(tmp / "notes.ckpt")

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp / 'marker'}",))

    torch.save({"state_dict": {}, "gencli": {"config": {}}, "x": Payload()}, tmp / "payload.ckpt")
    files["payload"] = str(tmp / "payload.ckpt")
    good = torch.load(ckpt, weights_only=True)
    hostile = dict(good, gencli=dict(good["gencli"], config=dict(good["gencli"]["config"],
                                                                 model={"_target_": "os.system", "_args_": ["touch x"]})))
    torch.save(hostile, tmp / "hostile.ckpt")
    files["hostile"] = str(tmp / "hostile.ckpt")
    torch.save(dict(good, gencli=dict(good["gencli"], format=2, version="9.0")), tmp / "newer.ckpt")
    files["newer"] = str(tmp / "newer.ckpt")
    torch.save({k: v for k, v in good.items() if k != "gencli"}, tmp / "foreign.ckpt")
    files["foreign"] = str(tmp / "foreign.ckpt")
    np.savez(tmp / "float.npz", images=np.zeros((4, 16, 16, 1), dtype=np.float32))
    files["float_npz"] = str(tmp / "float.npz")
    np.savez(tmp / "u8.npz", images=np.random.default_rng(0).integers(0, 256, (8, 8, 8), dtype=np.uint8))
    files["u8_npz"] = str(tmp / "u8.npz")
    (tmp / "empty").mkdir()
    files["empty"] = str(tmp / "empty")
    (tmp / "plain_file").write_text("x")
    files["file"] = str(tmp / "plain_file")
    # a cut-off MNIST .gz
    mnist = tmp / "mnist"
    mnist.mkdir()
    images, labels = blob_digits(64)
    gz = write_idx(mnist / "train-images-idx3-ubyte", images)
    gz.write_bytes(gz.read_bytes()[:300])
    write_idx(mnist / "train-labels-idx1-ubyte", labels)
    files["truncated_mnist"] = str(mnist)
    # a CIFAR-10 whose first batch has fewer labels than images
    cifar = tmp / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)]):
        batch = {"data": np.zeros((8, 3072), dtype=np.uint8), "labels": [0] * (5 if i == 0 else 8)}
        (cifar / name).write_bytes(pickle.dumps(batch))
    files["bad_cifar"] = str(tmp / "cifar")
    # run directories: one with checkpoints, one with only unreadable ones
    for name, content in (("taken", ckpt.read_bytes()), ("broken", b"garbage")):
        folder = tmp / "outputs" / "train" / "runs" / name / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(content)
    # sweep folders whose optuna.db is crafted (a trial with an undeclared parameter) or not a database at all
    for name, content in (("crafted_study", crafted_study_bytes()), ("garbage_study", b"not a database")):
        (tmp / name).mkdir()
        (tmp / name / "optuna.db").write_bytes(content)
        files[name] = str(tmp / name)
    # a run folder held by another run (gencli.runlock): its lock file, locked for the rest of this process
    busy = tmp / "outputs" / "train" / "runs" / "busy"
    busy.mkdir(parents=True)
    (busy / ".gencli.lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere", "since": "2026-01-01 00:00:00",
                                                   "command": "gencli train run_name=busy"}))
    fd = os.open(busy / ".gencli.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # flock locks belong to the open file: the CLI's own open in this process conflicts
    files["busy"] = str(busy)
    # run folders holding an entry gencli, Hydra or Lightning would write through (a crafted or copied folder)
    victim = tmp / "victim.txt"
    victim.write_text("precious\n")
    runs = tmp / "outputs" / "train" / "runs"
    for name in ("linked_lock", "linked_checkpoints", "hardlinked_log"):
        (runs / name).mkdir(parents=True)
        (runs / name / "train.log").write_text("a finished run\n")
    (runs / "linked_lock" / ".gencli.lock").symlink_to(victim)
    (runs / "linked_checkpoints" / "checkpoints").symlink_to(runs / "taken" / "checkpoints", target_is_directory=True)
    (runs / "hardlinked_log" / "train.log").unlink()
    os.link(victim, runs / "hardlinked_log" / "train.log")
    # 8x8 samples whose labels array holds a class no data set has (10**12 at index 3)
    labels = np.arange(8) % 10
    labels[3] = 10**12
    np.savez(tmp / "bad_labels.npz", images=np.random.default_rng(0).integers(0, 256, (8, 8, 8), dtype=np.uint8),
             labels=labels)
    files["bad_labels_npz"] = str(tmp / "bad_labels.npz")
    return files


def fill(text: str, files: dict[str, str]) -> str:
    """Replace {name} by the row's file (and leave ${...} interpolations alone)."""
    return re.sub(r"(?<!\$)\{(\w+)\}", lambda m: files.get(m.group(1), m.group(0)), text)


@pytest.mark.parametrize("number,command,code,needles", ROWS, ids=[f"{r[0]:02d}-{r[1][:40]}" for r in ROWS])
def test_catalogue_row(tmp_path, monkeypatch, trained, number, command, code, needles):
    files = make_files(tmp_path, trained)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    argv = [fill(arg, files) for arg in shlex.split(command)]
    exit_code, stderr = run(argv)
    assert exit_code == code, f"{command}: exit {exit_code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    message = stderr.split("gencli error:", 1)[-1]
    assert "gencli error:" in stderr, stderr[-3000:]
    paragraph = " ".join(message.split())
    for needle in needles:
        assert fill(needle, files) in paragraph, f"{needle!r} not in: {paragraph}"
    assert not (tmp_path / "marker").exists()


def test_a_read_only_output_folder(tmp_path, monkeypatch):
    """A run folder on a read-only file system (a read-only tmpfs where the test may mount one; otherwise a
    folder without write permission when not root) is one paragraph before Hydra creates anything."""
    import os
    import subprocess

    folder = tmp_path / "readonly"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here, and root ignores folder permissions")
        folder.chmod(0o555)
    try:
        monkeypatch.chdir(tmp_path)
        code, stderr = run(["train", f"paths.log_dir={folder}/runs"])
        assert code == 2, stderr
        assert "cannot be created" in stderr and "is not writable" in stderr and "paths.log_dir" in stderr, stderr
        assert "Traceback" not in stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)
