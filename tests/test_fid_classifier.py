import pytest
import torch

from tarflow.classifier import accuracy, load_classifier
from tarflow.data import load_dataset


def test_shipped_classifier_accuracy_on_held_out_digits():
    test = load_dataset("mnist5k", split="test")
    assert accuracy(load_classifier("mnist5k"), test.images, test.labels) >= 0.95


def test_classifier_resizes_any_input_and_gives_64d_features():
    model = load_classifier()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert model(x).shape == (4, 10)
    assert model.features(x).shape == (4, 64)


def test_classifier_rejects_rgb_and_unknown_names():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        load_classifier()(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="available"):
        load_classifier("cifar")
