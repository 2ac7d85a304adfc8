"""How the fuzz tests drive gencli and what they demand of every answer (issue 29).

gencli is driven only through its command line: ``gencli.cli.main(argv)`` in this process (fast: one call per
generated example), or ``python -m gencli.cli`` in a subprocess with an address-space limit and a timeout (for the
cases that could block or allocate without end). The property, for a file or value gencli must refuse:

* exit code 1 or 2, and the message is ``gencli error: `` and one paragraph (no blank line inside it) that names
  the file or the value;
* no ``Traceback`` (nor Hydra's "Set the environment variable HYDRA_FULL_ERROR") anywhere in what it printed;
* it ends within a time bound and an address-space bound that the test sets;
* nothing it wrote looks complete (samples.npz, images/, metrics.json marked completed, model.safetensors + model.json,
  report.html) when the run failed.

A mutated file that happens to be valid may also succeed (exit 0); :func:`check` allows that only where the test says
so.
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path


def fuzz_settings(max_examples: int, deep: bool = False):
    """Hypothesis settings of a fuzz test: no deadline (one example is a whole gencli command, ~0.3 s), no shrinking
    (each shrink step is another command; the first failing example is reported as found), no example database in
    the working tree. The fast part (``make test``) is derandomized, so it finds the same examples on every run and
    a red test always means a change in gencli; the deep part (``-m slow``) draws new examples on every run
    (GENCLI_FUZZ_DEEP_EXAMPLES=N sets its examples per test)."""
    from hypothesis import HealthCheck, Phase, settings

    if deep and os.environ.get("GENCLI_FUZZ_DEEP_EXAMPLES"):  # a shorter (or longer) deep run: examples per test
        max_examples = int(os.environ["GENCLI_FUZZ_DEEP_EXAMPLES"])
    return settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                    phases=(Phase.explicit, Phase.generate), derandomize=not deep, print_blob=True)


#: generated examples run per format (printed at the end of the session by tests/fuzz/conftest.py)
COUNTS: collections.Counter = collections.Counter()
_names = itertools.count()

#: the bounds every case runs within (issue 29: "within 10 s and bounded memory"); generous enough for a loaded
#: 2-core machine, tight enough that a blocking read or a 71 GiB allocation cannot pass
SECONDS = 30
MEMORY_GIB = 3


class OutOfTime(BaseException):  # noqa: N818 - a BaseException so that no `except Exception` in gencli swallows it
    """The in-process call ran past its time bound."""


@dataclass
class Outcome:
    argv: list[str]
    code: int | str
    out: str
    err: str
    written: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err

    def describe(self) -> str:
        return (f"gencli {' '.join(self.argv)}\n-> exit {self.code}\n--- stdout (tail)\n{self.out[-2500:]}\n"
                f"--- stderr (tail)\n{self.err[-4000:]}\n--- written\n{self.written}")


def unique(prefix: str = "fz") -> str:
    return f"{prefix}{next(_names)}"


@contextlib.contextmanager
def memory_bound(gib: float):
    """Lower this process's address-space limit to what it uses now plus ``gib`` (restored after): an allocation
    beyond it is a MemoryError instead of a machine out of memory."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + int(gib * 2**30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def time_bound(seconds: float):
    def expire(signum, frame):
        raise OutOfTime(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> set[str]:
    return {str(p) for p in Path(folder).rglob("*")} if Path(folder).exists() else set()


def run(argv: list[str], cwd: Path, seconds: float = SECONDS, memory_gib: float = MEMORY_GIB) -> Outcome:
    """``gencli ARGV`` in this process through the real entry point, within the bounds; an exception that escapes
    ``main`` is what the console script would print as a traceback, so it is kept as one."""
    from hydra.core.global_hydra import GlobalHydra

    from gencli.cli import main

    cwd = Path(cwd)
    before = snapshot(cwd)
    GlobalHydra.instance().clear()
    out, err = io.StringIO(), io.StringIO()
    saved_argv = list(sys.argv)
    code: int | str
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with memory_bound(memory_gib), time_bound(seconds):
                main(list(argv))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except OutOfTime:
            code = "timeout"
            err.write(f"\n[fuzz] gencli ran past {seconds} s\n")
        except MemoryError:
            code = "memory"
            err.write("\nTraceback (most recent call last):\n" + traceback.format_exc())
        except BaseException:  # noqa: BLE001 - what escapes main() is a traceback for the user
            code = "exception"
            err.write("\nTraceback (most recent call last):\n" + traceback.format_exc())
        finally:
            sys.argv = saved_argv
            GlobalHydra.instance().clear()
            import logging

            for handler in list(logging.getLogger().handlers):  # Hydra's handlers point at our StringIOs
                logging.getLogger().removeHandler(handler)
    return Outcome(list(argv), code, out.getvalue(), err.getvalue(), sorted(snapshot(cwd) - before))


def run_subprocess(argv: list[str], cwd: Path, seconds: float = SECONDS, memory_gib: float = 8,
                   env: dict | None = None) -> Outcome:
    """``python -m gencli.cli ARGV`` with RLIMIT_AS (the whole process, torch included) and a timeout; for cases that
    could block (FIFOs) or would allocate without bound."""
    limit = int(memory_gib * 2**30)

    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    before = snapshot(cwd)
    try:
        done = subprocess.run([sys.executable, "-m", "gencli.cli", *argv], cwd=cwd, env=full_env, capture_output=True,
                              text=True, timeout=seconds, preexec_fn=limits)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        code = "timeout"
        out = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (
            expired.stdout or "")
        err = ((expired.stderr or b"").decode(errors="replace") if isinstance(expired.stderr, bytes) else (
            expired.stderr or "")) + f"\n[fuzz] gencli ran past {seconds} s\n"
    return Outcome(list(argv), code, out, err, sorted(snapshot(cwd) - before))


COMPLETE_LOOKING = ("samples.npz", "samples.png", "model.safetensors", "model.json", "report.html", "stats.npz",
                    "classifier.pt")


def complete_looking(paths: list[str]) -> list[str]:
    """Of the files a run wrote, those that claim a finished result: a run that failed must leave none."""
    found = []
    for name in paths:
        path = Path(name)
        if path.name in COMPLETE_LOOKING or (path.parent.name == "images" and path.suffix == ".png"):
            found.append(name)
        elif path.name == "metrics.json" and path.is_file():
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text()).get("status") == "completed":
                    found.append(name)
    return found


def paragraph(outcome: Outcome) -> str:
    """The error message, whitespace folded ('' when there is none)."""
    if "gencli error: " not in outcome.err:
        return ""
    return " ".join(outcome.err.split("gencli error: ", 1)[1].split())


#: generated examples that ended in a known defect (tolerated by ``check(known=...)``), per defect
TOLERATED: collections.Counter = collections.Counter()


def known_defect(outcome: Outcome, known: dict[str, str]) -> str | None:
    """The id of the known defect (``{"D1": regex}``) whose regex matches what this outcome printed."""
    for defect, pattern in known.items():
        if re.search(pattern, outcome.text):
            return defect
    return None


def check(outcome: Outcome, names: list[str] | tuple[str, ...] = (), may_succeed: bool = False,
          known: dict[str, str] | None = None, keep: Path | None = None) -> None:
    """The property (see the module docstring). ``names``: strings of which at least one must appear in the
    paragraph (the file's path or name, the value). ``known``: defects (id -> regex on the traceback's end) that a
    generated example may hit without failing the test; each has its own strict xfail test that fails once fixed."""
    survey = os.environ.get("GENCLI_FUZZ_SURVEY")
    if survey:  # (a developer's tool: record every failure in that file instead of stopping at the first)
        try:
            _check(outcome, names, may_succeed, known)
        except AssertionError as failure:
            kept = None
            if keep is not None:
                import shutil

                kept = tempfile.mkdtemp(prefix="kept", dir=Path(survey).parent)
                with contextlib.suppress(OSError, shutil.Error):
                    shutil.copytree(keep, kept, symlinks=True, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("outputs"))
            with open(survey, "a") as f:
                f.write(json.dumps({"argv": outcome.argv, "kept": kept, "code": str(outcome.code),
                                    "tail": outcome.text.strip()[-1200:], "why": str(failure)[:200]}) + "\n")
        return
    _check(outcome, names, may_succeed, known)


def _check(outcome: Outcome, names, may_succeed: bool, known: dict[str, str] | None) -> None:
    """The property; an outcome that breaks it is tolerated (and counted) only when it matches a known defect."""
    try:
        _property(outcome, names, may_succeed)
    except AssertionError:
        if known and not os.environ.get("GENCLI_FUZZ_NO_KNOWN"):  # (set it to see the known defects fail)
            defect = known_defect(outcome, known)
            if defect is not None:
                TOLERATED[defect] += 1
                return
        raise


def _property(outcome: Outcome, names, may_succeed: bool) -> None:
    text = outcome.text
    assert "Traceback" not in text, outcome.describe()
    assert "HYDRA_FULL_ERROR" not in text, outcome.describe()
    assert outcome.code not in ("timeout", "memory", "exception"), outcome.describe()
    if may_succeed and outcome.code == 0:
        return
    assert outcome.code in (1, 2), outcome.describe()
    assert "gencli error: " in outcome.err, outcome.describe()
    message = outcome.err.split("gencli error: ", 1)[1].strip()
    assert "\n\n" not in message, "more than one paragraph:\n" + outcome.describe()
    if names:
        folded = " ".join(message.split())
        assert any(str(name) in folded for name in names), f"the message names none of {list(names)}:\n" + \
            outcome.describe()
    assert not complete_looking(outcome.written), "a failed run left complete-looking files:\n" + outcome.describe()


@contextlib.contextmanager
def scratch(base: Path):
    """A fresh folder per generated example (hypothesis reruns a test body; pytest's tmp_path is per test)."""
    folder = Path(tempfile.mkdtemp(dir=base))
    try:
        yield folder
    finally:
        import shutil

        for path in folder.rglob("*"):  # unreadable files and folders the cases made
            with contextlib.suppress(OSError):
                path.chmod(0o700 if path.is_dir() and not path.is_symlink() else 0o600)
        shutil.rmtree(folder, ignore_errors=True)
