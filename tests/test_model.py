import pytest
import torch

import reference_tarflow as ref
from conftest import make_tiny_model
from tarflow import CheckpointError, Model, load_checkpoint, model_hash, sample, save_checkpoint

# 8x8 grey images, patch 2: T=16 tokens of D=4; width 64 with the standard head dim 64.
T, D, C, BLOCKS, LAYERS, CLASSES = 16, 4, 64, 3, 2, 5


@pytest.fixture
def raw_pth(tmp_path):
    sd = ref.random_state_dict(T, D, C, BLOCKS, LAYERS, CLASSES)
    path = tmp_path / "raw.pth"
    torch.save(sd, path)
    return path, sd


def test_strict_load_of_reference_key_table(raw_pth):
    path, sd = raw_pth
    model = load_checkpoint(path, in_channels=1)
    cfg = model.config
    assert (cfg.in_channels, cfg.img_size, cfg.patch_size, cfg.channels) == (1, 8, 2, C)
    assert (cfg.num_blocks, cfg.layers_per_block, cfg.num_classes, cfg.nvp) == (BLOCKS, LAYERS, CLASSES, True)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for k in sd:
        assert torch.equal(loaded[k], sd[k]), k


def test_in_channels_resolves_patch_and_image_size(tmp_path):
    sd = ref.random_state_dict(64, 12, C, 2, 1, 0)  # D=12: 3 channels x 2x2 patches, 8x8 tokens
    torch.save(sd, tmp_path / "rgb.pth")
    cfg = load_checkpoint(tmp_path / "rgb.pth").config  # in_channels defaults to 3
    assert (cfg.in_channels, cfg.patch_size, cfg.img_size, cfg.num_classes) == (3, 2, 16, 0)
    with pytest.raises(CheckpointError, match="in_channels=5"):
        load_checkpoint(tmp_path / "rgb.pth", in_channels=5)


def test_encode_matches_reference_computation(raw_pth):
    path, sd = raw_pth
    model = load_checkpoint(path, in_channels=1)
    torch.manual_seed(1)
    x = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 4, 2])
    z, logdet = model.encode(x, y)
    z_ref, logdet_ref = ref.encode(sd, model.patchify(x), y, BLOCKS, LAYERS, 64)
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-6, rtol=1e-5)


def test_logdet_is_the_log_jacobian_determinant():
    model = make_tiny_model(num_blocks=2, out_std=0.05).double()
    x = torch.randn(1, 1, 8, 8, dtype=torch.double)
    y = torch.tensor([3])
    jac = torch.autograd.functional.jacobian(lambda v: model.encode(v.view(1, 1, 8, 8), y)[0].flatten(), x.flatten())
    _, logabsdet = torch.linalg.slogdet(jac)
    _, logdet = model.encode(x, y)
    # logdet is a per-dimension mean (as the reference), so scale by T*D
    assert logdet.item() * model.num_tokens * model.token_dim == pytest.approx(logabsdet.item(), rel=1e-9)


def test_sequential_sampling_matches_reference_and_inverts_encode(raw_pth):
    path, sd = raw_pth
    model = load_checkpoint(path, in_channels=1)
    noise = torch.randn(2, T, D, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 3])
    images, _, stats = sample(model, noise, y)
    expected = ref.sample(sd, noise, y, BLOCKS, LAYERS, 64)
    torch.testing.assert_close(model.patchify(images), expected, atol=1e-5, rtol=1e-5)
    z, _ = model.encode(images, y)
    torch.testing.assert_close(z, noise * model.var.sqrt(), atol=1e-4, rtol=1e-4)
    assert [b.block for b in stats.blocks] == [2, 1, 0]
    assert stats.passes == BLOCKS * (T - 1)


def test_project_format_round_trip(tmp_path):
    model = make_tiny_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors", provenance={"dataset": "digits", "epoch": 3})
    loaded, meta = load_checkpoint(path, with_metadata=True)
    assert loaded.config == model.config
    assert meta == {"dataset": "digits", "epoch": 3}
    assert model_hash(loaded) == model_hash(model)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.encode(x)[0], model.encode(x)[0])
    other = make_tiny_model(seed=1)
    assert model_hash(other) != model_hash(model)


def test_missing_and_corrupt_files_get_clear_errors(tmp_path, raw_pth):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    path = save_checkpoint(make_tiny_model(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    path, _ = raw_pth
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.pth", in_channels=1)


def test_mismatched_state_dict_names_the_key(tmp_path):
    sd = ref.random_state_dict(T, D, C, BLOCKS, LAYERS, CLASSES)
    bad = dict(sd)
    bad["blocks.1.attn_blocks.0.mlp.main.0.weight"] = torch.zeros(3 * C, C)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn_blocks\.0\.mlp\.main\.0\.weight.*\(192, 64\)"):
        load_checkpoint(tmp_path / "shape.pth", in_channels=1)
    missing = {k: v for k, v in sd.items() if k != "blocks.2.proj_in.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"lacks key 'blocks\.2\.proj_in\.bias'"):
        load_checkpoint(tmp_path / "missing.pth", in_channels=1)
    extra = {**sd, "blocks.0.extra": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'blocks\.0\.extra'"):
        load_checkpoint(tmp_path / "extra.pth", in_channels=1)


def test_model_rejects_inconsistent_config():
    with pytest.raises(ValueError, match="channels=96 is not a multiple of head_dim=64"):
        Model(1, 8, 2, 96, 2, 1)
    with pytest.raises(ValueError, match="img_size=9 is not a multiple of patch_size=2"):
        Model(1, 9, 2, 64, 2, 1)


def test_checkpoint_references_demo_paths_and_uris(tmp_path, monkeypatch):
    """`load_checkpoint` resolves every reference a command takes: demo, a path, file:// and fsspec URIs."""
    import fsspec

    import tarflow.checkpoint as checkpoint
    from tarflow import ModelRef, demo_checkpoint, model_hash, resolve_checkpoint

    monkeypatch.setattr(checkpoint, "CACHE_DIR", tmp_path / "cache")
    model = make_tiny_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert resolve_checkpoint("demo") == demo_checkpoint()
    assert model_hash(load_checkpoint(f"file://{path}")) == model_hash(model)
    with fsspec.open("memory://bucket/m.safetensors", "wb") as f:  # a remote store, in memory
        f.write(path.read_bytes())
    assert model_hash(ModelRef("memory://bucket/m.safetensors").load()) == model_hash(model)
    assert len(list((tmp_path / "cache").rglob("m.safetensors"))) == 1  # copied once, then read locally
    with pytest.raises(FileNotFoundError, match="checkpoint not found: memory://bucket/none.safetensors"):
        load_checkpoint("memory://bucket/none.safetensors")
    with pytest.raises(CheckpointError, match="in_channels=0"):
        ModelRef(str(path), in_channels=0)
