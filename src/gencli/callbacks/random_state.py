"""TrainingRandomState: the random numbers training steps draw, independent of everything else, and resumable.

A resumed run should continue with the very random numbers the interrupted run would have drawn
(diffusion noise and timesteps, VAE reparameterisation, GAN latents, dropout). Two things stand in
the way: the random state is not in Lightning's checkpoints, and between two training steps other
code draws from the same global generators (validation, sample grids, data loader iterators,
first-use initialisation), and a resumed run does not repeat all of those at the same moments.

So this callback takes the random state (torch CPU and CUDA, numpy, Python ``random``) right after
each training step and puts it back right before the next one: training steps see one stream of
their own, whatever runs in between. The state it holds is what every checkpoint stores (under
``callbacks``), and a resumed run puts it back before its first step. Under DDP every rank's state is
gathered into the checkpoint (rank 0 writes it) and each rank gets its own back.

The train job adds it to every run; it has no options.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def capture() -> dict[str, Any]:
    """The global random state, as each library returns it (taken at every step: kept cheap)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_initialized():  # (is_available() first would cost 43 us a step on a CPU-only machine)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def to_plain(state: dict[str, Any]) -> dict[str, Any]:
    """A captured state as plain data, which loads with ``torch.load(weights_only=True)`` (only when saving)."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {**state, "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def from_plain(state: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {**state, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached),
            "python": (version, tuple(internal), gauss_next)}


class TrainingRandomState(L.Callback):
    def __init__(self) -> None:
        self._after_step: dict[str, Any] | None = None
        self._pending: dict[str, Any] | None = None
        self._rank, self._world_size = 0, 1

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._rank, self._world_size = trainer.global_rank, trainer.world_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state = self._pending if self._pending is not None else self._after_step
        self._pending = None
        if state is not None:
            restore(state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._after_step = capture()

    def state_dict(self) -> dict[str, Any]:
        if self._after_step is None:
            return {}
        if self._world_size > 1:
            import torch.distributed as dist

            # Lightning builds the checkpoint on every rank and rank 0 writes it: collect every rank's state.
            gathered: list[Any] = [None] * self._world_size
            dist.all_gather_object(gathered, to_plain(self._after_step))
            return {"per_rank": gathered}
        return {"per_rank": [to_plain(self._after_step)]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict.get("per_rank") or []
        if per_rank:
            # A run resumed on another number of processes continues every rank from rank 0's stream.
            self._pending = from_plain(per_rank[self._rank] if self._rank < len(per_rank) else per_rank[0])
