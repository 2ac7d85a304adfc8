"""SafeCheckpointIO: Lightning's checkpoint reading and writing through gencli's safe loader and atomic saves.

Kept apart from :mod:`gencli.checkpoints` because it imports Lightning (seconds at start-up), which
``gencli sample`` and ``gencli eval`` never need.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from gencli.checkpoints import CheckpointFolder, atomic_save, load_checkpoint, os_error_in, save_failure

log = logging.getLogger(__name__)


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through gencli's loader and :func:`atomic_save`.

    ``preloaded`` maps a path to a checkpoint already loaded (and checked) by the train job, so
    resuming does not read a large file twice.

    ``folder`` is the run's checkpoints folder, declared by :class:`gencli.callbacks.ModelCheckpoint` at set-up
    (from the run's config, never from a checkpoint): every save in it is recorded, and a file is removed only
    if :class:`gencli.checkpoints.CheckpointFolder` says this run lineage wrote it there; before a folder is
    declared nothing is removed.
    """

    def __init__(self, preloaded: dict[str, dict] | None = None):
        self.preloaded = dict(preloaded or {})
        self.folder: CheckpointFolder | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(str(path))
        try:
            atomic_save(checkpoint, target)
        except Exception as err:
            cause = os_error_in(err)
            if cause is None:
                raise
            raise save_failure(target, cause) from err
        if self.folder is not None:
            self.folder.record(target)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        key = str(Path(str(path)).expanduser())
        if key in self.preloaded:
            return self.preloaded.pop(key)
        return load_checkpoint(path, key="resume")

    def remove_checkpoint(self, path) -> None:
        if self.folder is None:
            log.warning("left %s in place instead of removing it as an old checkpoint: no checkpoints folder was "
                        "declared to this run's checkpoint I/O, so gencli cannot tell whether it wrote the file.", path)
            return
        self.folder.remove(path)
