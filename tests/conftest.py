import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# tiny test models gain nothing from intra-op threads, and spare threads spin badly on a shared 2-core box
torch.set_num_threads(1)


def make_tiny_model(seed=0, in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=4, layers=2,
                    num_classes=10, head_dim=32, out_std=0.02):
    """A small TarFlow with non-zero proj_out weights, so every block is a non-trivial flow."""
    from tarflow import Model

    torch.manual_seed(seed)
    model = Model(in_channels, img_size, patch_size, channels, num_blocks, layers, num_classes=num_classes,
                  head_dim=head_dim)
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=out_std)
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session: small, no dashboard, never a stray cluster."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_u8():
    """300 held-out MNIST digits as uint8 (N, 28, 28, 1), and the same digits shifted 3 pixels right."""
    from fid_data import digits_and_shifted

    return digits_and_shifted()


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory, digits_u8):
    """Both as shard sets, as `tarflow-gs generate` writes them (shards of 70 and of 100)."""
    from fid_data import write_shards

    root = tmp_path_factory.mktemp("fid")
    images, shifted = digits_u8
    return write_shards(root / "a", images, 70), write_shards(root / "shifted", shifted, 100)
