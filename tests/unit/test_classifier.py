"""The domain classifier's nets, its augmentation and how the training callbacks treat it."""

from __future__ import annotations

import pytest
import torch

from gencli.callbacks import SampleGrid
from gencli.errors import ConfigError
from gencli.families.classifier import Classifier, random_shift
from gencli.nets.classifier import ClassifierNet


@pytest.mark.parametrize("channels,size,arch", [(1, 8, "lenet"), (1, 32, "lenet"), (3, 32, "resnet"), (3, 16, "resnet"),
                                                (1, 64, "lenet")])
def test_nets_pick_the_architecture_and_give_features_and_logits(channels, size, arch):
    net = ClassifierNet(channels, size, num_classes=7)
    assert net.arch == arch
    x = torch.rand(3, channels, size, size) * 2 - 1
    features = net.features(x)
    assert features.shape == (3, net.feature_dim) and (features >= 0).all()  # post-ReLU, like Inception's pool3
    torch.testing.assert_close(net.head(features), net(x))
    assert net(x).shape == (3, 7)


def test_bad_net_settings_are_config_errors():
    with pytest.raises(ConfigError, match="arch='vgg'"):
        ClassifierNet(1, 16, arch="vgg")
    with pytest.raises(ConfigError, match="image size 10"):
        ClassifierNet(1, 10)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        ClassifierNet(1, 16, num_classes=1)


def test_random_shift_moves_whole_pixels_and_keeps_values():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    shifted = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert not torch.equal(shifted, x)
    for img, out in zip(x, shifted):
        # every output pixel is an input pixel of the same image (integer shifts, replicated borders)
        assert set(out.flatten().round().tolist()) <= set(img.flatten().tolist())
    assert torch.equal(random_shift(x, 0), x)


def test_labels_outside_the_classes_are_refused():
    module = Classifier(ClassifierNet(1, 16, num_classes=3), image_shape=(1, 16, 16))
    module.check_labels(torch.tensor([0, 2]))
    with pytest.raises(ConfigError, match="labels in 0..2.*-1 means an image without a class"):
        module.check_labels(torch.tensor([-1, 1]))


def test_sample_grid_leaves_a_classifier_alone(tmp_path):
    class Trainer:
        is_global_zero = True

    module = Classifier(ClassifierNet(1, 16), image_shape=(1, 16, 16))
    SampleGrid(dirpath=str(tmp_path)).write(Trainer(), module, "final")
    assert not list(tmp_path.iterdir())
