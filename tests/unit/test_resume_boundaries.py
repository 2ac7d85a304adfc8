"""Restored state is data: a resumed run never removes a file outside its own checkpoints folder.

A checkpoint given to ``resume=`` may come from a stranger. The checkpoint callback's state stored in it
(``last_model_path``, ``best_model_path``, ``best_k_models``, ``kth_best_model_path``, ``dirpath``) names the
files Lightning removes as "the previous last / k-th best checkpoint" when the resumed run saves. These tests
craft that state (``..``, absolute paths, symbolic links out of the folder, ``dirpath`` missing or replaced)
and check that every such path is dropped with a warning, that the removal point refuses anything that is not
a checkpoint this run lineage wrote in its folder, and that a real ``gencli train ... resume=PATH`` leaves a
victim file outside the run intact, while the normal rotation of a run's own best checkpoint still works. Also:
a full disk at the very first save says that there is nothing to continue from.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import describe, gencli_in_process
from conftest import gencli as gencli_process
from gencli.callbacks.checkpoint import ModelCheckpoint, checkpoint_naming
from gencli.checkpoint_io import SafeCheckpointIO
from gencli.checkpoints import WRITTEN_RECORD, CheckpointFolder, save_failure

BEST, LAST = checkpoint_naming("best-{epoch:03d}-{step:06d}", auto_insert_metric_name=False)
EITHER = __import__("re").compile(f"(?:{BEST.pattern})|(?:{LAST.pattern})")


# ----------------------------------------------------------------------------- a run folder and its victims
@pytest.fixture
def run(tmp_path):
    """A run's checkpoints folder written by 'this run' (recorded), and files outside it that must survive."""
    folder = tmp_path.resolve() / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    outside = tmp_path.resolve() / "elsewhere"
    outside.mkdir()
    victims = {name: outside / name for name in ("victim.txt", "best-000-000001.ckpt", "last.ckpt")}
    for path in victims.values():
        path.write_text("keep me")
    checkpoints = CheckpointFolder(folder, EITHER)
    for name in ("best-000-000025.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"checkpoint")
        checkpoints.record(folder / name)
    # links from inside the folder to the outside: to a file, and to a folder
    (folder / "best-009-000009.ckpt").symlink_to(victims["best-000-000001.ckpt"])
    (folder / "out").symlink_to(outside, target_is_directory=True)
    return folder, outside, victims, checkpoints


def crafted_paths(folder: Path, outside: Path) -> dict[str, str]:
    """Ways of naming a file outside ``folder`` (or not gencli's) that a crafted checkpoint could use."""
    ups = os.path.relpath(outside, folder)
    return {
        "dotdot": f"{folder}/{ups}/victim.txt",
        "dotdot_gencli_name": f"{folder}/{ups}/best-000-000001.ckpt",
        "absolute": str(outside / "last.ckpt"),
        "relative": os.path.relpath(outside / "victim.txt"),
        "symlinked_file": str(folder / "best-009-000009.ckpt"),
        "symlinked_folder": str(folder / "out" / "best-000-000001.ckpt"),
        "through_link_then_up": f"{folder}/out/../elsewhere/victim.txt",
        "not_gencli_named": str(folder / "notes.txt"),
        "beside_the_folder": str(folder.parent / "last.ckpt"),
        "home": "~/.bashrc",
    }


def callback(folder: Path, monitor: str | None = "val/loss", mode: str = "min") -> ModelCheckpoint:
    cb = ModelCheckpoint(dirpath=str(folder), filename="best-{epoch:03d}-{step:06d}", monitor=monitor, mode=mode,
                         save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False)
    cb.folder = CheckpointFolder(cb.dirpath, EITHER)  # what setup() does
    return cb


def genuine_state(folder: Path) -> dict:
    best = str(folder / "best-000-000025.ckpt")
    return {"monitor": "val/loss", "best_model_score": torch.tensor(1.5), "best_model_path": best,
            "current_score": torch.tensor(1.5), "dirpath": str(folder), "best_k_models": {best: torch.tensor(1.5)},
            "kth_best_model_path": best, "kth_value": torch.tensor(1.5), "last_model_path": str(folder / "last.ckpt")}


@pytest.mark.parametrize("template,auto_insert", [
    ("best-{epoch:03d}-{step:06d}", False), ("best-{step}", True), (None, True), ("{epoch}-{val/loss:.2f}", True),
    ("sample-epoch{epoch:02d}-val_loss{val/loss:.2f}", False), ("{epoch}", False)])
def test_the_naming_is_lightnings(tmp_path, template, auto_insert):
    """Every name Lightning's ModelCheckpoint gives a file (best, last, versions) matches; other names do not."""
    cb = ModelCheckpoint(dirpath=str(tmp_path), filename=template, auto_insert_metric_name=auto_insert)
    metrics = {"epoch": torch.tensor(3), "step": torch.tensor(1200), "val/loss": torch.tensor(0.123)}
    for ver in (None, 1, 12):
        best = os.path.relpath(cb.format_checkpoint_name(dict(metrics), ver=ver), cb.dirpath)
        last = os.path.relpath(cb.format_checkpoint_name(dict(metrics), cb.CHECKPOINT_NAME_LAST, ver=ver), cb.dirpath)
        assert cb.best_naming.fullmatch(best) and cb.last_naming.fullmatch(last), (best, last)
        assert not cb.last_naming.fullmatch(best) and not cb.best_naming.fullmatch(last)
    assert not cb.best_naming.fullmatch("last.ckpt") and not cb.best_naming.fullmatch("last-v2.ckpt")
    for other in ("notes.txt", "last.ckpt.bak", ".last.ckpt.123.partial", WRITTEN_RECORD, "../last.ckpt", "sub/last.ckpt"):
        assert not cb.best_naming.fullmatch(other) and not cb.last_naming.fullmatch(other), other


# ----------------------------------------------------------------------------- restored state
def test_genuine_state_is_kept_with_its_scores(run, caplog):
    folder, *_ = run
    cb = callback(folder)
    with caplog.at_level(logging.WARNING):
        cb.load_state_dict(genuine_state(folder))
    best = str(folder.resolve() / "best-000-000025.ckpt")
    assert cb.last_model_path == str(folder.resolve() / "last.ckpt")
    assert cb.best_k_models == {best: torch.tensor(1.5)} and cb.best_model_path == best == cb.kth_best_model_path
    assert float(cb.best_model_score) == 1.5 == float(cb.kth_value)
    assert not caplog.records


@pytest.mark.parametrize("way", list(crafted_paths(Path("/f"), Path("/o"))))
@pytest.mark.parametrize("key", ["last_model_path", "best_model_path", "best_k_models", "kth_best_model_path"])
@pytest.mark.parametrize("dirpath", ["kept", "missing", "replaced"])
def test_crafted_paths_are_dropped_with_a_warning(run, caplog, monkeypatch, key, way, dirpath):
    folder, outside, *_ = run
    monkeypatch.chdir(folder)  # 'relative' is relative to where gencli runs
    path = crafted_paths(folder, outside)[way]
    state = genuine_state(folder)
    if key == "best_k_models":
        state["best_k_models"] = {path: torch.tensor(float("inf"))}
        state["kth_best_model_path"] = state["best_model_path"] = path
    else:
        state[key] = path
    if dirpath == "missing":
        del state["dirpath"]
    elif dirpath == "replaced":
        state["dirpath"] = str(outside)
    cb = callback(folder)
    with caplog.at_level(logging.INFO):
        cb.load_state_dict(state)
    restored = [cb.last_model_path, cb.best_model_path, cb.kth_best_model_path, *cb.best_k_models]
    assert path not in restored
    for kept in filter(None, restored):  # everything that is left is one of the run's own files
        assert Path(kept).parent == folder.resolve() and Path(kept).is_file() and not Path(kept).is_symlink()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    naming = LAST if key == "last_model_path" else BEST
    normal = os.path.normpath(os.path.join(folder, os.path.expanduser(path)))
    if dirpath == "replaced" and os.path.dirname(normal) == str(outside) and naming.fullmatch(os.path.basename(normal)):
        # exactly what a genuine checkpoint of the run folder `outside` holds: dropped, noted, no alarm
        assert not warning and "not tracked by this run" in caplog.text
    else:
        assert "dropped from the restored state" in warning and path in warning, caplog.text
    if key != "last_model_path":
        assert cb.last_model_path == str(folder.resolve() / "last.ckpt")  # the rest of the state still restores


def test_missing_dirpath_alone_changes_nothing_and_roles_are_not_swapped(run, caplog):
    folder, *_ = run
    state = genuine_state(folder)
    del state["dirpath"]
    cb = callback(folder)
    cb.load_state_dict(state)
    assert cb.last_model_path.endswith("last.ckpt") and cb.best_model_path.endswith("best-000-000025.ckpt")
    # a last_model_path naming the best file would make the next save of last.ckpt remove the best one
    state = genuine_state(folder)
    state["last_model_path"], state["best_k_models"] = state["best_model_path"], {str(folder / "last.ckpt"): 1.0}
    cb = callback(folder)
    with caplog.at_level(logging.WARNING):
        cb.load_state_dict(state)
    assert cb.last_model_path == "" and cb.best_k_models == {} and "is not one gencli gives" in caplog.text


def test_state_of_another_run_folder_is_not_carried_over(tmp_path, caplog):
    """resume=PATH of another run's checkpoint into a new folder: that run's files are not tracked, quietly."""
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    state = genuine_state(other)
    new = tmp_path / "new" / "checkpoints"
    cb = callback(new)
    with caplog.at_level(logging.INFO):
        cb.load_state_dict(state)
    assert cb.best_k_models == {} and cb.last_model_path == "" and cb.best_model_path == ""
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING] and "not tracked" in caplog.text


def test_scores_that_are_not_numbers_are_dropped(run, caplog):
    folder, *_ = run
    state = genuine_state(folder)
    best = state["best_model_path"]
    for bad in ("0.5", [1.0], torch.ones(3), torch.tensor(float("nan")), True):
        state["best_k_models"] = {best: bad}
        cb = callback(folder)
        with caplog.at_level(logging.WARNING):
            cb.load_state_dict(state)
        assert cb.best_k_models == {} and cb.best_model_path == "", bad
    state["best_k_models"] = ["not", "a", "mapping"]
    callback(folder).load_state_dict(state)
    assert "not a mapping" in caplog.text


# ----------------------------------------------------------------------------- the removal point
@pytest.mark.parametrize("way", list(crafted_paths(Path("/f"), Path("/o"))))
def test_removal_refuses_anything_but_this_runs_checkpoints(run, caplog, monkeypatch, way):
    folder, outside, victims, checkpoints = run
    monkeypatch.chdir(folder)
    io_ = SafeCheckpointIO()
    io_.folder = checkpoints
    path = crafted_paths(folder, outside)[way]
    with caplog.at_level(logging.WARNING):
        io_.remove_checkpoint(path)
    assert all(p.read_text() == "keep me" for p in [*victims.values(), folder / "notes.txt"])
    assert (folder / "best-009-000009.ckpt").is_symlink() and (folder / "out").is_symlink()
    assert "left" in caplog.text and "in place" in caplog.text and path in caplog.text


def test_removal_of_a_gencli_named_file_this_run_did_not_write(run, caplog):
    folder, _, _, checkpoints = run
    stranger = folder / "best-003-000300.ckpt"  # e.g. copied here from another run by the user
    stranger.write_bytes(b"someone else's")
    with caplog.at_level(logging.WARNING):
        assert not checkpoints.remove(stranger)
    assert stranger.exists() and "neither this run nor the run it continues wrote" in caplog.text


def test_removal_of_own_checkpoints_and_the_record(run):
    folder, _, _, checkpoints = run
    assert json.loads((folder / WRITTEN_RECORD).read_text())["written"] == ["best-000-000025.ckpt", "last.ckpt"]
    assert checkpoints.remove(f"{folder}/../checkpoints/best-000-000025.ckpt")  # '..' that stays inside is fine
    assert not (folder / "best-000-000025.ckpt").exists()
    assert json.loads((folder / WRITTEN_RECORD).read_text())["written"] == ["last.ckpt"]
    # the run continuing in this folder reads the record: it may remove last.ckpt, not a file it never wrote
    again = CheckpointFolder(folder, EITHER)
    assert again.written == {"last.ckpt"} and again.refusal(folder / "last.ckpt") == ""
    (folder / "best-000-000025.ckpt").write_bytes(b"put back by hand")
    assert "neither this run" in again.refusal(folder / "best-000-000025.ckpt")


def test_the_record_and_a_partial_save_never_write_through_a_link(run):
    """The record was written to '.gencli-written.json.<pid>.partial' (a name anyone could predict) opened following
    links, and a partial checkpoint likewise: a link planted at either name made gencli overwrite its target."""
    from gencli.checkpoints import atomic_save, partial_name

    folder, _, victims, checkpoints = run
    victim = victims["victim.txt"]
    (folder / f".{WRITTEN_RECORD}.{os.getpid()}.partial").symlink_to(victim)
    partial_name(folder / "best-001-000002.ckpt").symlink_to(victim)
    (folder / "best-001-000002.ckpt").unlink(missing_ok=True)
    atomic_save({"w": 1}, folder / "best-001-000002.ckpt")
    checkpoints.record(folder / "best-001-000002.ckpt")
    assert victim.read_text() == "keep me"
    assert "best-001-000002.ckpt" in json.loads((folder / WRITTEN_RECORD).read_text())["written"]
    # a link at the record's own name is replaced by the new record, its target left alone
    (folder / WRITTEN_RECORD).unlink()
    (folder / WRITTEN_RECORD).symlink_to(victim)
    checkpoints.remove(folder / "best-001-000002.ckpt")
    assert victim.read_text() == "keep me" and not (folder / WRITTEN_RECORD).is_symlink()
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".partial")) and not p.is_symlink()]


def test_a_checkpoints_folder_that_is_a_link_is_refused_at_set_up(tmp_path):
    """Lightning keeps the real path of dirpath: <run>/checkpoints -> ../x/checkpoints made the run's own folder
    another run's (every 'inside the folder' check then passes for x's files). The folder as configured is checked."""
    from lightning.pytorch import Trainer

    from gencli.errors import ConfigError

    (tmp_path / "x" / "checkpoints").mkdir(parents=True)
    (tmp_path / "x" / "checkpoints" / "last.ckpt").write_bytes(b"run x's")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "checkpoints").symlink_to(tmp_path / "x" / "checkpoints", target_is_directory=True)
    cb = ModelCheckpoint(dirpath=str(tmp_path / "y" / "checkpoints"), save_last=True)
    trainer = Trainer(default_root_dir=tmp_path, callbacks=[cb], logger=False, enable_progress_bar=False,
                      accelerator="cpu")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'y' / 'checkpoints'} is a symbolic link"):
        cb.setup(trainer, None, "fit")
    assert cb.folder is None and (tmp_path / "x" / "checkpoints" / "last.ckpt").read_bytes() == b"run x's"


@pytest.mark.parametrize("guarded", [True, False])
def test_the_callback_leaves_the_removal_guard_to_the_folder(run, caplog, guarded):
    """One guard (CheckpointFolder.remove): through gencli's I/O the callback hands the removal on; with another
    I/O (a library user's Trainer) the folder removes the file itself, with the same checks and warning."""
    from types import SimpleNamespace

    folder, _, victims, checkpoints = run
    cb = callback(folder)
    cb.folder, cb._guarded = checkpoints, guarded
    removed = []
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(
        remove_checkpoint=lambda path: removed.append(path) or checkpoints.remove(path)))
    with caplog.at_level(logging.WARNING):
        cb._remove_checkpoint(trainer, str(folder / "out" / "victim.txt"))
        cb._remove_checkpoint(trainer, str(folder / "best-000-000025.ckpt"))
    assert victims["victim.txt"].read_text() == "keep me" and not (folder / "best-000-000025.ckpt").exists()
    assert caplog.text.count("left ") == 1 and "it lies outside the run's checkpoints folder" in caplog.text
    assert len(removed) == (2 if guarded else 0)


def test_no_folder_declared_removes_nothing(tmp_path, caplog):
    victim = tmp_path / "last.ckpt"
    victim.write_text("keep me")
    with caplog.at_level(logging.WARNING):
        SafeCheckpointIO().remove_checkpoint(victim)
    assert victim.exists() and str(victim) in caplog.text


@pytest.mark.parametrize("record", ["symlink", "huge", "not_json", "dotdot_name", "absolute_name", "not_a_list"])
def test_a_tampered_record_is_ignored_with_a_warning(run, caplog, record):
    folder, outside, _, _ = run
    path = folder / WRITTEN_RECORD
    path.unlink()
    if record == "symlink":
        (outside / "record.json").write_text(json.dumps({"written": ["best-000-000025.ckpt"]}))
        path.symlink_to(outside / "record.json")
    elif record == "huge":
        path.write_text(json.dumps({"written": ["best-000-000025.ckpt"], "pad": "x" * (1 << 21)}))
    elif record == "not_json":
        path.write_text("best-000-000025.ckpt\n")
    elif record == "dotdot_name":
        path.write_text(json.dumps({"written": ["best-000-000025.ckpt", "../../elsewhere/victim.txt"]}))
    elif record == "absolute_name":
        path.write_text(json.dumps({"written": [str(outside / "victim.txt")]}))
    else:
        path.write_text(json.dumps({"written": "best-000-000025.ckpt"}))
    with caplog.at_level(logging.WARNING):
        checkpoints = CheckpointFolder(folder, EITHER)
    assert checkpoints.written == set() and "ignored" in caplog.text and str(path) in caplog.text
    assert not checkpoints.remove(folder / "best-000-000025.ckpt")  # nothing from before is removed
    assert (folder / "best-000-000025.ckpt").exists()


def test_a_folder_from_before_the_record_takes_its_gencli_named_files(run):
    folder, *_ = run
    (folder / WRITTEN_RECORD).unlink()
    (folder / "notes.txt").write_text("mine")
    checkpoints = CheckpointFolder(folder, EITHER)
    assert checkpoints.written == {"best-000-000025.ckpt", "last.ckpt"}  # not the links, not notes.txt


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_at_the_first_save_says_there_is_nothing_to_continue_from(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    first = save_failure(folder / "best-000-000025.ckpt", err).message
    assert "intact" not in first and "No checkpoint had been written" in first and "none there to continue from" in first
    assert "(ENOSPC)" in first and "Free space" in first
    (folder / "last.ckpt").write_bytes(b"an earlier save")
    later = save_failure(folder / "best-001-000050.ckpt", err).message
    assert "the last good one is intact (last.ckpt)" in later and f"resume={folder / 'last.ckpt'}" in later


def test_a_full_disk_through_the_checkpoint_io(tmp_path, monkeypatch):
    import gencli.checkpoints as checkpoints

    def disk_full(n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "before_write", disk_full)
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(Exception) as err:
        SafeCheckpointIO().save_checkpoint({"a": torch.zeros(1000)}, path)
    assert "No checkpoint had been written" in str(err.value) and "intact" not in str(err.value)
    assert list(path.parent.iterdir()) == []


# ----------------------------------------------------------------------------- the real CLI
TRAIN = ["train", "model=ae", "data.image_size=8", "callbacks=minimal", "callbacks.sample_grid.n=4",
         "callbacks.checkpoint.every_n_steps=0"]


def gencli(argv: list[str]) -> tuple[int, str]:
    return gencli_in_process(argv)


def checkpoint_state(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 1-epoch autoencoder run folder (outputs/train/runs/r), trained once by the real CLI."""
    base = tmp_path_factory.mktemp("boundaries")
    with contextlib.chdir(base):
        code, err = gencli([*TRAIN, "trainer.max_epochs=1", "run_name=r"])
    assert code == 0, err[-3000:]
    return base / "outputs" / "train" / "runs" / "r"


@pytest.mark.slow
@pytest.mark.parametrize("way", ["dotdot_without_dirpath", "symlinked_folders"])
def test_a_crafted_resume_checkpoint_deletes_nothing_outside_the_run(tmp_path, monkeypatch, trained, way):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    run_dir = tmp_path / "outputs" / "train" / "runs" / "r"
    shutil.copytree(trained, run_dir, symlinks=True)
    folder = (run_dir / "checkpoints").resolve()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victims = [outside / "victim-last.txt", outside / "victim-best.ckpt"]
    for victim in victims:
        victim.write_text("keep me")
    checkpoint = torch.load(folder / "last.ckpt", weights_only=True)
    state = checkpoint_state(checkpoint)
    if way == "dotdot_without_dirpath":  # the case: Lightning's own guard compares the text
        up = os.path.relpath(outside, folder)
        last, best = f"{folder}/{up}/victim-last.txt", f"{folder}/{up}/victim-best.ckpt"
        del state["dirpath"]
    else:
        (folder / "a").symlink_to(outside, target_is_directory=True)
        (folder / "b").symlink_to(outside, target_is_directory=True)
        last, best = str(folder / "a" / "victim-last.txt"), str(folder / "b" / "victim-best.ckpt")
        state["dirpath"] = str(folder)  # replaced by this run's own folder, which the author guessed
    # the next save of last.ckpt would remove the "previous last"; any new best, the "k-th best" (score +inf)
    state.update(last_model_path=last, best_model_path=best, kth_best_model_path=best,
                 best_k_models={best: torch.tensor(float("inf"))}, kth_value=torch.tensor(float("inf")))
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)

    code, err = gencli([*TRAIN, "trainer.max_epochs=2", "run_name=r", f"resume={crafted}"])
    assert [v.read_text() for v in victims] == ["keep me", "keep me"]
    if way == "symlinked_folders":  # links out of the run folder: the pre-flight refuses the folder itself
        text = " ".join(err.split())
        assert code == 2 and any(f"holds {folder / n}, a symbolic link" in text for n in "ab"), err[-3000:]
        return
    assert code == 0, err[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "dropped from the restored state" in log and last in log and best in log
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["status"] == "completed" and report["steps"] == 50
    assert Path(report["files"]["best_checkpoint"]).parent == folder  # the resumed run's own best, in its folder
    assert (folder / "best-001-000050.ckpt").is_file() and (folder / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_resumed_run_still_replaces_its_own_best_checkpoint(tmp_path, monkeypatch):
    """The legitimate rotation: resume=auto continues the run, and its new best replaces the old best file.

    Two processes of the real CLI (a gencli train holds its run folder's lock until its process ends)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    # the step always improves, so every epoch makes a new best (the val loss need not)
    common = [*TRAIN, "run_name=own", "callbacks.checkpoint.monitor=step", "callbacks.checkpoint.mode=max"]
    result = gencli_process(*common, "trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    folder = tmp_path / "outputs" / "train" / "runs" / "own" / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["best-000-000025.ckpt", "last.ckpt"]
    result = gencli_process(*common, "trainer.max_epochs=2", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["best-001-000050.ckpt", "last.ckpt"]
    assert json.loads((folder / WRITTEN_RECORD).read_text())["written"] == ["best-001-000050.ckpt", "last.ckpt"]
    state = checkpoint_state(torch.load(folder / "last.ckpt", weights_only=True))
    assert list(state["best_k_models"]) == [str(folder.resolve() / "best-001-000050.ckpt")]
    assert "in place instead of removing" not in result.stdout + result.stderr
