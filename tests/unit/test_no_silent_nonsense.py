"""Values that used to be taken silently as something else: each is the right answer or one paragraph.

``gencli eval n=-5`` meant "all images"; labels -1 or 10**12 in a samples .npz scored as wrong classes (class
accuracy 0); ``trainer.max_epochs=0`` trained nothing and reported ``completed``; ``truncation=-1`` and
``nrow=0`` were told "must be a number/integer or null" although they are numbers. (FID of identical sets is in
test_metric_maths.py, the schema's messages in test_schema.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import gencli_in_process
from gencli.errors import ConfigError
from gencli.metrics.sources import FileSource


def run(argv: list[str], cwd) -> tuple[int, str]:
    """``gencli ARGV`` in-process through the real entry point: (exit code, stderr)."""
    return gencli_in_process(argv, cwd)


def paragraph(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return " ".join(stderr.split("gencli error: ", 1)[1].split())


def digits_npz(path, labels) -> str:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[: len(labels)] * 16).clip(0, 255).astype(np.uint8)
    np.savez(path, images=images, labels=np.asarray(labels))
    return str(path)


@pytest.mark.parametrize("labels, index, value", [
    ([0, 1, -1, 3], 2, -1), ([0, 10**12, 2, 3], 1, 10**12), ([0, 1, 2, 10], 3, 10)])
def test_labels_outside_the_classes_are_refused_naming_file_value_index_and_range(tmp_path, labels, index, value):
    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.array(labels))
    source = FileSource(str(path), (1, 8, 8))  # reading is fine: the range is checked where labels are used
    with pytest.raises(ConfigError) as caught:
        source.check_labels(10, "data=digits")
    message = caught.value.message
    assert f"samples={path} holds the class label {value} at index {index}" in message, message
    assert "0..9, the 10 classes of data=digits" in message
    if value == -1:  # negative is wrong whatever the classes
        with pytest.raises(ConfigError, match="never negative"):
            source.check_labels(None, "")
    source.labels = np.array([0, 9, 3, 4])
    source.check_labels(10, "data=digits")  # valid labels pass


@pytest.mark.parametrize("labels, says", [
    (np.zeros(4), "holds 'labels' of type float64 (e.g. 0.0, 0.0, 0.0, ...), not integers; expected one integer class"),
    (np.zeros(3, np.int64), "holds 3 labels beside 4 images; expected one integer class per image"),
    (np.zeros((4, 2), np.int64), "holds 'labels' of shape (4, 2), not a 1-d array of 4"),
])
def test_labels_of_the_wrong_kind_are_refused(tmp_path, labels, says):
    path = tmp_path / "s.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=labels)
    with pytest.raises(ConfigError) as caught:
        FileSource(str(path), (1, 8, 8))
    assert says in caught.value.message, caught.value.message


@pytest.mark.slow
@pytest.mark.parametrize("bad", [-1, 10**12])
def test_eval_refuses_samples_with_labels_outside_the_classes(tmp_path, bad):
    """End to end: the class metrics would have scored these images as wrong (class accuracy 0); now exit 2 before
    any classifier is trained or reference computed."""
    labels = [i % 10 for i in range(40)]
    labels[7] = bad
    samples = digits_npz(tmp_path / "bad.npz", labels)
    code, err = run(["eval", f"samples={samples}", "data=digits", "data.image_size=8", "metric=fid", "device=cpu",
                     f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert code == 2, err
    message = paragraph(err)
    assert f"samples={samples} holds the class label {bad} at index 7 (image 7)" in message, message
    assert "0..9, the 10 classes of data=digits" in message
    assert not (tmp_path / "cache").exists()  # refused before the domain classifier is trained


@pytest.mark.parametrize("verb, override, says", [
    ("eval", "n=-5", "n=-5 is not valid: n must be >= 0"),
    ("sample", "truncation=-1", "truncation=-1 is not valid: truncation must be > 0 and <= 1, or null"),
    ("sample", "nrow=0", "nrow=0 is not valid: nrow must be >= 1, or null"),
    ("train", "trainer.max_epochs=0", "trainer.max_epochs=0 is not valid: it must be >= 1, or -1, or null"),
    ("train", "trainer.max_steps=0", "trainer.max_steps=0 is not valid: it must be >= 1, or -1"),
])
def test_the_command_line_refuses_values_that_meant_something_else(tmp_path, verb, override, says):
    ckpt = [f"ckpt={tmp_path / 'any.ckpt'}"] if verb != "train" else []
    code, err = run([verb, *ckpt, override], tmp_path)
    assert code == 2, err
    assert says in paragraph(err)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.ckpt"))


def test_the_classes_labels_are_checked_against_come_from_classifier_checkpoint_and_data(tmp_path):
    """Whatever knows the classes bounds the labels: the domain classifier, a conditional checkpoint, data=; ref= files'
    labels are checked too (intra-FID compares classes), and with nothing known a negative label is still refused."""
    from types import SimpleNamespace

    from gencli.metrics.sample_metrics import check_file_labels, label_classes

    class Extractor:
        name = "domain"

        def num_classes(self):
            return 4

    ctx = SimpleNamespace(model=SimpleNamespace(conditional=True, num_classes=6), ckpt="c.ckpt",
                          datamodule=SimpleNamespace(name="digits", classes=lambda: list("0123456789")))
    assert label_classes(ctx, Extractor()) == [(4, "the domain classifier (features=domain)"), (6, "ckpt=c.ckpt"),
                                               (10, "data=digits")]
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 2, 3]))
    np.savez(tmp_path / "r.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 5, 3]))
    samples, ref = FileSource(str(tmp_path / "s.npz"), (1, 8, 8)), FileSource(str(tmp_path / "r.npz"), (1, 8, 8),
                                                                                key="ref")
    real = SimpleNamespace(source=ref)
    check_file_labels(ctx, real, samples)  # 5 < 6 and < 10: fine for the checkpoint and the data
    with pytest.raises(ConfigError, match=r"ref=.*r.npz holds the class label 5 at index 2 .*the real images' classes "
                                          r"and must hold 0..3, the 4 classes of the domain classifier"):
        check_file_labels(ctx, real, samples, Extractor())
    nothing = SimpleNamespace(model=None, ckpt=None, datamodule=None)
    samples.labels = np.array([0, -3, 1, 1])
    with pytest.raises(ConfigError, match=r"class label -3 at index 1 .*never negative"):
        check_file_labels(nothing, SimpleNamespace(), samples)
