"""``gencli export ckpt=PATH format=safetensors|diffusers``: a checkpoint's weights in a form that leaves gencli.

- ``format=safetensors`` (default): ``model.safetensors`` with ``model.json`` beside it (the run config and
  gencli record that rebuild the model, which weights were exported, the weights' SHA-256;
  :mod:`gencli.exports`). ``gencli sample ckpt=model.safetensors`` and ``gencli eval`` read the pair through
  the same loader and checks as a .ckpt.
- ``format=diffusers``: a folder that ``diffusers.DDPMPipeline.from_pretrained`` loads (``unet/``,
  ``scheduler/``, ``model_index.json``), for pixel-space DDPM models whose UNet maps exactly onto
  ``UNet2DModel``; anything else is refused with the reason (:mod:`gencli.diffusers_export`).

Weights: the EMA copy where the family keeps one (``use_ema=null``, what sampling uses by default), or
``use_ema=false`` for the raw ones. Every file is written under a temporary name and renamed into place
(a diffusers folder as a whole), and an existing export is replaced only with ``overwrite=true``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gencli.config import CONF_DIR
from gencli.errors import ConfigError
from gencli.exports import (
    SUFFIX,
    check_use_ema,
    ema_pairs,
    export_record,
    json_path,
    pick_weights,
    write_export,
)
from gencli.io import clean_leftovers, discard, restore_model, temp_name, write_json
from gencli.jobs.common import run_job
from gencli.provenance import environment

log = logging.getLogger(__name__)
FORMATS = ("safetensors", "diffusers")


def export(cfg: DictConfig) -> Path:
    if not cfg.get("ckpt"):
        raise ConfigError("gencli export needs ckpt=PATH, the .ckpt file a 'gencli train' run wrote.")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format} is not an export format; use safetensors (weights + JSON config, "
                          "read back by gencli sample/eval) or diffusers (a DDPMPipeline folder, pixel-space DDPM only).")
    targets = output_paths(cfg)
    model, checkpoint = restore_model(cfg.ckpt)  # the safe loader: the file's config must build the model
    family = type(model).__name__
    if "export" in checkpoint:  # re-exporting an export: it holds one set of weights already
        check_use_ema(model, cfg.use_ema)
        tensors, weights = dict(checkpoint["state_dict"]), checkpoint["export"]["weights"]
        pairs = checkpoint["export"].get("ema_modules", {})
    else:
        tensors, weights = pick_weights(checkpoint["state_dict"], cfg.use_ema, family)
        pairs = ema_pairs(checkpoint["state_dict"])
    record = export_record(checkpoint, weights, pairs, source=str(cfg.ckpt))
    if cfg.format == "safetensors":
        written = list(write_export(tensors, record, targets[0]))
    else:
        written = [write_diffusers(model, tensors, record, targets[0])]
    summary = {"ckpt": str(cfg.ckpt), "format": cfg.format, "family": family, "weights": weights,
               "files": [str(p) for p in written], "tensors": len(tensors),
               "parameters": int(sum(t.numel() for t in tensors.values())), **environment()}
    write_json(Path(cfg.paths.output_dir) / "export.json", summary)
    log.info("exported the %s weights of %s (%d tensors, %d parameters) as %s: %s", weights, family, len(tensors),
             summary["parameters"], cfg.format, ", ".join(map(str, written)))
    return written[0]


def output_paths(cfg: DictConfig) -> list[Path]:
    """Where the export goes (``out=``, else the run folder), refusing to replace one unless ``overwrite=true``."""
    run_dir = Path(cfg.paths.output_dir)
    if cfg.format == "safetensors":
        weights = Path(str(cfg.out)).expanduser() if cfg.get("out") else run_dir / f"model{SUFFIX}"
        if weights.suffix != SUFFIX:
            raise ConfigError(f"out={cfg.out}: format=safetensors writes a file named NAME{SUFFIX} (its config goes "
                              f"beside it as NAME.json); give e.g. out={weights.with_suffix(SUFFIX)}.")
        targets = [weights, json_path(weights)]
    else:
        targets = [Path(str(cfg.out)).expanduser() if cfg.get("out") else run_dir / "diffusers"]
    if targets[0].parent.resolve() != run_dir.resolve():  # out= elsewhere: what a stopped export left there goes
        clean_leftovers(targets[0].parent, legacy=False)
    existing = [p for p in targets if p.exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"{existing[0]} already exists; gencli export does not replace an export unless told: add "
                          "overwrite=true, or choose another out=.")
    if existing and targets[0].exists() and targets[0].is_dir() != (cfg.format == "diffusers"):
        raise ConfigError(f"out={targets[0]} is a {'folder' if targets[0].is_dir() else 'file'}, but format={cfg.format} "
                          f"writes a {'folder' if cfg.format == 'diffusers' else 'file'}; choose another out=.")
    return targets


def write_diffusers(model, tensors: dict, record: dict, folder: Path) -> Path:
    """The DDPMPipeline folder, built under a temporary name beside ``folder`` and renamed into place whole."""
    from safetensors.torch import save_file

    from gencli.diffusers_export import (
        check_mappable,
        model_index,
        scheduler_config,
        unet_config,
        unet_state_dict,
    )

    check_mappable(model)
    net_state = {key[len("net."):]: value for key, value in tensors.items() if key.startswith("net.")}
    unet = unet_state_dict(model.net, net_state)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # temp names carry this process (gencli.io.temp_name): a stopped export's are removed by the next run
    temp = folder.with_name(temp_name(folder.name))
    old = folder.with_name(temp_name(f"{folder.name}.old"))
    try:
        (temp / "unet").mkdir(parents=True)
        (temp / "scheduler").mkdir()
        save_file(unet, temp / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        write_json(temp / "unet" / "config.json", unet_config(model.net))
        write_json(temp / "scheduler" / "scheduler_config.json", scheduler_config(model))
        write_json(temp / "model_index.json", model_index())
        # provenance (diffusers ignores it): the gencli config and which weights these are
        write_json(temp / "gencli_export.json", record)
        if folder.exists():  # overwrite=true (checked before): swap, then delete the previous export
            os.replace(folder, old)
        os.replace(temp, folder)
    except BaseException:  # (a signal too): the unfinished folder goes, the previous export comes back
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        discard(temp, folder)
        raise
    discard(old, unfinished=False)
    return folder


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> Path:
    return run_job(export, cfg)


if __name__ == "__main__":
    main()
