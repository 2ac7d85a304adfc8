"""Where the time of ``gencli eval`` (and ``gencli sample``) goes: generation, feature extraction, I/O.

A :class:`TimeSplit` adds up wall seconds per part. The code that does the work marks it with
:func:`timed` (``with timed("generation", images=b): model.sample(...)``), which is a no-op unless a job has made
a split active (:func:`timing`), so library code and the training callbacks pay nothing. Parts nest: time inside
an inner part counts for the inner part only (reading the reference images inside the reference statistics is
I/O, their pass through the extractor is feature extraction), so the parts never add up to more than the wall
time, and the rest is reported as ``other`` (imports of Lightning and torchmetrics, a few seconds once per run;
building the metric objects; Python overhead).

Parts: ``generation`` (the model making images: sampling, decoding, inpainting, reconstructing), ``features``
(feature extraction: generated and real images through the extractor, LPIPS), ``io`` (reading the reference data,
``samples=``/``ref=`` files, input images and caches; writing images and caches), ``setup`` (everything done once
before the work: loading the checkpoint and building the model from it, moving it to the device, which starts
CUDA there, applying ``hardware=`` and compiling, which happens in the first call of a compiled net and is counted
here with that one call; preparing the feature extractor: loading its weights, or training the domain classifier on
first use) and ``metrics`` (computing FID, KID, ... from the features).

On a GPU the work is asynchronous: each boundary waits for the device (``torch.cuda.synchronize``), so a part's
seconds are its work's, not its launches'. On a CPU nothing is synchronised.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

import torch

PARTS = ("generation", "features", "io", "setup", "metrics")
_ACTIVE: contextvars.ContextVar[TimeSplit | None] = contextvars.ContextVar("gencli_time_split", default=None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU); shared by the time split and the training throughput.

    Before CUDA has started nothing can be queued on it: waiting would start CUDA here, between two parts, where its
    seconds would count for no part (they belong to setup, where the model moves to the device)."""
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class TimeSplit:
    """Wall seconds per part of a job, each boundary synchronised with ``device`` when it is a GPU."""

    def __init__(self, device: torch.device | str | None = None, clock=time.perf_counter):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.clock = clock
        self.started = clock()
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.images_generated = 0
        #: the first generation part alone (a compiled net compiles there): the rate without it is reported too
        self.first_generation: tuple[float, int] | None = None
        self._stack: list[list[Any]] = []  # [part, since] of the parts entered and not left

    def sync(self) -> None:
        synchronize(self.device)

    @contextlib.contextmanager
    def part(self, name: str, images: int = 0) -> Iterator[None]:
        if name not in self.seconds:
            raise ValueError(f"unknown part {name!r}; use one of {', '.join(PARTS)}")
        self.sync()
        now = self.clock()
        if self._stack:  # the outer part pauses
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            self.sync()
            now = self.clock()
            _, since = self._stack.pop()
            self.seconds[name] += now - since
            if self._stack:
                self._stack[-1][1] = now
            if name == "generation" and images:
                if self.first_generation is None:
                    self.first_generation = (now - since, int(images))
                self.images_generated += int(images)

    def report(self) -> dict[str, Any]:
        """Seconds per part, the rest (``other``), the total, and generation's images per second."""
        total = self.clock() - self.started
        parts = dict(self.seconds)
        other = max(0.0, total - sum(parts.values()))
        gen = parts["generation"]
        out: dict[str, Any] = {f"{name}_seconds": value for name, value in parts.items()}
        out.update(other_seconds=other, total_seconds=total, images_generated=self.images_generated,
                   generation_images_per_second=self.images_generated / gen if gen > 0 and self.images_generated else None)
        if self.first_generation is not None and self.images_generated > self.first_generation[1]:
            first_s, first_n = self.first_generation
            rest = gen - first_s
            out["first_batch_seconds"] = first_s
            out["generation_images_per_second_after_first_batch"] = ((self.images_generated - first_n) / rest
                                                                      if rest > 0 else None)
        out["shares"] = {name: (value / total if total > 0 else 0.0) for name, value in {**parts, "other": other}.items()}
        out["synchronized"] = self.device.type == "cuda"
        out["note"] = ("wall seconds per part (nested parts count once, for the innermost); generation = the model "
                       "making images, features = the extractor, io = data, files and caches read or written, "
                       "setup = loading the checkpoint, building the model, moving it to the device (CUDA start-up), "
                       "applying hardware= and compiling (a compiled net's first call, that call included), preparing "
                       "the extractor, metrics = computing the numbers from features, other = the "
                       "rest (imports of Lightning and torchmetrics, seconds once per run; building the metrics)"
                       + ("; each boundary waits for the GPU" if self.device.type == "cuda" else ""))
        return out


def summary_line(report: dict[str, Any]) -> str:
    """One line for the terminal: ``time: 12.3 s = generation 10.1 s (82%, 250 img/s), features 1.2 s (10%) ...``."""
    total = report["total_seconds"]

    def share(name: str) -> str:
        seconds = report[f"{name}_seconds"]
        return f"{seconds:.3g} s ({100 * seconds / total:.0f}%)" if total > 0 else f"{seconds:.3g} s"

    rate = report.get("generation_images_per_second")
    gen = share("generation")
    if rate:
        gen = gen[:-1] + f", {rate:.4g} img/s)"
    pieces = [f"generation {gen}", f"features {share('features')}", f"I/O {share('io')}"]
    pieces += [f"{name} {share(name)}" for name in ("setup", "metrics") if report[f"{name}_seconds"] > 0]
    pieces.append(f"other {share('other')}")
    return f"time: {total:.3g} s = " + ", ".join(pieces)


@contextlib.contextmanager
def timing(split: TimeSplit | None) -> Iterator[TimeSplit | None]:
    """Make ``split`` the one :func:`timed` adds to while the context lasts (None: timing off)."""
    token = _ACTIVE.set(split)
    try:
        yield split
    finally:
        _ACTIVE.reset(token)


def timed(name: str, images: int = 0) -> contextlib.AbstractContextManager:
    """``with timed("features"): ...`` adds the block's seconds to the active split's part (no split: nothing)."""
    split = _ACTIVE.get()
    return split.part(name, images) if split is not None else contextlib.nullcontext()


def active() -> TimeSplit | None:
    return _ACTIVE.get()
