"""File edges: safe checkpoint loading, atomic writes, image grids and npz archives.

Inside gencli images are float tensors in [-1, 1], NCHW; they become uint8 NHWC only here.
Every file a job writes goes through :func:`atomic_write` (temp file + rename), so an interrupted
run never leaves a half-written PNG, npz, JSON or CSV that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gencli.errors import ConfigError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode any other new file would get.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    return Path(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


# ----------------------------------------------------------------------------- images
def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC (rounded, clamped)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray | Tensor) -> Tensor:
    """uint8 NHWC (or NHW) -> [-1, 1] float NCHW."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile NCHW images in [-1, 1] into one CHW image (white separators by default)."""
    import math

    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i, img in enumerate(images.detach().float().cpu()):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = img
    return grid


def save_image_grid(path: str | os.PathLike, images: Tensor, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of ``images`` ([-1, 1], NCHW); ``scale`` enlarges small images for viewing."""
    grid = make_grid(images, nrow=nrow)
    array = to_uint8(grid.unsqueeze(0))[0]
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    with atomic_write(path) as f:
        pil.save(f, format="PNG")
    return Path(path)


def save_npz(path: str | os.PathLike, images: np.ndarray, **extra: Any) -> Path:
    """Write uint8 NHWC images under the key ``images`` (the layout torch-fidelity and others read)."""
    with atomic_write(path) as f:
        np.savez_compressed(f, images=images, **extra)
    return Path(path)


def auto_scale(image_size: int) -> int:
    """Enlarge tiny images so a grid of 16x16 digits is visible without zooming."""
    return max(1, 64 // image_size)


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a gencli checkpoint with ``weights_only=True`` (no arbitrary pickles) and check it."""
    path = Path(str(path)).expanduser()
    if not path.exists():
        raise ConfigError(
            f"ckpt={path} does not exist. Give the path of a checkpoint written by 'gencli train', "
            "e.g. ckpt=outputs/train/runs/<date>/checkpoints/last.ckpt (each train run prints it)."
        )
    if path.is_dir():
        candidates = sorted(path.rglob("last.ckpt"))
        hint = f" such as ckpt={candidates[0]}" if candidates else ""
        raise ConfigError(f"ckpt={path} is a directory, not a checkpoint file; give a .ckpt file{hint}.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, EOF, IndexError on text...: all mean "not a checkpoint"
        unsafe = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if unsafe:
            raise ConfigError(
                f"ckpt={path} holds pickled Python objects besides tensors and plain data "
                f"({unsafe[0].split('WeightsUnpickler error: ')[-1][:160]}), so gencli will not load it: "
                "loading with weights_only=True is what keeps a downloaded checkpoint from running code. "
                "Give a .ckpt written by this version of 'gencli train'."
            ) from err
        raise ConfigError(
            f"ckpt={path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else 'unreadable'}). Give a .ckpt written by "
            "'gencli train'; a truncated file usually means the run was killed while saving, so use the "
            "run's other checkpoint (last.ckpt or best-*.ckpt)."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(
            f"ckpt={path} loads, but holds no model state_dict, so it is not a Lightning checkpoint. "
            "Give a .ckpt written by 'gencli train'."
        )
    meta = checkpoint.get("gencli")
    if not isinstance(meta, dict) or not meta.get("config"):
        raise ConfigError(
            f"ckpt={path} is a Lightning checkpoint but was not written by 'gencli train' (it carries no "
            "gencli config), so the model cannot be rebuilt from it. Train with gencli, or load it in Python."
        )
    return checkpoint


def restore_model(path: str | os.PathLike):
    """Rebuild the model a checkpoint was trained with, from the config it carries, and load its weights.

    Returns (model in eval mode on CPU, checkpoint dict). Nothing but the checkpoint is needed.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    checkpoint = load_checkpoint(path)
    config = OmegaConf.create(checkpoint["gencli"]["config"])
    model = instantiate(config.model)
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"ckpt={path} does not match the model its own config builds (missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}): it was probably written by an incompatible gencli version "
            f"({checkpoint['gencli'].get('version')})."
        )
    model.run_config = checkpoint["gencli"]["config"]
    return model.eval(), checkpoint
