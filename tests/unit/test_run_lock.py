"""A run folder belongs to one run (issue 30, item 4): an OS lock held for the run's life, refusals before anything is
written. The fast tests drive :mod:`gencli.runlock` and the CLI's pre-flight in this process; the slow ones start real
``gencli train`` processes side by side."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gencli import runlock
from gencli.config import precheck
from gencli.errors import ConfigError
from gencli.runlock import LOCK_NAME, RunLock, hold, takes_locks


def fingerprint(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (the folder itself included): its kind, size, mtime (ns) and, for a file, the
    sha256 of its bytes. Equal fingerprints: byte-for-byte the same folder."""
    out = {}
    for path in sorted([folder, *folder.rglob("*")]):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(folder))] = (path.is_dir(), st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def released():
    """Locks a test's pre-flight took for this process are let go afterwards (the CLI holds them until it exits)."""
    yield
    for lock in list(runlock._HELD.values()):
        lock.release()


# ----------------------------------------------------------------------------- the lock itself
def test_a_second_lock_on_a_held_folder_is_refused_naming_the_holder(tmp_path, released):
    folder = tmp_path / "run"
    first = RunLock(folder)
    first.claim()
    record = json.loads((folder / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    before = fingerprint(folder)
    with pytest.raises(ConfigError) as err:
        RunLock(folder).probe()  # flock locks belong to the open file: a second open in this process is refused too
    message = err.value.message
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "running since" in message
    assert "another run_name=" in message and "\n" not in message
    assert fingerprint(folder) == before  # the refused one wrote nothing
    first.release()
    second = RunLock(folder)
    assert second.probe()  # free again once released
    second.release()


def test_probe_writes_nothing_and_claim_records_the_holder(tmp_path, released):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    before = fingerprint(folder)
    lock = RunLock(folder)
    assert lock.probe() is False  # no lock file yet: none is created by looking
    assert fingerprint(folder) == before
    lock.claim()
    assert (folder / LOCK_NAME).is_file() and runlock.held(folder) is lock
    lock.release()
    assert runlock.held(folder) is None


@pytest.mark.parametrize("kind", ["symlink", "dangling", "hardlink", "fifo", "folder"])
@pytest.mark.parametrize("step", ["probe", "claim"])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_and_its_target_untouched(tmp_path, released, kind, step):
    """A crafted run folder whose lock file is a link must not make gencli write its record through it (a symbolic
    link to ../victim.txt got the holder's JSON), nor a hard link (its content is another name's too)."""
    folder = tmp_path / "run"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock_file = folder / LOCK_NAME
    if kind == "symlink":
        lock_file.symlink_to("../victim.txt")
    elif kind == "dangling":
        lock_file.symlink_to("../created-through-the-link.txt")
    elif kind == "hardlink":
        os.link(victim, lock_file)
    elif kind == "fifo":
        os.mkfifo(lock_file)
    else:
        lock_file.mkdir()
    with pytest.raises(ConfigError) as err:
        getattr(RunLock(folder), step)()
    text = str(err.value)
    assert str(lock_file) in text and "Remove it" in text and "\n" not in text
    assert victim.read_text() == "precious\n"
    assert not (tmp_path / "created-through-the-link.txt").exists()
    assert runlock.held(folder) is None


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path, released):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "yesterday", "command": "gencli train"}
    (folder / LOCK_NAME).write_text(json.dumps(stale))
    lock = RunLock(folder)
    assert lock.probe()  # the record stays a record: the OS lock died with its process
    lock.claim()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_killed_holder_releases_the_folder(tmp_path, released):
    """SIGKILL leaves no chance to clean up: the OS drops the lock with the process."""
    folder = tmp_path / "run"
    holder = another_process_holding(folder)
    try:
        with pytest.raises(ConfigError, match=f"pid {holder.pid} on host"):
            RunLock(folder).probe()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(folder)
    assert lock.probe()
    lock.release()


def test_hold_releases_on_any_exit_and_keeps_a_lock_taken_before(tmp_path, released):
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with hold(folder):
            assert runlock.held(folder) is not None
            raise RuntimeError("the job failed")
    assert runlock.held(folder) is None
    probe = RunLock(folder)
    assert probe.probe()
    probe.release()
    # a lock the pre-flight took stays held after the job's block (the CLI process keeps it until it exits)
    taken = RunLock(folder)
    taken.claim()
    with hold(folder) as inner:
        assert inner is taken
    assert runlock.held(folder) is taken
    taken.release()


@pytest.mark.parametrize("env, takes", [
    ({}, True), ({"LOCAL_RANK": "0", "RANK": "0"}, True), ({"SLURM_PROCID": "0"}, True),
    ({"LOCAL_RANK": "1"}, False), ({"RANK": "3"}, False), ({"SLURM_PROCID": "2"}, False),
])
def test_only_the_process_that_speaks_for_the_run_locks(monkeypatch, tmp_path, env, takes):
    """Ranks that Lightning's DDP launcher starts re-run the job in their launcher's folder; torchrun/SLURM ranks
    other than global rank 0 too: they must not be refused by their own run's lock."""
    for name in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert takes_locks() is takes
    launcher = another_process_holding(tmp_path / "run")
    try:
        if takes:
            with pytest.raises(ConfigError, match=f"is in use by another run: pid {launcher.pid}"):
                with hold(tmp_path / "run"):
                    pass
        else:
            with hold(tmp_path / "run") as lock:
                assert lock is None
    finally:
        launcher.kill()
        launcher.wait()


def another_process_holding(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from gencli.runlock import RunLock; RunLock(sys.argv[1]).claim(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


# ----------------------------------------------------------------------------- the CLI's pre-flight
TINY = ["model=ae", "data.image_size=8", "trainer.max_epochs=1"]


def test_the_preflight_refuses_a_new_run_over_checkpoints_leaving_the_folder_as_it_was(tmp_path, released):
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's weights")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("model:\n  latent_dim: 16\n")
    (folder / "job.json").write_text('{"status": "completed"}')
    before = fingerprint(folder)
    with pytest.raises(ConfigError, match="already holds checkpoints .* resume=auto"):
        precheck("train", "train", [*TINY, f"hydra.run.dir={folder}"])
    assert fingerprint(folder) == before
    assert runlock.held(folder) is None


def a_finished_run(folder: Path) -> None:
    """The entries a finished gencli train leaves in its run folder (contents abridged)."""
    for name, text in ((".hydra/config.yaml", "model:\n  latent_dim: 16\n"), (".hydra/overrides.yaml", "[]\n"),
                       (".hydra/hydra.yaml", "hydra: {}\n"), ("train.log", "a log\n"), ("csv/metrics.csv", "step\n0\n"),
                       ("csv/hparams.yaml", "{}\n"), ("job.json", '{"status": "completed"}'),
                       ("metrics.json", "{}"), ("samples/epoch_000.png", "png"), (LOCK_NAME, "{}")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"weights")


LINKED = ["run", "checkpoints", ".hydra", ".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "csv",
          "csv/metrics.csv", "job.json", "metrics.json", "samples", "tensorboard", "dangling"]


@pytest.mark.parametrize("entry", LINKED)
@pytest.mark.parametrize("resume", [[], ["resume=auto"]])
def test_a_run_folder_whose_paths_are_links_is_refused_before_anything_is_written(tmp_path, released, entry, resume):
    """runs/y/checkpoints -> ../x/checkpoints made 'gencli train run_name=y resume=auto' resume from and overwrite
    run x's checkpoints without x's lock; train.log -> ~/.bashrc got the log appended. Each link is refused in the
    pre-flight, naming it; the files it leads to and the folder stay as they were."""
    other = tmp_path / "x"
    other.mkdir()
    a_finished_run(other)
    victims = fingerprint(other)
    folder = tmp_path / "y"
    if entry == "run":
        folder.symlink_to(other, target_is_directory=True)
    else:
        folder.mkdir()
        a_finished_run(folder)
        path = folder / entry
        if path.is_dir():
            __import__("shutil").rmtree(path)
        else:
            path.unlink(missing_ok=True)
        target = other / ("nowhere" if entry == "dangling" else entry)
        path.symlink_to(target, target_is_directory=target.is_dir())
    before = fingerprint(tmp_path)
    with pytest.raises(ConfigError) as err:
        precheck("train", "train", [*TINY, f"hydra.run.dir={folder}", *resume])
    text = str(err.value)
    named = folder if entry == "run" else folder / entry
    assert f"{named}, a symbolic link" in text and "rm " in text and "nothing was written" in text, text
    assert fingerprint(tmp_path) == before and fingerprint(other) == victims
    assert runlock.held(folder) is None


@pytest.mark.parametrize("kind", ["fifo", "hardlinked log", "hardlinked hydra config"])
def test_a_run_folder_with_a_special_or_hard_linked_file_is_refused(tmp_path, released, kind):
    folder = tmp_path / "y"
    folder.mkdir()
    a_finished_run(folder)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if kind == "fifo":
        (folder / "train.log").unlink()
        os.mkfifo(folder / "train.log")
    else:
        name = "train.log" if kind == "hardlinked log" else ".hydra/config.yaml"
        (folder / name).unlink()
        os.link(victim, folder / name)
    with pytest.raises(ConfigError, match="so the run is refused and nothing was written"):
        precheck("train", "train", [*TINY, f"hydra.run.dir={folder}", "resume=auto"])
    assert victim.read_text() == "precious\n"


def test_links_lightning_makes_and_hard_linked_checkpoints_pass_the_check(tmp_path):
    """save_last='link' makes last.ckpt a link to a checkpoint beside it; checkpoints are renamed into place, so a
    hard-linked copy (cp -al) is never written through."""
    folder = tmp_path / "y"
    folder.mkdir()
    a_finished_run(folder)
    ckpts = folder / "checkpoints"
    (ckpts / "last.ckpt").rename(ckpts / "epoch=0-step=1.ckpt")
    (ckpts / "last.ckpt").symlink_to("epoch=0-step=1.ckpt")
    os.link(ckpts / "epoch=0-step=1.ckpt", tmp_path / "backup.ckpt")
    runlock.check_run_folder(folder)
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").symlink_to(tmp_path / "backup.ckpt")  # the same bytes, but outside the folder
    with pytest.raises(ConfigError, match="a symbolic link"):
        runlock.check_run_folder(folder)


def test_records_put_a_folder_back_byte_for_byte(tmp_path, released):
    """What a run refused in its job (before training) did to an existing run folder is undone: Hydra's rewritten
    .hydra/ files and job.json, the lines appended to train.log, the files and folders it created (csv/, the lock file
    when there was none), with every file's and folder's times."""
    folder = tmp_path / "run"
    folder.mkdir()
    a_finished_run(folder)
    (folder / LOCK_NAME).unlink()
    (folder / "train.log").write_text("line 1\n" * 1000)
    os.utime(folder / ".hydra", ns=(1, 2))
    before = fingerprint(folder)
    lock = RunLock(folder)
    lock.records = runlock.Records(folder)
    lock.claim()
    (folder / ".hydra" / "config.yaml").write_text("model:\n  latent_dim: 8\n")
    (folder / "job.json").unlink()
    (folder / "job.json").write_text('{"status": "failed"}')
    with open(folder / "train.log", "a") as f:
        f.write("refused\n")
    (folder / "tensorboard" / "version_0").mkdir(parents=True)
    (folder / "tensorboard" / "version_0" / "events").write_bytes(b"e")
    assert fingerprint(folder) != before
    runlock.training_starts(tmp_path / "elsewhere")  # another folder's start changes nothing here
    assert runlock.refused_before_training(folder)
    assert fingerprint(folder) == before
    assert not runlock.refused_before_training(folder)  # once


def test_once_training_started_a_refusal_puts_nothing_back(tmp_path, released):
    folder = tmp_path / "run"
    folder.mkdir()
    a_finished_run(folder)
    lock = RunLock(folder)
    lock.records = runlock.Records(folder)
    lock.claim()
    runlock.training_starts(folder)
    (folder / "checkpoints" / "epoch=1.ckpt").write_bytes(b"new")
    assert not runlock.refused_before_training(folder)
    assert (folder / "checkpoints" / "epoch=1.ckpt").exists()


def test_the_preflight_refuses_a_held_folder_and_takes_a_free_one(tmp_path, released):
    folder = tmp_path / "run"
    other = RunLock(folder)
    other.claim()
    before = fingerprint(folder)
    with pytest.raises(ConfigError, match=f"in use by another gencli train run: pid {os.getpid()}"):
        precheck("train", "train", [*TINY, f"hydra.run.dir={folder}"])
    assert fingerprint(folder) == before
    other.release()
    precheck("train", "train", [*TINY, f"hydra.run.dir={folder}"])  # free: taken, for this process's life
    assert runlock.held(folder) is not None
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_preflight_that_loses_the_race_for_the_lock_keeps_no_checkpoint(tmp_path, released, monkeypatch):
    """A run that created the lock file between this pre-flight's probe (no file yet) and its claim wins: the
    checkpoint the pre-flight loaded for its job must not stay behind for a later job of this process."""
    from gencli.jobs import resume

    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    point = resume.ResumePoint.__new__(resume.ResumePoint)
    point.complete = None

    def preflight(cfg):
        resume._PREFLIGHT[resume._key(cfg)] = point
        winner = RunLock(folder)  # the other run, in the same process here: flock refuses a second open file too
        winner.claim()
        return point

    monkeypatch.setattr(resume, "preflight", preflight)
    with pytest.raises(ConfigError, match="is in use by another gencli train run"):
        precheck("train", "train", [*TINY, f"hydra.run.dir={folder}", "resume=auto"])
    assert resume._PREFLIGHT == {}


def test_a_run_folder_named_after_the_start_time_is_locked_by_the_job(tmp_path, released):
    """Hydra names such a folder again when it composes (another time): the pre-flight cannot know it, and creates
    nothing; the job locks it (no other run can have its name)."""
    precheck("train", "train", [*TINY, f"paths.log_dir={tmp_path}"])
    assert not runlock._HELD and not any(tmp_path.iterdir())


def test_a_sweep_locks_its_sweep_folder(tmp_path, released):
    sweep = tmp_path / "sweep"
    precheck("train", "train", ["-m", *TINY, "model.latent_dim=4,8", f"hydra.sweep.dir={sweep}"])
    assert runlock.held(sweep) is not None
    lock = runlock.held(sweep)
    lock.release()


# ----------------------------------------------------------------------------- real processes side by side
class Run:
    """``gencli train ARGS`` as a process of its own (``python -m gencli.cli``), its output in files (a pipe nobody
    reads would stop a long run once full)."""

    count = 0

    def __init__(self, cwd: Path, *args: str):
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        Run.count += 1
        self.logs = cwd / f".run{Run.count}.out", cwd / f".run{Run.count}.err"
        with open(self.logs[0], "w") as out, open(self.logs[1], "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "gencli.cli", "train", *args], cwd=cwd, env=env,
                                         stdout=out, stderr=err)
        self.pid = self.proc.pid

    def poll(self):
        return self.proc.poll()

    def wait(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    @property
    def returncode(self):
        return self.proc.returncode

    def communicate(self, timeout: float = 300) -> tuple[str, str]:
        self.proc.wait(timeout=timeout)
        return self.logs[0].read_text(), self.logs[1].read_text()


def gencli_process(cwd: Path, *args: str) -> Run:
    return Run(cwd, *args)


LONG = ["model=ae", "data.image_size=8", "data.batch_size=64", "trainer.max_epochs=1000", "callbacks=minimal",
        "callbacks.checkpoint.every_n_steps=5", "run_name=shared"]


def race(tmp_path: Path, extra: list[str]) -> tuple[Run, str, str]:
    """Two identical trains started together into one folder: one is refused (exit 2, naming the other), the other
    trains until it is stopped with SIGTERM (exit 143, its checkpoint saved). Returns the runner and both outputs."""
    a, b = gencli_process(tmp_path, *LONG, *extra), gencli_process(tmp_path, *LONG, *extra)
    deadline = time.monotonic() + 240
    while a.poll() is None and b.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    refused, runner = (a, b) if a.poll() is not None else (b, a)
    assert refused.poll() is not None, "neither run was refused"
    refused_err = refused.communicate()[1]
    assert runner.poll() is None, f"both ended: {runner.communicate()}"
    folder = tmp_path / "outputs" / "train" / "runs" / "shared"
    while not list((folder / "checkpoints").glob("*.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the runner trains
    runner.send_signal(signal.SIGTERM)
    runner_out, runner_err = runner.communicate(timeout=120)
    assert refused.returncode == 2, refused_err
    assert runner.returncode == 128 + signal.SIGTERM, runner_err[-2000:]
    return runner, refused_err, runner_out + runner_err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["resume=auto"]], ids=["fresh", "resume_auto"])
def test_two_concurrent_trains_into_one_folder(tmp_path, extra):
    runner, refused_err, _ = race(tmp_path, extra)
    message = refused_err.strip().splitlines()[-1]
    assert message.startswith("gencli error: the run folder") and "is in use by another gencli train run" in message
    assert f"pid {runner.pid} on host {socket.gethostname()}" in message
    assert "run_name=" in message and "Traceback" not in refused_err
    folder = tmp_path / "outputs" / "train" / "runs" / "shared"
    rows = (folder / "csv" / "metrics.csv").read_text().splitlines()
    assert len(rows) == len(set(rows))  # one run's rows, not two interleaved
    assert json.loads((folder / "job.json").read_text())["status"] == "interrupted"
    # the runner, stopped, is continued by resume=auto, which its lock no longer blocks (the process is gone)
    done = gencli_process(tmp_path, *LONG, "trainer.max_epochs=1", "resume=auto")
    out, err = done.communicate(timeout=240)
    assert done.returncode == 0, err[-2000:]


#: An accelerator this machine lacks (Lightning refuses it when the Trainer is built, before training starts).
NO_SUCH_ACCELERATOR = "mps" if __import__("torch").cuda.is_available() else "gpu"


@pytest.mark.slow
def test_refused_runs_leave_the_folder_byte_for_byte(tmp_path):
    base = ["model=ae", "data.image_size=8", "data.batch_size=64", "trainer.max_epochs=1", "callbacks=minimal",
            "run_name=done"]
    first = gencli_process(tmp_path, *base)
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    folder = tmp_path / "outputs" / "train" / "runs" / "done"
    before = fingerprint(folder)
    for extra, exit_code, needle in (
        ([], 2, "already holds checkpoints"),                                     # a new run over checkpoints
        (["model.latent_dim=5", "resume=auto"], 2, "does not fit the model"),     # another model's shapes
        (["model=vae", "resume=auto"], 2, "holds a Autoencoder"),                 # another family
        ([f"resume={folder / 'checkpoints' / 'last.ckpt'}"], 2, "already reached"),  # resume=PATH at its limit
        # refused in the job, after Hydra rewrote .hydra/ and appended to train.log: put back as it was
        (["resume=auto", "trainer.max_epochs=2", f"trainer.accelerator={NO_SUCH_ACCELERATOR}"], 2,
         "Lightning rejected the trainer settings"),
        (["resume=auto"], 0, "so this run is complete"),                          # nothing to train: nothing written
    ):
        proc = gencli_process(tmp_path, *base, *extra)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == exit_code, (extra, err[-2000:])
        assert needle in out + err, (extra, out[-500:], err[-500:])
        assert fingerprint(folder) == before, extra


def test_the_cli_holds_the_folder_while_the_job_runs_and_frees_it_after(tmp_path, monkeypatch, released):
    """The lock taken by the pre-flight is the one the job runs under (nothing is written by Hydra before it), and a
    CLI call made in-process (tests, notebooks) frees it when the run is over."""
    import gencli.jobs.train as train_job
    from gencli.cli import main

    folder = tmp_path / "run"
    seen = {}

    def job():
        seen["held"] = runlock.held(folder) is not None
        seen["holder"] = json.loads((folder / LOCK_NAME).read_text())["pid"]
        seen["entries"] = sorted(p.name for p in folder.iterdir())

    monkeypatch.setattr(train_job, "main", job)
    main(["train", *TINY, f"hydra.run.dir={folder}"])
    assert seen == {"held": True, "holder": os.getpid(), "entries": [LOCK_NAME]}
    assert runlock.held(folder) is None and not runlock._HELD
