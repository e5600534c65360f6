"""Image sets the FID tests share: real MNIST digits, written as `tarflow-gs generate` writes shards."""
import numpy as np
import torch

from tarflow.data import load_dataset
from workflows.storage import shards as sh


def write_shards(uri, images_u8, shard_size):
    """A shard set as `tarflow-gs generate` writes it (workflows.shards), from uint8 (N, H, W, C) images."""
    n = len(images_u8)
    manifest = sh.Manifest(settings={}, num_samples=n, shard_size=shard_size)
    for index in range(manifest.num_shards):
        ids = np.asarray(manifest.shard_ids(index))
        table = sh.shard_table(ids, np.full(len(ids), -1), 0, [sh.encode_png(images_u8[i]) for i in ids],
                               [[1]] * len(ids), np.zeros(len(ids)), np.zeros(len(ids)))
        manifest.add(manifest.shard(index).write(str(uri), table, {}))
    sh.write_manifest(str(uri), manifest)
    return str(uri)


def digits_and_shifted(n=300):
    """n held-out MNIST digits as uint8 (N, 28, 28, 1), and the same digits shifted 3 pixels right."""
    images = sh.to_uint8(load_dataset("mnist5k", split="test").images[:n].numpy())
    shifted = np.zeros_like(images)
    shifted[:, :, 3:] = images[:, :, :-3]
    return images, shifted


class UInt8Images(torch.utils.data.Dataset):
    """The input torch-fidelity takes: uint8 (3, H, W) tensors."""

    def __init__(self, images_u8):
        self.images = torch.from_numpy(images_u8).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]
