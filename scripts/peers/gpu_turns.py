"""Compile side by side, time in turns: several measuring processes share one GPU without disturbing each other.

torch.compile of a 35.7M UNet takes one to two minutes of CPU work (issue 24: 100 s for gencli's, 134 s for the
peer's on the H200's 16-core host), while its timed steps take seconds. So scripts/gpu_check.py starts gencli's and
the peer's measurement at the same time: each runs its first steps (the compiling ones) at once, then says it is
ready and waits until every party is ready (or has exited, or ``GPU_CHECK_TURN_WAIT`` seconds have passed), then
takes the GPU in turns (an exclusive lock file) for the rest of its warm-up, its timed steps and its profile. No
party's timed window overlaps another's compiling or steps. Off (every call a no-op) unless ``GPU_CHECK_TURN_DIR``
is set; ``GPU_CHECK_TURN_NAME`` names the party and ``GPU_CHECK_TURN_PARTIES`` says how many there are.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


class Turns:
    def __init__(self, directory: str | None = None, name: str | None = None, parties: int | None = None,
                 wait_s: float | None = None):
        env = os.environ
        directory = directory or env.get("GPU_CHECK_TURN_DIR")
        self.dir = Path(directory) if directory else None
        self.name = name or env.get("GPU_CHECK_TURN_NAME", f"pid{os.getpid()}")
        self.parties = int(parties or env.get("GPU_CHECK_TURN_PARTIES", "1"))
        self.wait_s = float(wait_s if wait_s is not None else env.get("GPU_CHECK_TURN_WAIT", "600"))
        self._lock = None
        #: seconds spent waiting for the others to be ready, then for the GPU
        self.waited_ready_s = self.waited_gpu_s = 0.0
        self.timed_out = False

    @property
    def on(self) -> bool:
        return self.dir is not None

    def _count(self) -> int:
        names = {p.stem for p in self.dir.glob("*.ready")} | {p.stem for p in self.dir.glob("*.exited")}
        return len(names)

    def acquire(self) -> None:
        """Ready (the compiling steps are done): wait for the other parties, then for the GPU."""
        if not self.on or self._lock is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"{self.name}.ready").touch()
        t0 = time.perf_counter()
        while self._count() < self.parties:
            if time.perf_counter() - t0 > self.wait_s:
                self.timed_out = True
                break
            time.sleep(0.1)
        t1 = time.perf_counter()
        self._lock = open(self.dir / "gpu.lock", "a+")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.waited_ready_s, self.waited_gpu_s = t1 - t0, time.perf_counter() - t1
        print(f"[turns] {self.name}: ready, waited {self.waited_ready_s:.1f} s for the others and "
              f"{self.waited_gpu_s:.1f} s for the GPU{' (stopped waiting: timeout)' if self.timed_out else ''}",
              flush=True)

    def release(self) -> None:
        """Done with the GPU (also marks this party as exited, so nobody waits for it)."""
        if not self.on:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"{self.name}.exited").touch()
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def info(self) -> dict:
        return {"waited_ready_s": round(self.waited_ready_s, 2), "waited_gpu_s": round(self.waited_gpu_s, 2),
                "wait_timed_out": self.timed_out} if self.on else {}


def mark_exited(directory: str | Path, name: str) -> None:
    """Say that party ``name`` exited (its process ended without releasing, e.g. it crashed while compiling)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"{name}.exited").touch()
