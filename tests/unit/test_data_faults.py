"""Data and cache faults: high-bit-depth images, truncated or corrupt data files, downloads and
unpacking in prepare_data(), and damaged cache entries. Every file a stranger hands gencli may be
broken: each case is one paragraph naming the file, or a warned cache miss, never a traceback and
never a silently wrong result."""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import blob_digits, write_idx
from gencli.data import CIFAR10DataModule, DigitsDataModule, FolderDataModule, MNISTDataModule
from gencli.data.folder import UnreadableImage, UnsupportedBitDepth, read_image_uint8
from gencli.errors import ConfigError, RuntimeFailure
from gencli.metrics.features import DomainFeatures
from gencli.metrics.reference import load_or_compute
from gencli.metrics.sources import FileSource

CPU = torch.device("cpu")
REPLACE = "replace it with the original download"


def one_paragraph(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ----------------------------------------------------------------------------- 1. high-bit-depth images
RAMP16 = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
RAMP16[0, :4] = (0, 255, 256, 65535)  # the edges of the high-byte bins


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (PIL cannot write 16-bit colour): gray, gray+alpha, RGB or RGBA."""
    h, w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("writer", ["pil", "bytes"])
def test_a_16bit_gray_png_ramp_scales_to_uint8(tmp_path, writer):
    path = tmp_path / "ramp.png"
    if writer == "pil":
        Image.fromarray(RAMP16).save(path)  # PIL mode I;16
    else:
        write_png16(path, RAMP16)
    expected = (RAMP16 >> 8).astype(np.uint8)
    assert expected[0, :4].tolist() == [0, 0, 1, 255]
    gray = read_image_uint8(path, 1)
    assert gray.dtype == np.uint8 and gray.shape == (16, 16, 1)
    np.testing.assert_array_equal(gray[..., 0], expected)
    np.testing.assert_array_equal(read_image_uint8(path, 3), np.repeat(expected[..., None], 3, axis=-1))
    np.testing.assert_array_equal(read_image_uint8(path), expected[..., None])  # gray files stay one channel


def test_a_16bit_ramp_loads_the_same_in_data_folder_and_eval_samples(tmp_path):
    expected = (RAMP16 >> 8).astype(np.uint8)
    folder = tmp_path / "ramps"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(RAMP16).save(folder / f"{i}.png")
    dm = FolderDataModule(root=str(folder), image_size=16, channels=1, val_fraction=0.25)
    dm.setup()
    for images in (dm.train_set.images, dm.val_set.images):
        assert images.dtype == torch.uint8
        for image in images:
            np.testing.assert_array_equal(image[0].numpy(), expected)

    source = FileSource(str(folder), (1, 16, 16))
    u8 = np.concatenate([batch for _, batch in source.stream(3)])
    np.testing.assert_array_equal(u8, np.broadcast_to(expected[None, ..., None], (4, 16, 16, 1)))


def test_16bit_rgb_and_gray_alpha_pngs(tmp_path):
    rgb16 = np.stack([RAMP16, RAMP16[::-1], RAMP16.T], axis=-1)
    path = write_png16(tmp_path / "rgb16.png", rgb16)
    np.testing.assert_array_equal(read_image_uint8(path, 3), (rgb16 >> 8).astype(np.uint8))
    gray_alpha = write_png16(tmp_path / "la16.png", np.stack([RAMP16, np.full_like(RAMP16, 65535)], axis=-1))
    np.testing.assert_array_equal(read_image_uint8(gray_alpha, 1)[..., 0], (RAMP16 >> 8).astype(np.uint8))
    # the same picture as 16-bit gray and as 16-bit RGB gives the same pixels (why gencli keeps the high byte)
    same = write_png16(tmp_path / "gray_as_rgb16.png", np.repeat(RAMP16[..., None], 3, axis=-1))
    np.testing.assert_array_equal(read_image_uint8(same, 1), read_image_uint8(write_png16(tmp_path / "g.png", RAMP16), 1))


def test_a_pgm_with_a_10bit_maxval_scales_to_the_full_range(tmp_path):
    path = tmp_path / "ten_bit.pgm"
    path.write_bytes(b"P5 3 1 1023\n" + np.array([0, 512, 1023], dtype=">u2").tobytes())
    assert read_image_uint8(path, 1)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "1", "L", "RGB"])
def test_8bit_modes_keep_working(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    img.save(path)
    with Image.open(path) as saved:
        want_rgb = np.asarray(saved.convert("RGB"))
        want_gray = np.asarray(saved.convert("L"))
    np.testing.assert_array_equal(read_image_uint8(path, 3), want_rgb)
    np.testing.assert_array_equal(read_image_uint8(path, 1)[..., 0], want_gray)


def save_tiff(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path, format="TIFF")
    return path


@pytest.mark.parametrize("array,needle", [
    (np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32), "floating-point image"),
    (np.array([[0, 70000], [5, 6]], dtype=np.int32), r"values 0\.\.70000"),
    (np.array([[-5, 3], [5, 6]], dtype=np.int32), r"values -5\.\.6"),
])
def test_images_of_unknown_range_are_refused_naming_the_file(tmp_path, array, needle):
    path = save_tiff(tmp_path / "deep.tif", array)
    with pytest.raises(UnsupportedBitDepth, match=needle) as err:
        read_image_uint8(path, 1)
    assert str(path) in str(err.value)


def test_data_folder_counts_unsupported_and_undecodable_files_with_their_reasons(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    deep = save_tiff(tmp_path / "float.tif", np.ones((8, 8), dtype=np.float32))
    png = io.BytesIO()
    Image.fromarray(RAMP16).save(png, format="PNG")
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    dm = FolderDataModule(root=str(tmp_path), image_size=8, channels=1, val_fraction=0.25, lazy=False)  # counted at set-up
    with pytest.warns(UserWarning) as record:
        dm.setup()
    message = str(record[0].message)
    assert "skipped 2 of 6 file(s)" in message
    assert "1 could not be decoded" in message and "truncated.png" in message
    assert "1 high-bit-depth image(s) of an unsupported kind" in message and str(deep) in message
    assert "floating-point" in message and "\n" not in message
    assert sorted(p.name for p in dm.skipped) == ["float.tif", "truncated.png"]
    assert len(dm.train_set) + len(dm.val_set) == 4


def test_eval_samples_refuses_an_unsupported_image_naming_it(tmp_path):
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "a.png")
    deep = save_tiff(tmp_path / "b.tif", np.ones((16, 16), dtype=np.float32))
    source = FileSource(str(tmp_path), (1, 16, 16))
    with pytest.raises(ConfigError, match="floating-point image") as err:
        list(source.stream(2))
    assert str(deep) in one_paragraph(err)
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UnreadableImage, match="c.png is not a readable image"):
        read_image_uint8(tmp_path / "c.png")


# ----------------------------------------------------------------------------- 2. truncated or corrupt data files
def mnist_files(root: Path, n: int = 12, compress: bool = True, labels=None, images=None):
    blob_images, blob_labels = blob_digits(n)
    image_file = write_idx(root / "t10k-images-idx3-ubyte", blob_images if images is None else images, compress)
    label_file = write_idx(root / "t10k-labels-idx1-ubyte", blob_labels if labels is None else labels, compress)
    return image_file, label_file


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("which", [0, 1])
def test_a_truncated_mnist_file_names_the_file_and_the_fix(tmp_path, compress, which):
    files = mnist_files(tmp_path, compress=compress)
    truncate(files[which])
    with pytest.raises(RuntimeFailure) as err:
        MNISTDataModule(root=str(tmp_path), source_split="test").setup()
    message = one_paragraph(err)
    assert str(files[which]) in message and REPLACE in message
    assert ("gzip" if compress else "truncated") in message


@pytest.mark.parametrize("content", [b"\x1f\x8b" + b"garbage" * 20, b"\x1f\x8b\x08\x00" + bytes(40),
                                     b"\x00\x00\x08\x03\x00\x00"])
def test_a_garbled_idx_file_is_a_runtime_failure(tmp_path, content):
    _, labels = mnist_files(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(content if content[:2] == b"\x1f\x8b" else gzip.compress(content))
    with pytest.raises(RuntimeFailure, match=REPLACE) as err:
        MNISTDataModule(root=str(tmp_path), source_split="test").setup()
    assert str(images) in one_paragraph(err)


def test_mnist_labels_out_of_range_or_miscounted_are_caught(tmp_path):
    _, labels_file = mnist_files(tmp_path, labels=np.array([0, 1, 10] + [2] * 9, dtype=np.uint8))
    with pytest.raises(RuntimeFailure, match=r"from 0 to 10, outside the classes 0\.\.9") as err:
        MNISTDataModule(root=str(tmp_path), source_split="test").setup()
    assert str(labels_file) in one_paragraph(err)
    mnist_files(tmp_path, labels=np.zeros(11, dtype=np.uint8))
    with pytest.raises(RuntimeFailure, match="holds 12 images but .* 11 labels"):
        MNISTDataModule(root=str(tmp_path), source_split="test").setup()
    images_file, _ = mnist_files(tmp_path, images=np.zeros((12, 28), dtype=np.uint8))
    with pytest.raises(RuntimeFailure, match=r"shape \(12, 28\).*not uint8 images") as err:
        MNISTDataModule(root=str(tmp_path), source_split="test").setup()
    assert str(images_file) in str(err.value)


def write_cifar_batch(path: Path, data, labels) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"batch_label": "test", "data": data, "labels": labels}))
    return path


@pytest.mark.parametrize("data,labels,needle", [
    (np.zeros((4, 3072), np.uint8), [0, 1, 2], "holds 4 images but 3 labels"),
    (np.zeros((4, 3072), np.uint8), [0, 1, 2, 10], r"from 0 to 10, outside the classes 0\.\.9"),
    (np.zeros((4, 3072), np.uint8), [0, 1, -1, 2], r"from -1 to 2"),
    (np.zeros((4, 3000), np.uint8), [0, 1, 2, 3], "one row of 3072 bytes"),
    (np.zeros((4, 3072), np.int64), [0, 1, 2, 3], "type int64"),
    (np.zeros((4, 3072), np.uint8), None, "not a list of integer class labels"),
])
def test_a_damaged_cifar_batch_names_the_file(tmp_path, data, labels, needle):
    batch = write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", data, labels)
    with pytest.raises(RuntimeFailure, match=needle) as err:
        CIFAR10DataModule(root=str(tmp_path), source_split="test").setup()
    assert str(batch) in one_paragraph(err)


def test_a_truncated_cifar_batch_names_the_file(tmp_path, cifar_root):
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.parent.mkdir()
    batch.write_bytes((cifar_root / "cifar-10-batches-py" / "test_batch").read_bytes())
    truncate(batch)
    with pytest.raises(RuntimeFailure, match="cifar-10-python.tar.gz") as err:
        CIFAR10DataModule(root=str(tmp_path), source_split="test").setup()
    assert str(batch) in one_paragraph(err)


# ----------------------------------------------------------------------------- 3. prepare_data
def pack_cifar(cifar_root: Path, archive: Path, extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for name, payload in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive


def with_mock_trainer(dm):
    dm.trainer = mock.Mock(name="trainer")  # what Trainer.fit attaches before calling prepare_data / setup
    return dm


def test_the_cifar_archive_is_unpacked_in_prepare_data_not_in_setup(tmp_path, cifar_root):
    archive = pack_cifar(cifar_root, tmp_path / "cifar-10-python.tar.gz")
    batches = tmp_path / "cifar-10-batches-py"
    dm = with_mock_trainer(CIFAR10DataModule(root=str(tmp_path), source_split="test"))
    with pytest.raises(RuntimeFailure, match="is not under data.root") as err:
        dm.setup()  # under a Trainer setup() only reads: prepare_data() has not run, nothing is unpacked
    assert "test_batch" in one_paragraph(err) and not batches.exists()
    dm.prepare_data()
    assert sorted(p.name for p in batches.iterdir()) == [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    assert (batches / "test_batch").read_bytes() == (cifar_root / "cifar-10-batches-py" / "test_batch").read_bytes()
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 16
    assert archive.is_file()


def test_without_a_trainer_setup_prepares_the_data_itself(tmp_path, cifar_root):
    pack_cifar(cifar_root, tmp_path / "cifar-10-python.tar.gz")
    dm = CIFAR10DataModule(root=str(tmp_path), source_split="train")
    assert dm.trainer is None
    assert len(dm.split("val")) == 8  # gencli sample / eval: no Trainer, split() -> setup() -> prepare_data()
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()


def test_the_archive_is_read_by_member_name_only(tmp_path, cifar_root):
    outside = tmp_path / "outside"
    root = tmp_path / "root"
    root.mkdir()
    pack_cifar(cifar_root, root / "cifar-10-python.tar.gz", extra={"../outside": b"x", "cifar-10-batches-py/../../outside2": b"x"})
    CIFAR10DataModule(root=str(root), source_split="test").prepare_data()
    assert not outside.exists() and not (tmp_path / "outside2").exists()
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_cifar_archive_is_one_paragraph_and_leaves_no_half_file(tmp_path, cifar_root, damage):
    archive = pack_cifar(cifar_root, tmp_path / "cifar-10-python.tar.gz")
    if damage == "truncate":
        truncate(archive)
    else:
        archive.write_bytes(b"\x1f\x8b" + b"not a tarball" * 50)
    dm = CIFAR10DataModule(root=str(tmp_path), source_split="test")
    with pytest.raises(RuntimeFailure, match="is truncated or corrupt.*download it again") as err:
        dm.prepare_data()
    assert str(archive) in one_paragraph(err)
    unpacked = tmp_path / "cifar-10-batches-py"
    for path in unpacked.iterdir() if unpacked.exists() else []:  # whatever was unpacked is whole
        assert not path.name.startswith(".")
        assert path.read_bytes() == (cifar_root / "cifar-10-batches-py" / path.name).read_bytes()


def test_an_archive_without_cifar_batches_is_refused(tmp_path):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-100-python/train")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(RuntimeFailure, match="holds none of the CIFAR-10 batches"):
        CIFAR10DataModule(root=str(tmp_path), source_split="test").prepare_data()


def test_downloads_happen_in_prepare_data(tmp_path, mnist_root, monkeypatch):
    calls = []

    def fake_fetch(self):
        calls.append(self.root)
        for f in mnist_root.glob("t10k-*"):
            (self.root / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(MNISTDataModule, "fetch", fake_fetch)
    dm = with_mock_trainer(MNISTDataModule(root=str(tmp_path), source_split="test", download=True))
    with pytest.raises(RuntimeFailure, match="data.download=true"):
        dm.setup()  # the offline message is unchanged, and setup() under a Trainer never downloads
    assert calls == []
    dm.prepare_data()
    dm.prepare_data()  # the files are there now: no second download
    assert calls == [tmp_path]
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 48


# ----------------------------------------------------------------------------- 4. cache faults
class TinyFeatures:
    """A cheap, deterministic extractor: 4x4 average-pooled pixels (16 features)."""

    name, feature_dim = "tiny", 16

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)

    def identity(self) -> dict:
        return {"name": self.name, "pool": 4}


def reference(cache: Path):
    return load_or_compute(DigitsDataModule(image_size=8, max_images=200), "val", TinyFeatures(), None, cache_dir=cache)


def resave_stats(path: Path, **change) -> None:
    with np.load(path) as stats:
        arrays = {name: stats[name] for name in stats.files}
    arrays.update(change)
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


REFERENCE_DAMAGE = {
    "stats truncated": lambda e: truncate(e / "stats.npz"),
    "stats garbage": lambda e: (e / "stats.npz").write_bytes(b"PK\x03\x04" + b"garbage" * 100),
    "stats empty": lambda e: (e / "stats.npz").write_bytes(b""),
    "array missing": lambda e: resave_stats(e / "stats.npz", features=None),
    "wrong shape": lambda e: resave_stats(e / "stats.npz", outer_sum=np.zeros((16, 15))),
    "wrong dtype": lambda e: resave_stats(e / "stats.npz", features=np.zeros((20, 16), np.float64)),
    "object array": lambda e: resave_stats(e / "stats.npz", n=np.array([None], dtype=object)),
    "manifest not json": lambda e: (e / "manifest.json").write_text('{"key": {"format": 1'),
    "manifest not an object": lambda e: (e / "manifest.json").write_text("[1, 2]"),
    "manifest binary": lambda e: (e / "manifest.json").write_bytes(b"\xff\xfe\x00garbage"),
}


@pytest.mark.parametrize("damage", list(REFERENCE_DAMAGE))
def test_a_damaged_reference_entry_is_a_warned_miss_then_a_hit(tmp_path, caplog, damage):
    first = reference(tmp_path)
    assert first.cache == "miss"
    entry = Path(first.path)
    REFERENCE_DAMAGE[damage](entry)
    with caplog.at_level(logging.WARNING, logger="gencli.metrics.reference"):
        again = reference(tmp_path)
    assert again.cache == "miss"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "recomputing" in warnings[0]
    np.testing.assert_array_equal(again.feature_sum, first.feature_sum)
    hit = reference(tmp_path)
    assert hit.cache == "hit" and hit.n == first.n == 20
    torch.testing.assert_close(hit.features, first.features, rtol=0, atol=0)


@pytest.fixture
def tiny_domain():
    def prepare(cache: Path) -> DomainFeatures:
        features = DomainFeatures(cache_dir=str(cache), epochs=1, feature_dim=8, width=8, batch_size=64,
                                  min_accuracy=0.0)
        features.prepare(DigitsDataModule(seed=0, image_size=8, max_images=200), CPU)
        return features

    return prepare


def corrupt_weights_keeping_the_sha(entry: Path) -> None:
    """Garbage whose sha256 the manifest agrees with: only torch.load can tell."""
    from gencli.metrics.domain import file_sha256

    (entry / "classifier.pt").write_bytes(b"PK\x03\x04" + b"garbage" * 100)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["weights_sha256"] = file_sha256(entry / "classifier.pt")
    (entry / "manifest.json").write_text(json.dumps(manifest))


def drop_manifest_field(entry: Path) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    del manifest["held_out_accuracy"]
    (entry / "manifest.json").write_text(json.dumps(manifest))


DOMAIN_DAMAGE = {
    "weights truncated": (lambda e: truncate(e / "classifier.pt"), "sha256 mismatch"),
    "weights garbage, sha agrees": (corrupt_weights_keeping_the_sha, "unreadable classifier.pt"),
    "manifest not json": (lambda e: truncate(e / "manifest.json"), "unreadable manifest.json"),
    "manifest field missing": (drop_manifest_field, "held_out_accuracy"),
}


@pytest.mark.parametrize("damage", list(DOMAIN_DAMAGE))
def test_a_damaged_domain_classifier_entry_is_a_warned_retrain_then_a_hit(tmp_path, caplog, tiny_domain, damage):
    first = tiny_domain(tmp_path)
    assert first.info["cache"] == "trained now"
    entry = Path(first.info["cache_entry"])
    corrupt, needle = DOMAIN_DAMAGE[damage]
    corrupt(entry)
    with caplog.at_level(logging.WARNING, logger="gencli.metrics.domain"):
        again = tiny_domain(tmp_path)
    assert again.info["cache"] == "trained now"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and needle in warnings[0]
    assert again.info["weights_sha256"] == first.info["weights_sha256"]  # seeded: the same classifier again
    hit = tiny_domain(tmp_path)
    assert hit.info["cache"] == "hit"
