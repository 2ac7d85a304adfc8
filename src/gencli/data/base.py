"""ImageDataModule: the one base class every data set shares.

A subclass only says how to read its images: :meth:`load_images` returns a uint8 tensor (N, C, H, W)
already at ``image_size`` and the integer labels (or -1 where there are none). The base class holds
them in memory (the data sets gencli targets fit easily: CIFAR-10 is 184 MB as uint8), makes the
deterministic train/val split from ``seed``, and serves [-1, 1] float batches, with random
horizontal flips on the training split when ``random_flip`` is on.

``on_device`` (``hardware.data_on_device``) keeps a split's uint8 images on the training device instead: its
loader then yields only :class:`IndexBatch` es (which images, which flips, their labels: the same sampler, so the
same order, DDP shards and mid-epoch resume), and :meth:`ImageDataModule.on_after_batch_transfer` gathers, flips
and converts the images where Lightning moved the batch, giving bitwise the batch the CPU path gives.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gencli.errors import ConfigError

log = logging.getLogger(__name__)


class UInt8ImageDataset(Dataset):
    """In-memory uint8 images -> ([-1, 1] float image, label).

    ``images`` is a uint8 tensor, or anything indexed like one (``data=folder``'s lazy
    :class:`~gencli.data.folder.FolderImages`, which decodes the files it is asked for).

    Indexed by ``i`` or by ``(i, flip)``: the training loader's :class:`EpochSampler` decides the flips, so
    they do not depend on the global random state (or on which worker process decodes the image).
    """

    def __init__(self, images: Tensor, labels: Tensor, random_flip: bool = False):
        self.images, self.labels, self.random_flip = images, labels, random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, bool]):
        if isinstance(item, tuple):
            i, flip = item
        else:
            i, flip = item, self.random_flip and bool(torch.rand(()) < 0.5)
        x = self.images[i].float() / 127.5 - 1
        if flip:
            x = x.flip(-1)
        return x, self.labels[i]

    def __getitems__(self, items: list) -> tuple[Tensor, Tensor]:
        """A whole batch in one indexing and one conversion (the DataLoader calls this instead of __getitem__ per
        image; :func:`already_batched` is its collate): per-image conversion and stacking cost ~2 ms per batch of
        64, a tenth of a small GAN's step on a CPU. Same pixels as __getitem__."""
        index, flips = index_and_flips(items, self.random_flip)
        x = self.images[index].float() / 127.5 - 1
        if flips.any():
            x[flips] = x[flips].flip(-1)
        return x, self.labels[index]


def index_and_flips(items: list, random_flip: bool) -> tuple[Tensor, Tensor]:
    """A loader's batch of sampler items as (int64 indices, bool flips): ``(i, flip)`` pairs from
    :class:`EpochSampler`, or plain indices (flipped at random when ``random_flip``, as ``__getitem__`` does)."""
    if items and isinstance(items[0], tuple):
        index = torch.tensor([i for i, _ in items], dtype=torch.long)
        flips = torch.tensor([bool(f) for _, f in items], dtype=torch.bool)
    else:
        index = torch.as_tensor(items, dtype=torch.long)
        flips = (torch.rand(len(index)) < 0.5) if random_flip else torch.zeros(len(index), dtype=torch.bool)
    return index, flips


#: ``v.float() / 127.5 - 1`` for every uint8 value v, computed on the CPU as :class:`UInt8ImageDataset` computes it.
#: The on-device path looks pixels up in this table instead of dividing there: CUDA divides a tensor by a scalar as a
#: multiplication by the scalar's reciprocal, which differs in the last bit for 111 of the 256 values.
UINT8_TO_UNIT = torch.arange(256, dtype=torch.uint8).float() / 127.5 - 1


class IndexBatch:
    """A batch before its images: which rows of a split (``index``), which to flip, and their labels.

    What an on-device loader yields (a few hundred bytes instead of the images). Lightning moves it with
    :meth:`to` (it moves any object that has one) and :meth:`ImageDataModule.on_after_batch_transfer` turns
    it into the ``(images, labels)`` batch on that device.
    """

    __slots__ = ("split", "index", "flip", "label")

    def __init__(self, split: str, index: Tensor, flip: Tensor, label: Tensor):
        self.split, self.index, self.flip, self.label = split, index, flip, label

    def to(self, device, non_blocking: bool = False) -> IndexBatch:
        non_blocking = non_blocking or torch.device(device).type == "cuda"
        moved = (t.to(device, non_blocking=non_blocking) for t in (self.index, self.flip, self.label))
        return IndexBatch(self.split, *moved)

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"IndexBatch({self.split!r}, {len(self)} images on {self.index.device})"


class IndexDataset(Dataset):
    """A split's loader items as :class:`IndexBatch` es, for a split whose images wait on the training device."""

    def __init__(self, dataset: UInt8ImageDataset, split: str):
        self.dataset, self.split, self.random_flip = dataset, split, dataset.random_flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> IndexBatch:
        return self.__getitems__([item])

    def __getitems__(self, items: list) -> IndexBatch:
        index, flips = index_and_flips(items, self.random_flip)
        return IndexBatch(self.split, index, flips, self.dataset.labels[index])


#: The values of ``data.on_device`` (``hardware.data_on_device``).
ON_DEVICE = ("false", "true", "auto")
#: ``auto`` keeps a split on a GPU when its uint8 images take less than this share of the GPU's memory.
AUTO_SHARE = 0.25


def on_device_choice(setting: str, device: torch.device | str, images, device_memory: int | None = None,
                     data_name: str = "images") -> tuple[bool, str | None]:
    """Whether a split's images go to ``device`` (the trainer's root device) under ``setting``, and, when ``auto``
    declines on a GPU, why (one sentence for the log; None otherwise).

    ``true`` keeps them there on any device (on a CPU: gathered in the main process), but needs an in-memory
    uint8 tensor: a lazy ``data=folder`` is a ConfigError. ``auto`` keeps them there only on a CUDA device, for
    an in-memory set under :data:`AUTO_SHARE` of ``device_memory`` (the GPU's total bytes).
    """
    setting = normalize_on_device(setting)
    if setting == "false":
        return False, None
    in_memory = isinstance(images, Tensor) and images.dtype == torch.uint8
    if setting == "true":
        if not in_memory:
            raise ConfigError(
                f"hardware.data_on_device=true keeps the training images on the training device, but data={data_name} "
                "is lazy (data.lazy=true): it decodes image files as batches need them, so there is no in-memory set "
                "to move there. Add data.lazy=false to decode the folder into memory at start-up (it can then live on "
                "the device), or use hardware.data_on_device=false (or auto) to keep decoding in the loader workers "
                "(hardware.num_workers), where data.cache_dir=DIR saves decoding every epoch."
            )
        return True, None
    if torch.device(device).type != "cuda":
        return False, None
    if not in_memory:
        return False, (f"data={data_name} is decoded lazily from its files (data.lazy=true); data.lazy=false would "
                       "hold it in memory")
    size = images.numel() * images.element_size()
    if not device_memory or size >= AUTO_SHARE * device_memory:
        memory = f"{device_memory / 2**30:.1f} GiB" if device_memory else "an unknown amount of memory"
        return False, (f"its {size / 2**20:.0f} MiB of uint8 images are not under a quarter of the GPU's {memory}")
    return True, None


def normalize_on_device(value) -> str:
    """``data.on_device`` as one of :data:`ON_DEVICE` (YAML reads false/true as booleans)."""
    text = str(value).lower()
    if text not in ON_DEVICE:
        raise ConfigError(f"data.on_device={value} is not known; use false, true or auto (hardware.data_on_device "
                          "sets it in training runs).")
    return text


def already_batched(batch):
    """The collate function of loaders over :class:`UInt8ImageDataset`: ``__getitems__`` already made the batch."""
    return batch


def batches_per_epoch(samples: int, batch_size: int, drop_last: bool) -> int:
    return samples // batch_size if drop_last else -(-samples // batch_size)


def mixed_seed(*values: int) -> int:
    """One 63-bit seed from several integers (numpy's SeedSequence mixing: (1, 0) and (0, 1) differ)."""
    import numpy as np

    state = np.random.SeedSequence([int(v) & (2**63 - 1) for v in values]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


class EpochSampler(DistributedSampler):
    """The training order: a permutation and the random flips of each epoch from (seed, epoch) alone.

    Nothing here reads the global random state, so the data order is the same whatever the model or the
    callbacks draw, and a resumed run can continue an epoch exactly where the interrupted one stopped:
    :meth:`resume_at` skips the batches already trained on, for the next pass only. Under DDP each rank
    takes its own shard (``order[rank::world_size]``, padded to equal length as DistributedSampler does);
    it is a DistributedSampler, so Lightning uses it as it is instead of wrapping it in another one.
    Yields ``(index, flip)`` for :class:`UInt8ImageDataset` (or, on_device, for :class:`IndexDataset`).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, random_flip: bool = False):
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=True, seed=seed, drop_last=False)
        self.random_flip = bool(random_flip)
        self.skip = 0

    def resume_at(self, epoch: int, samples_done: int) -> None:
        """Continue ``epoch`` after the first ``samples_done`` samples of this rank's shard."""
        self.set_epoch(epoch)
        self.skip = max(0, int(samples_done))

    def __iter__(self):
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch))
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator)
        flips = (torch.rand(n, generator=generator) < 0.5) if self.random_flip else torch.zeros(n, dtype=torch.bool)
        if self.total_size > n:  # pad so that every rank gets the same number of samples
            repeats = -(-self.total_size // n)
            order = order.repeat(repeats)[: self.total_size]
        shard = order[self.rank : self.total_size : self.num_replicas].tolist()
        skip, self.skip = self.skip, 0
        for i in shard[skip:]:
            yield i, bool(flips[i])


def resize_uint8(images: Tensor, size: int, policy: str = "resize") -> Tensor:
    """Resize uint8 NCHW images to ``size`` x ``size`` (bilinear, antialiased) under a crop policy.

    ``resize`` stretches to a square; ``center_crop`` scales the short side to ``size`` then crops the
    centre, keeping the aspect ratio.
    """
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    x = images.float()
    if policy == "center_crop" and h != w:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    elif policy in ("resize", "center_crop"):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        raise ConfigError(f"data.resize={policy!r} is not a resize policy; use resize or center_crop.")
    return x.round().clamp(0, 255).to(torch.uint8)


class ImageDataModule(L.LightningDataModule):
    """Base: subclasses implement :meth:`load_images`; everything else is shared."""

    #: Short name used in cache keys and provenance.
    name: str = "images"
    #: The class names, label i = class_names[i]; None: the images have no labels (see :meth:`classes`).
    class_names: list[str] | None = None

    def __init__(
        self,
        image_size: int,
        channels: int,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        random_flip: bool = False,
        max_images: int | None = None,
        on_device: bool | str = False,
        global_batch_size: int | None = None,
    ):
        super().__init__()
        if channels not in (1, 3):
            raise ConfigError(f"data.channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.1).")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be a positive integer.")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.batch_size = int(batch_size)
        if global_batch_size is not None and int(global_batch_size) < 1:
            raise ConfigError(f"data.global_batch_size={global_batch_size} must be a positive integer, or null.")
        #: the batch over all devices and accumulated micro-batches; when set, the train job derives batch_size
        #: from it (gencli.scaling)
        self.global_batch_size = None if global_batch_size is None else int(global_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.random_flip = bool(random_flip)
        self.max_images = max_images
        #: false | true | auto: keep the splits' uint8 images on the device a Lightning trainer trains on (see
        #: :meth:`on_after_batch_transfer`). It applies only to the loaders that trainer's loops ask for.
        self.on_device = normalize_on_device(on_device)
        self.train_set: UInt8ImageDataset | None = None
        self.val_set: UInt8ImageDataset | None = None
        #: (split, device) -> that split's uint8 images on that device; dropped at teardown.
        self._device_images: dict[tuple[str, str], Tensor] = {}
        self._device_tables: dict[str, Tensor] = {}
        self._on_device_said = False

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def classes(self) -> list[str] | None:
        """The class names (label i is ``classes()[i]``), known without decoding any image; None when the data
        has no labels. A conditional model learns its ``num_classes`` from this, as it learns its image shape."""
        return list(self.class_names) if self.class_names else None

    # ---- subclasses
    def load_images(self) -> tuple[Tensor, Tensor]:
        """Return (uint8 images (N, C, image_size, image_size), int64 labels (N,))."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Identity of the data for provenance and cache keys: everything that changes which images, or
        which pixels, the splits hold (max_images changes both splits; random_flip what a classifier
        trained on the train split sees)."""
        return {"name": self.name, "image_size": self.image_size, "channels": self.channels,
                "val_fraction": self.val_fraction, "seed": self.seed, "max_images": self.max_images,
                "random_flip": self.random_flip}

    # ---- shared
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_images()
        images = to_channels(images, self.channels)
        if self.max_images is not None:
            images, labels = images[: self.max_images], labels[: self.max_images]
        val_idx, train_idx = self.split_indices(len(images))
        self.train_set = UInt8ImageDataset(images[train_idx], labels[train_idx], self.random_flip)
        self.val_set = UInt8ImageDataset(images[val_idx], labels[val_idx])
        log.info("%s: %d train / %d val images of shape %s", self.name, len(train_idx), len(val_idx), self.image_shape)

    def split_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """(val, train) indices of ``n`` images: a permutation seeded by ``seed``, whose first
        ``round(n * val_fraction)`` (at least 1) are the val split. One rule for every data module (a lazy
        folder splits its file listing with it)."""
        n_val = max(1, round(n * self.val_fraction))
        if n - n_val < 1:
            raise ConfigError(f"data set has only {n} image(s): too few to split into train and val.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return order[:n_val], order[n_val:]

    def split(self, name: str) -> UInt8ImageDataset:
        self.setup()
        if name not in ("train", "val"):
            raise ConfigError(f"split={name!r} is not a split; use train or val.")
        return self.train_set if name == "train" else self.val_set

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler = EpochSampler(dataset, seed=self.seed, random_flip=dataset.random_flip) if shuffle else None
        indices_only = isinstance(dataset, IndexDataset)
        # An index loader only slices a few integers per batch: worker processes (and pinning) would cost more than
        # they save, so it runs in the main process whatever hardware.num_workers says.
        workers = 0 if indices_only else self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=self.pin_memory and not indices_only,
            persistent_workers=workers > 0,
            collate_fn=already_batched if isinstance(dataset, UInt8ImageDataset | IndexDataset) else None,
            drop_last=shuffle and len(dataset) > self.batch_size,
            # Worker seeds come from this generator, not the global random state the training step draws from.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        loader = self._loader(self._loader_set("train"), shuffle=True)
        self._continue_interrupted_epoch(loader.sampler)
        return loader

    def _continue_interrupted_epoch(self, sampler: EpochSampler) -> None:
        """When Lightning resumes mid-epoch (its loops are restored before it asks for this loader), start the
        epoch's order where the checkpoint left it, instead of Lightning's default: the epoch's first batches again."""
        trainer = getattr(self, "trainer", None)
        fit_loop = getattr(trainer, "fit_loop", None)
        if fit_loop is None or not fit_loop.restarting:
            return
        done = fit_loop.epoch_loop.batch_progress.current.processed
        # (A checkpoint from after the epoch's last batch: Lightning moves on to the next epoch by itself.)
        if 0 < done < batches_per_epoch(len(sampler), self.batch_size, drop_last=len(self.train_set) > self.batch_size):
            sampler.resume_at(trainer.current_epoch, done * self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._loader_set("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    # ---- on_device: the images wait on the training device, the loaders carry indices
    def _loader_set(self, split: str) -> Dataset:
        """What a split's loader reads: the images, or (on_device active for this request) only their indices."""
        dataset = self.train_set if split == "train" else self.val_set
        if not self._on_device_for(split, dataset):
            return dataset
        # Lightning's advice to give a loader without workers more of them is about loaders that read images
        warnings.filterwarnings("ignore", message=rf"The '{split}_dataloader' does not have many workers")
        return IndexDataset(dataset, split)

    def _on_device_for(self, split: str, dataset: UInt8ImageDataset) -> bool:
        """Whether the loader asked for now is one a Lightning trainer's own loop will move to its device: on_device
        is set, a trainer holds this module, and it is that trainer's train (or validation / sanity check) loop
        asking. Anyone else (``gencli sample``/``eval``, a callback that reads a val batch in the middle of
        training, anything after fit) gets the images, as without on_device."""
        trainer = self.trainer
        if self.on_device == "false" or trainer is None:
            return False
        asking = trainer.training if split == "train" else (trainer.validating or trainer.sanity_checking)
        if not asking:
            return False
        device = trainer.strategy.root_device
        memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        on, why_not = on_device_choice(self.on_device, device, dataset.images, memory, self.name)
        if not self._on_device_said and (on or why_not):
            self._on_device_said = True  # one line per run
            if on:
                log.info("data: the %s split's uint8 images are kept on %s (%.0f MiB; hardware.data_on_device=%s); "
                         "the loader carries indices only", split, device,
                         dataset.images.numel() * dataset.images.element_size() / 2**20, self.on_device)
            else:
                log.info("data: hardware.data_on_device=auto keeps the images in the loaders, not on %s: %s.",
                         device, why_not)
        return on

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Lightning's hook after it moved a batch to the device: an :class:`IndexBatch` becomes ``(images,
        labels)`` there (gathered from the split's uint8 copy on that device, flipped, converted); anything else
        passes unchanged. Bitwise the batch :class:`UInt8ImageDataset` gives: flipping uint8 pixels before the
        conversion is flipping the converted ones, and the conversion is a look-up in :data:`UINT8_TO_UNIT`."""
        if not isinstance(batch, IndexBatch):
            return batch
        return self.gather(batch)

    def gather(self, batch: IndexBatch) -> tuple[Tensor, Tensor]:
        device = batch.index.device
        key = (batch.split, str(device))
        images = self._device_images.get(key)
        if images is None:
            images = (self.train_set if batch.split == "train" else self.val_set).images
            images = self._device_images[key] = images.to(device)  # (same strides: the batches keep their layout)
        table = self._device_tables.get(str(device))
        if table is None:
            table = self._device_tables[str(device)] = UINT8_TO_UNIT.to(device)
        pixels = pixels_in = images[batch.index]
        if (self.train_set if batch.split == "train" else self.val_set).random_flip:
            # a select, not a masked assignment: no device-to-host sync to ask whether any image flips
            pixels = torch.where(batch.flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        x = table[pixels.int()]
        if x.stride() != pixels_in.stride():
            # the memory layout the CPU path's conversion keeps (a folder decoded to NHWC order stays so): convolutions
            # may choose their kernels by layout, and so change the numbers
            x = torch.empty_like(pixels_in, dtype=x.dtype).copy_(x)
        return x, batch.label

    def teardown(self, stage: str | None = None) -> None:
        """Hand the device copies back when the trainer is done (the host images stay for later loaders)."""
        self._device_images.clear()
        self._device_tables.clear()


def to_channels(images: Tensor, channels: int) -> Tensor:
    """Convert uint8 NCHW images between grayscale and RGB (ITU-R 601 luma for RGB -> gray)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ConfigError(f"cannot convert {c}-channel images to data.channels={channels}.")
