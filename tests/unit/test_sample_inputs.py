"""``input=`` of the editing modes: an .npz's labels must be classes the conditional model has."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from gencli.errors import ConfigError
from gencli.jobs.sample import load_inputs


def model(conditional: bool) -> SimpleNamespace:
    return SimpleNamespace(conditional=conditional, num_classes=3 if conditional else None, image_shape=(1, 8, 8))


def inputs(tmp_path, labels) -> str:
    path = tmp_path / "in.npz"
    np.savez(path, images=np.zeros((4, 8, 8), dtype=np.uint8), labels=np.asarray(labels))
    return str(path)


@pytest.mark.parametrize("labels,bad,index", [([0, 1, -1, 2], -1, 2), ([0, 3, 1, 2], 3, 1)])
def test_labels_outside_the_models_classes_are_refused(tmp_path, labels, bad, index):
    cfg = OmegaConf.create({"input": inputs(tmp_path, labels), "n": 4, "ckpt": "run/last.ckpt"})
    with pytest.raises(ConfigError) as err:
        load_inputs(cfg, model(True), {})
    text = str(err.value)
    assert f"holds the class label {bad} at index {index}" in text and "0..2, the 3 classes of ckpt=run/last.ckpt" in text
    assert "the class of each input image" in text


def test_good_labels_are_kept_and_an_unconditional_model_ignores_them(tmp_path):
    cfg = OmegaConf.create({"input": inputs(tmp_path, [2, 0, 1, 2]), "n": 4, "ckpt": "x.ckpt"})
    images, labels = load_inputs(cfg, model(True), {})
    assert images.shape == (4, 1, 8, 8) and labels.tolist() == [2, 0, 1, 2]
    cfg = OmegaConf.create({"input": inputs(tmp_path, [-1, 0, 1, 9]), "n": 4, "ckpt": "x.ckpt"})
    assert load_inputs(cfg, model(False), {})[1].tolist() == [-1, 0, 1, 9]
