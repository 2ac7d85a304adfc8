"""``gencli sample ckpt=PATH``: images from a checkpoint, with nothing but the checkpoint.

Modes: ``grid`` (n samples -> uint8 ``samples.npz`` and/or ``images/NNNNNN.png``, plus a PNG grid of the
first ``grid_n``), ``interpolate`` (slerp between prior draws, one strip per row), ``reconstruct``
(validation inputs beside their reconstructions), and the editing modes on ``input=`` images (the first n of
the validation split, a folder or an .npz): ``inpaint`` (fill ``mask=``; ``inpainted.npz`` and
``inpaint.png`` with input | mask | result per row) and ``variation`` (SDEdit at ``strength=``;
``variations.npz`` and ``variations.png`` with input | variation).

``hardware=`` (default: ``default``, plain float32) runs the sampling net as the profile says
(:mod:`gencli.sampling_hardware`: ``hardware=gpu_fast`` is bf16 autocast, TF32 matmuls, channels-last and a
compiled net); sample.json records what was applied (``sampling.hardware``) and where the time went
(``timing``: generation and its images/s, I/O; :mod:`gencli.metrics.timing`).

Image ``i`` depends only on (``seed``, ``i``): each image draws its noise from its own generator
(:mod:`gencli.seeds`), so ``batch_size`` changes speed and memory, not the images. ``grid`` streams:
each batch goes to the npz (:class:`gencli.io.NpzImageWriter`) and the PNG folder
(:class:`gencli.io.PngFolderWriter`) as it is made and only the grid's images are kept, so memory does
not grow with ``n``; both are renamed into place only once complete.

SIGTERM / Ctrl+C stop it at once (exit 143 / 130, :func:`gencli.jobs.common.run_job`): the unfinished npz and PNG
folder are discarded (renamed to trash, deleted at once or in the background: :func:`gencli.io.discard`), sample.json
(written last) is absent, job.json says ``interrupted``; the next gencli run there removes anything a killed run left.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gencli.config import CONF_DIR
from gencli.errors import ConfigError
from gencli.io import (
    NpzImageWriter,
    PngFolderWriter,
    auto_scale,
    restore_model,
    save_image_grid,
    save_npz,
    to_uint8,
    write_json,
)
from gencli.jobs.common import datamodule_for, pick_device, run_job, sample_options, sampling_settings
from gencli.labels import LabelPlan, plan_labels
from gencli.latents import slerp
from gencli.masks import describe as describe_mask
from gencli.masks import make_masks
from gencli.metrics.timing import TimeSplit, summary_line, timed, timing
from gencli.progress import track_batches
from gencli.provenance import environment
from gencli.sampling_hardware import sampling_hardware
from gencli.seeds import SEED_RULE, PerImageGenerator, check_seed

log = logging.getLogger(__name__)
MODES = ("grid", "interpolate", "reconstruct", "inpaint", "variation")
EDITS = ("inpaint", "variation")
#: format=: what grid mode writes for the n images.
FORMATS = {"npz": ("npz",), "png": ("png",), "both": ("npz", "png")}


def sample(cfg: DictConfig) -> Path:
    if not cfg.get("ckpt"):
        raise ConfigError("gencli sample needs ckpt=PATH, the .ckpt file a 'gencli train' run wrote.")
    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode} is not a sampling mode; use one of {', '.join(MODES)}.")
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ConfigError(f"n={cfg.n} and batch_size={cfg.batch_size} must be positive integers.")
    fmt, grid_n = cfg.get("format", "npz"), cfg.get("grid_n", 256)
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt} is not an output format; use npz (samples.npz), png (images/000000.png, "
                          "one file per image) or both.")
    if not isinstance(grid_n, int) or grid_n < 0:
        raise ConfigError(f"grid_n={grid_n} must be an integer >= 0: how many of the n images samples.png shows "
                          "(0: no grid).")
    seed = check_seed(cfg.seed)
    device = pick_device(cfg.device)
    split = TimeSplit(device)
    with timing(split), timed("setup"):  # loading the checkpoint, building the model, device start-up
        model, checkpoint = restore_model(cfg.ckpt)
        model = model.to(device)
    options = sample_options(cfg, model)
    settings, profile = sampling_settings(cfg, device)
    plan = plan_labels(cfg.get("labels"), model, per_row=cfg.nrow or 8)  # an unconditional model refuses labels=
    n = cfg.n
    if plan is not None and plan.kind == "all":  # one row per class
        n = plan.per_row * len(plan.labels)
        for label in plan.labels:
            log.info("row %d: class %d (%s)", label, label, plan.name(label))
    out = Path(cfg.paths.output_dir)
    scale = auto_scale(model.image_shape[-1])

    with timing(split), sampling_hardware(settings, model, device, options.get("use_ema"), profile) as hardware:
        if cfg.mode == "grid":
            written = sample_images(model, cfg, n, seed, options, plan, out, FORMATS[fmt], grid_n, scale)
        elif cfg.mode == "interpolate":
            with timed("generation", images=max(1, min(cfg.n, 16)) * cfg.interpolation_steps):
                strips = interpolate(model, cfg, seed, options, plan)
            with timed("io"):
                forget_completion(out)
                written = save_image_grid(out / "interpolation.png", strips, nrow=cfg.interpolation_steps, scale=scale)
        elif cfg.mode in EDITS:
            edit = edit_options(cfg, model)
            sampling = model.editing_info(cfg.mode, **options, **edit)  # bad settings fail before any work
            written = edit_images(model, cfg, checkpoint, seed, options, edit, plan, out, grid_n, scale)
        else:
            pairs = reconstruct(model, cfg, checkpoint)
            with timed("io"):
                forget_completion(out)
                written = save_image_grid(out / "reconstructions.png", pairs, nrow=16, scale=scale)

    if cfg.mode not in EDITS:
        sampling = model.sampling_info(mode="decode" if cfg.mode == "interpolate" else "sample", **options)
    sampling = {**sampling, "hardware": hardware}
    spent = split.report()
    log.info("%s", summary_line(spent))
    write_json(out / "sample.json", {
        "ckpt": str(cfg.ckpt), "mode": cfg.mode, "n": n, "seed": seed, "batch_size": cfg.batch_size,
        "format": fmt, "grid_n": grid_n, "seeding": SEED_RULE,
        **({"labels": plan.describe()} if plan is not None else {}),
        **({"input": str(cfg.input)} if cfg.mode in EDITS else {}),
        **({"mask": describe_mask(str(cfg.mask), model.image_shape[1:])} if cfg.mode == "inpaint" else {}),
        "sampling": sampling,
        # wall seconds (generation: the model making the images, io: reading and writing); sample.json itself aside
        "timing": spent,
        "files": sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not p.name.startswith(".")),
        **environment(),
    })
    log.info("wrote %s", written)
    return written


@torch.no_grad()
def sample_images(model, cfg: DictConfig, n: int, seed: int, options: dict, plan: LabelPlan | None, out: Path,
                  formats: tuple[str, ...], grid_n: int, scale: int) -> Path:
    """Make n images batch by batch, streaming each batch to the outputs; keep only the grid's first ``grid_n``.
    A conditional model's labels go into samples.npz beside the images (key ``labels``), for ``gencli eval samples=``."""
    c, h, w = model.image_shape
    grid_n = min(grid_n, n)
    kept: list[torch.Tensor] = []
    written: list[Path] = []
    labelled = {"labels": plan.labels_for(0, n).numpy()} if plan is not None else {}
    with contextlib.ExitStack() as outputs:  # on any error every writer drops its temp file/folder
        writers = []
        if "npz" in formats:
            writers.append(outputs.enter_context(NpzImageWriter(out / "samples.npz", n, (h, w, c))))
            writers[-1].extra.update(labelled)
        if "png" in formats:
            writers.append(outputs.enter_context(PngFolderWriter(out / "images", n, (h, w, c))))
        start = 0
        for b in track_batches(n, cfg.batch_size, "sampling"):
            labels = {"labels": plan.labels_for(start, b, model.device)} if plan is not None else {}
            with timed("generation", images=b):  # .cpu() waits for the device: the batch's whole work
                images = model.sample(b, generator=PerImageGenerator.for_range(seed, start, b), **labels,
                                      **options).cpu()
            with timed("io"):
                u8 = to_uint8(images)
                for writer in writers:
                    writer.write(u8)
            if start < grid_n:
                kept.append(images[: grid_n - start].clone())  # not a view that keeps the whole batch
            start += b
        with timed("io"):  # the writers' final rename into place
            forget_completion(out)
            outputs.close()
        written = [writer.path for writer in writers]
    if grid_n > 0:
        with timed("io"):
            written.insert(0, save_image_grid(out / "samples.png", torch.cat(kept), nrow=grid_columns(cfg, plan),
                                              scale=scale))
    if plan is not None and "png" in formats:  # the PNG folder's labels, by file name
        write_json(out / "labels.json", {"files": {f"{i:06d}.png": int(label) for i, label in
                                                   enumerate(labelled["labels"].tolist())},
                                         "class_names": list(plan.class_names)})
    return written[0]


def forget_completion(out: Path) -> None:
    """Remove an earlier run's sample.json before the first output of this one replaces anything in ``out`` (a fixed
    run_name): sample.json, written last, says the outputs beside it are complete, and a run stopped between two
    renames must not leave an old record describing a mix of old and new files."""
    (out / "sample.json").unlink(missing_ok=True)


def grid_columns(cfg: DictConfig, plan: LabelPlan | None) -> int | None:
    """Columns of samples.png: nrow=; for a conditional model, one column per class (balanced labels) or one row
    per class (labels=all)."""
    if cfg.nrow or plan is None:
        return cfg.nrow
    if plan.kind == "all":
        return plan.per_row
    return len(plan.labels) if plan.kind == "balanced" else None


@torch.no_grad()
def interpolate(model, cfg: DictConfig, seed: int, options: dict, plan: LabelPlan | None = None) -> torch.Tensor:
    """Row r slerps from the first to the second latent image r's generator draws: the first is the latent
    ``gencli sample`` (same seed) decodes for its image r (for a diffusion model, x_T). A conditional model holds
    row r's class fixed (image r's label), so only the latent moves."""
    if not model.has_latent:
        raise ConfigError(f"mode=interpolate needs a family with a latent prior; {type(model).__name__} has none.")
    rows = max(1, min(cfg.n, 16))
    generator = PerImageGenerator.for_range(seed, 0, rows)
    held = {"labels": plan.labels_for(0, rows, model.device)} if plan is not None else {}
    a, b = model.prior(rows, generator, **held), model.prior(rows, generator, **held)
    t = torch.linspace(0, 1, cfg.interpolation_steps, device=a.device)
    z = slerp(a, b, t).flatten(0, 1)
    labels = held["labels"].repeat_interleave(cfg.interpolation_steps) if held else None
    return torch.cat([model.decode(z[i: i + cfg.batch_size], **options,
                                   **({"labels": labels[i: i + cfg.batch_size]} if held else {})).cpu()
                      for i in range(0, len(z), cfg.batch_size)])


@torch.no_grad()
def reconstruct(model, cfg: DictConfig, checkpoint: dict) -> torch.Tensor:
    if not model.has_encoder:
        raise ConfigError(f"mode=reconstruct needs a family with an encoder (ae, vae); {type(model).__name__} has none.")
    data = datamodule_for(cfg, checkpoint, batch_size=min(cfg.n, 64), image_shape=model.image_shape)
    with timed("io"):
        x, y = next(iter(data.val_dataloader()))
        x = x[: min(cfg.n, 64)].to(model.device)
    own = {"labels": y[: len(x)].to(model.device)} if getattr(model, "conditional", False) else {}
    with timed("generation", images=len(x)):
        return torch.stack([x, model.reconstruct(x, **own)], 1).flatten(0, 1).cpu()


def edit_options(cfg: DictConfig, model) -> dict:
    """inpaint: the ``inpaint.*`` settings the family uses (diffusion: method and RePaint's jumps); variation: strength."""
    if cfg.mode == "variation":
        return {"strength": cfg.strength}
    settings = cfg.get("inpaint") or {}
    return {key: settings[key] for key in model.inpaint_options if key in settings}


def load_inputs(cfg: DictConfig, model, checkpoint: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first n images of ``input=`` and their labels where known: val (the checkpoint's validation split, or
    data=...'s), a folder or an .npz (with a ``labels`` array, as gencli sample writes for conditional models)."""
    if str(cfg.input) == "val":
        data = datamodule_for(cfg, checkpoint, batch_size=min(cfg.n, 256), image_shape=model.image_shape)
        batches, labels, have = [], [], 0
        for batch in data.val_dataloader():
            batches.append(batch[0][: cfg.n - have])
            labels.append(batch[1][: cfg.n - have])
            have += len(batches[-1])
            if have >= cfg.n:
                break
        images = torch.cat(batches)
        if len(images) < cfg.n:
            log.warning("input=val holds %d images; editing those, not n=%d", len(images), cfg.n)
        return images, torch.cat(labels)
    from gencli.metrics.sources import FileSource

    source = FileSource(str(cfg.input), model.image_shape, n=cfg.n, data_name="the model's data", key="input",
                        minimum=1)
    if model.conditional:  # a label no class has would silently fall back to the default class plan
        source.check_labels(model.num_classes, f"ckpt={cfg.ckpt}")
    return torch.cat([images for images, _ in source.stream(256)]), source.labels_for(0, source.n)


@torch.no_grad()
def edit_images(model, cfg: DictConfig, checkpoint: dict, seed: int, options: dict, edit: dict,
                plan: LabelPlan | None, out: Path, grid_n: int, scale: int) -> Path:
    """Inpaint or vary the inputs batch by batch; image i's noise (and random mask) depends on (seed, i) only.
    A conditional model edits each input toward its own class where it is known (input=val, or an .npz with
    labels) unless labels= asks for others."""
    with timed("io"):
        inputs, known = load_inputs(cfg, model, checkpoint)
    labels = None
    if plan is not None:
        use_known = known is not None and plan.kind == "balanced" and int(known.min()) >= 0
        labels = known if use_known else plan.labels_for(0, len(inputs))
    results, masks = [], []
    for start in range(0, len(inputs), cfg.batch_size):
        x = inputs[start: start + cfg.batch_size].to(model.device)
        generator = PerImageGenerator.for_range(seed, start, len(x))
        own = {"labels": labels[start: start + len(x)].to(model.device)} if labels is not None else {}
        with timed("generation", images=len(x)):
            if cfg.mode == "inpaint":
                mask = make_masks(str(cfg.mask), len(x), tuple(x.shape[-2:]), seed, start).to(x.device)
                results.append(model.inpaint(x, mask, generator, **own, **options, **edit).cpu())
                masks.append(mask.cpu())
            else:
                results.append(model.vary(x, edit["strength"], generator, **own, **options).cpu())
    result = torch.cat(results)
    name = "inpainted" if cfg.mode == "inpaint" else "variations"
    columns = [inputs, result]
    extra = {"inputs": to_uint8(inputs)}
    if cfg.mode == "inpaint":
        mask = torch.cat(masks)
        shown = (1 - 2 * mask).expand_as(inputs)  # white where filled, as mask files are drawn
        columns = [inputs, shown, result]
        extra["masks"] = to_uint8(shown[:, :1])  # 255 where filled
    if labels is not None:
        extra["labels"] = labels.numpy()
    rows = min(grid_n, len(inputs)) or len(inputs)
    grid = torch.stack([c[:rows] for c in columns], 1).flatten(0, 1)
    with timed("io"):
        forget_completion(out)
        save_npz(out / f"{name}.npz", to_uint8(result), **extra)
        return save_image_grid(out / ("inpaint.png" if cfg.mode == "inpaint" else "variations.png"), grid,
                               nrow=len(columns), scale=scale)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> Path:
    return run_job(sample, cfg)


if __name__ == "__main__":
    main()
