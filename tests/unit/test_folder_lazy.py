"""data=folder, lazy: a listing at set-up, decoding in the loader, an optional decoded-image cache on disk.

Every folder here is a few dozen tiny PNGs made by the test. The lazy loader must give exactly the eager loader's
pixels, labels and split; decode nothing at set-up beyond one probe image; name an unreadable file and serve the
next image in its place; and never trust a cache entry whose pixels do not match their stamp.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gencli.data import FolderDataModule
from gencli.data.folder import (
    FILLED,
    UNREADABLE,
    Decoder,
    FileTable,
    FolderImages,
    NoReadableImage,
    list_images,
    scan_images,
)
from gencli.errors import ConfigError, GencliError


def make_folder(root: Path, per_class: int = 8, classes=("cats", "dogs"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)  # odd sizes: crop and resize both work
            Image.fromarray(array).save(root / cls / f"{i:02d}.png")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


def quiet_setup(dm: FolderDataModule) -> FolderDataModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup()
    return dm


class CountingDecoder(Decoder):
    """A Decoder that counts its calls (set-up must not decode the folder)."""

    calls = 0

    def __call__(self, path):
        CountingDecoder.calls += 1
        return super().__call__(path)


# ----------------------------------------------------------------------------- listing
def test_scan_lists_the_same_files_in_the_same_order_as_sorted_rglob(tmp_path):
    root = tmp_path / "tree"
    for name in ("a/b.png", "a-b.png", "a/c/d.JPG", "A/e.jpeg", ".hidden/f.png", "g.txt", "h.png/not_an_image",
                 "z/.dot.webp", "noext"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(b"x")
    (root / "linked_file.png").symlink_to(outside / "o.png")  # followed, as rglob does
    (root / "linked_dir").symlink_to(outside)  # not descended into, as Python 3.11's rglob
    (root / "dangling.png").symlink_to(tmp_path / "missing.png")
    expected = sorted(p for p in root.rglob("*") if p.suffix.lower() in
                      {".png", ".jpg", ".jpeg", ".webp"} and p.is_file())
    assert list_images(root) == expected
    assert scan_images(root) == [p.relative_to(root).as_posix() for p in expected]
    assert "a/b.png" in scan_images(root) and scan_images(root).index("a/b.png") < scan_images(root).index("a-b.png")


def test_file_table_round_trips_odd_names():
    names = ["cats/0.png", "dögs/ü.png", "x/" + "long" * 50 + ".jpg", os.fsdecode(b"bad/\xff.png")]
    table = FileTable(names)
    assert len(table) == 4 and [table[i] for i in range(4)] == names
    assert len(FileTable([])) == 0


# ----------------------------------------------------------------------------- lazy = eager
@pytest.mark.parametrize("channels,resize,size", [(3, "center_crop", 8), (1, "resize", 6)])
def test_lazy_gives_the_eager_pixels_labels_and_split(folder, channels, resize, size):
    kwargs = dict(root=str(folder), image_size=size, channels=channels, resize=resize, val_fraction=0.25, seed=3)
    eager = quiet_setup(FolderDataModule(lazy=False, **kwargs))
    lazy = quiet_setup(FolderDataModule(lazy=True, **kwargs))
    assert lazy.classes() == eager.classes() == ["cats", "dogs"] and lazy.class_names == eager.class_names
    for name in ("train", "val"):
        a, b = eager.split(name), lazy.split(name)
        assert len(a) == len(b) and tuple(b.images.shape) == tuple(a.images.shape) == (len(a), channels, size, size)
        assert torch.equal(b.images[:], a.images) and torch.equal(b.labels, a.labels)
        assert torch.equal(b.images[3], a.images[3]) and torch.equal(b.images[torch.tensor([2, 0])], a.images[[2, 0]])
        assert torch.equal(torch.stack(list(b.images)), a.images)
    # The training loader serves the same batches (same sampler, same flips, same conversion).
    for dm in (eager, lazy):
        dm.random_flip = dm.train_set.random_flip = True
    batches = [[torch.cat([x for x, _ in dm.train_dataloader()])] for dm in (eager, lazy)]
    assert torch.equal(batches[0][0], batches[1][0])


def test_lazy_set_up_lists_files_and_decodes_one(folder, monkeypatch):
    dm = FolderDataModule(root=str(folder), image_size=8, val_fraction=0.25, max_images=10)
    CountingDecoder.calls = 0
    dm.decoder = CountingDecoder(8, 3, "center_crop")
    dm.setup()
    assert CountingDecoder.calls == 1  # the probe: a folder of non-images fails here, not in a worker
    assert len(dm.train_set) + len(dm.val_set) == 10  # max_images takes the first files of the listing
    dm.train_set.images[0:4]
    assert CountingDecoder.calls == 5
    assert dm.describe()["lazy"] is True


def test_a_folder_without_a_readable_image_fails_at_set_up(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"none of the 3 image files could be decoded") as err:
        FolderDataModule(root=str(tmp_path)).setup()
    assert "0.png is not a readable image" in err.value.message


# ----------------------------------------------------------------------------- unreadable files met lazily
def test_an_unreadable_file_is_named_once_and_the_next_image_serves_in_its_place(folder):
    dm = FolderDataModule(root=str(folder), image_size=8, val_fraction=0.25, seed=0)
    dm.setup()  # the first file is fine: no warning yet
    images = dm.train_set.images
    bad = 2
    path = images.path(bad)
    path.write_bytes(b"this is not a png any more")
    with pytest.warns(UserWarning, match="data=folder skipped an unreadable file") as record:
        got = images[bad]
    message = str(record[0].message)
    assert str(path) in message and "\n" not in message and "convert or remove" in message
    assert torch.equal(got, images[bad + 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per file and process
        batch = images[[bad, bad]]
    assert batch.shape[0] == 2
    # A whole loader epoch still yields full batches.
    dm.batch_size = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sizes = [len(x) for x, _ in dm.train_dataloader()]
    assert sum(sizes) == len(dm.train_set) // 4 * 4


def test_a_high_bit_depth_image_of_unknown_range_is_skipped_lazily_with_its_reason(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "3.tif")  # float: range unknown
    dm = FolderDataModule(root=str(tmp_path), image_size=8, channels=1, val_fraction=0.25)
    dm.setup()
    listing = FolderImages(tmp_path, dm.train_set.images.files, dm.decoder)  # the whole listing, in order
    with pytest.warns(UserWarning, match=r"3.tif is a floating-point image") as record:
        got = listing[3]
    assert "skipped an unreadable file" in str(record[0].message)
    assert torch.equal(got, listing[0])  # the next readable image, wrapping round to the first


def test_a_split_without_any_readable_file_is_one_paragraph_even_from_a_worker(tmp_path):
    make_folder(tmp_path, per_class=4, classes=("a",))
    dm = FolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0.25, num_workers=1)
    dm.setup()
    for position in range(len(dm.train_set)):
        dm.train_set.images.path(position).write_bytes(b"broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NoReadableImage) as err:
            next(iter(dm.train_dataloader()))
    message = err.value.message
    assert message.startswith("data=folder: none of the 3 image files of this split") and "Traceback" not in message
    assert isinstance(err.value, GencliError)


# ----------------------------------------------------------------------------- the disk cache
def cached(folder: Path, cache: Path, **kwargs) -> FolderDataModule:
    return quiet_setup(FolderDataModule(root=str(folder), cache_dir=str(cache), **{"image_size": 8, "val_fraction": 0.25,
                                                                                   **kwargs}))


def filled(dm: FolderDataModule) -> set[int]:
    """The listing indices whose cache entry is filled, read from the file."""
    return {int(i) for i in np.flatnonzero(np.load(dm.cache.folder / "stamps.npy", allow_pickle=False) & FILLED)}


def listing_indices(dataset) -> set[int]:
    return {int(i) for i in dataset.images.index}


def test_the_cache_is_filled_on_first_use_then_read_without_decoding(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    first = cached(folder, cache_dir)
    assert first.cache.folder.parent == cache_dir and (first.cache.folder / "manifest.json").is_file()
    assert filled(first) == {0}  # only the set-up probe, the first file of the listing
    reference = first.train_set.images[:]
    assert filled(first) == listing_indices(first.train_set) | {0}

    second = FolderDataModule(root=str(folder), image_size=8, val_fraction=0.25, cache_dir=str(cache_dir))
    second.decoder = CountingDecoder(8, 3, "center_crop")
    CountingDecoder.calls = 0
    second.setup()
    assert torch.equal(second.train_set.images[:], reference)
    assert CountingDecoder.calls == 0 and second.cache.folder == first.cache.folder
    second.val_set.images[:]
    assert CountingDecoder.calls == len(second.val_set) - (0 in listing_indices(second.val_set))
    # another image size, or a changed file, is another cache
    assert cached(folder, cache_dir, image_size=6).cache.folder != first.cache.folder
    path = folder / "cats" / "00.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert cached(folder, cache_dir).cache.folder != first.cache.folder


def test_a_half_written_or_damaged_cache_entry_is_decoded_again(folder, tmp_path):
    dm = cached(folder, tmp_path / "cache")
    images = dm.train_set.images
    expected = images[:]
    cache = dm.cache
    i, j = int(images.index[0]), int(images.index[1])
    # pixels written but the run killed before the stamp (0), and a stamp whose pixels were lost (power cut)
    cache._stamps[i] = 0
    cache._images[j] = 0
    cache._images.flush()
    cache._stamps.flush()
    fresh = cached(folder, tmp_path / "cache")
    assert fresh.cache.get(i) is None and fresh.cache.get(j) is None
    assert torch.equal(fresh.train_set.images[:], expected)
    assert fresh.cache.get(i) is not None and fresh.cache.get(j) is not None


def test_a_cache_file_that_is_not_plain_pixels_is_rebuilt_without_unpickling(folder, tmp_path):
    dm = cached(folder, tmp_path / "cache")
    target = dm.cache.folder / "images.npy"
    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    np.save(target, np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.warns(UserWarning, match=r"is unreadable .* it is rebuilt"):
        again = FolderDataModule(root=str(folder), image_size=8, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
        again.setup()
    assert not ran.exists()
    assert torch.equal(again.train_set.images[:], dm.train_set.images[:])
    # a cache of the wrong shape (e.g. written by hand) is rebuilt too
    np.save(again.cache.folder / "stamps.npy", np.zeros(3, dtype=np.uint32))
    with pytest.warns(UserWarning, match="wrong kind"):
        FolderDataModule(root=str(folder), image_size=8, val_fraction=0.25, cache_dir=str(tmp_path / "cache")).setup()


def test_loader_workers_fill_one_cache_together(folder, tmp_path):
    dm = FolderDataModule(root=str(folder), image_size=8, val_fraction=0.25, cache_dir=str(tmp_path / "cache"),
                          num_workers=2, batch_size=3)
    dm.setup()
    served = torch.cat([x for x, _ in dm.train_dataloader()])
    assert len(served) == len(dm.train_set) == 12  # 4 full batches from 2 worker processes
    assert filled(dm) == listing_indices(dm.train_set) | {0}
    decode = Decoder(8, 3, "center_crop")
    for i in filled(dm):  # what the workers wrote is the decoded pixels
        assert np.array_equal(dm.cache.get(i), decode(folder / dm.train_set.images.files[i]))


def test_a_cache_remembers_unreadable_files_and_set_up_counts_them(folder, tmp_path):
    bad = folder / "dogs" / "03.png"
    bad.write_bytes(b"broken")
    dm = cached(folder, tmp_path / "cache")
    images = dm.train_set.images
    position = next(p for p, i in enumerate(images.index) if images.files[int(i)] == "dogs/03.png")
    with pytest.warns(UserWarning, match="skipped an unreadable file"):
        images[position]
    index = int(images.index[position])
    assert dm.cache.is_unreadable(index) and np.load(dm.cache.folder / "stamps.npy")[index] == UNREADABLE
    again = FolderDataModule(root=str(folder), image_size=8, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="skips 1 of 16 file") as record:
        again.setup()
    assert str(bad) in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known from the cache: no second warning, no decoding attempt
        assert torch.equal(again.train_set.images[position], images[position])


def test_images_pickle_without_the_memory_maps(folder, tmp_path):
    """A loader worker started by spawn receives the dataset pickled: the file table and the cache's path, not a copy
    of the cached pixels, and it maps the cache itself."""
    dm = cached(folder, tmp_path / "cache")
    dm.train_set.images[:]
    clone = pickle.loads(pickle.dumps(dm.train_set))
    assert clone.images.cache._images is None
    assert torch.equal(clone.images[:], dm.train_set.images[:]) and torch.equal(clone.labels, dm.train_set.labels)
    assert len(pickle.dumps(dm.train_set.images)) < 4096


# ----------------------------------------------------------------------------- options
def test_options_are_checked(folder, tmp_path, compose_cfg):
    with pytest.raises(ConfigError, match=r"data.lazy='yes' is not true or false"):
        FolderDataModule(root=str(folder), lazy="yes")
    with pytest.raises(ConfigError, match="data.cache_dir=.* with data.lazy=false"):
        FolderDataModule(root=str(folder), lazy=False, cache_dir=str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="data.cache_dir=.* cannot be created"):
        FolderDataModule(root=str(folder), cache_dir=str(blocker / "sub")).setup()
    cfg = compose_cfg("train", ["data=folder", f"data.root={folder}"])
    assert cfg.data.lazy is True and cfg.data.cache_dir is None
    from gencli.schema import validate

    with pytest.raises(ConfigError, match="data.lazy"):
        validate(compose_cfg("train", ["data=folder", f"data.root={folder}", "data.lazy=sometimes"]), "train")


def test_a_cache_that_does_not_fit_is_one_paragraph_at_set_up(folder, tmp_path, monkeypatch):
    """The cache's blocks are reserved when it is created: a full disk is a ConfigError then, not a SIGBUS in a
    loader worker writing into a sparse file later; and no half-made cache folder is left behind."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ConfigError, match=r"cannot hold the decoded-image cache of 16 images .* No space left") as err:
        FolderDataModule(root=str(folder), image_size=8, cache_dir=str(tmp_path / "cache")).setup()
    assert "data.cache_dir=null" in err.value.message
    assert list((tmp_path / "cache").iterdir()) == []
