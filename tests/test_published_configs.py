"""Every published TarFlow checkpoint has a job config whose model, sampling and FID reference are the
published ones: the architecture is built at full size on the meta device and counted, and a
checkpoint in the published key layout loads strictly through `load_checkpoint`."""
import re
from pathlib import Path

import pytest
import torch

import reference_tarflow as ref
from tarflow import Model, ModelConfig, load_checkpoint
from workflows.config import RunConfig

CONFIGS = Path(__file__).parent.parent / "jobs" / "configs"
# name -> (file as published, image size, classes, parameters in millions, tokens, the paper's sampling
# settings: guidance scale, attn_temp, denoise multiplier; reference statistics as published)
PUBLISHED = {
    "afhq256": ("afhq_model_8_768_8_8_0.07.pth", 256, 3, 463.5, 1024, (3.4, 1.0, 1.4), "afhq_256_fid_stats.pth"),
    "imagenet64-uncond": ("imagenet64_model_2_768_8_8_0.05.pth", 64, 0, 460.1, 1024, (0.2, 0.3, 0.9),
                          "imagenet_64_fid_stats.pth"),
    "imagenet64": ("imagenet_model_4_1024_8_8_0.05.pth", 64, 1000, 817.6, 256, (2.0, 1.0, 1.0),
                   "imagenet_64_fid_stats.pth"),
    "imagenet128": ("imagenet_model_4_1024_8_8_0.15.pth", 128, 1000, 823.9, 1024, (1.5, 1.0, 0.97),
                    "imagenet_128_fid_stats.pth"),
}


def published_architecture(file_name: str, image_size: int, num_classes: int) -> ModelConfig:
    """The architecture a published name spells: <data>_model_<patch>_<channels>_<blocks>_<layers>_<noise>.pth."""
    found = re.search(r"_model_(\d+)_(\d+)_(\d+)_(\d+)_", file_name)
    patch, channels, blocks, layers = (int(v) for v in found.groups())
    return ModelConfig(3, image_size, patch, channels, blocks, layers, num_classes)


def test_the_shipped_configs_are_the_published_models_and_only_those():
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")} - {"demo", "nightly", "nightly-gpu"}
    assert shipped == set(PUBLISHED)


def test_the_gpu_nightly_measures_every_published_model():
    from workflows.config import NightlyConfig

    nightly = NightlyConfig.load(CONFIGS / "nightly-gpu.yaml", output="s3://bucket/nightly")
    assert sorted(Path(m.config).stem for m in nightly.models) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_builds_the_published_architecture(name):
    file_name, size, classes, millions, tokens, (scale, attn_temp, denoise), stats = PUBLISHED[name]
    cfg = RunConfig.load(CONFIGS / f"{name}.yaml")
    assert Path(cfg.model.checkpoint).name == file_name
    assert Path(cfg.fid.reference).name == stats and cfg.fid.extractor == "inception-v3-compat"
    guidance, noise = cfg.sampling.guidance, float(file_name.removesuffix(".pth").rsplit("_", 1)[1])
    assert (guidance.scale, guidance.annealed, guidance.attn_temp) == (scale, True, attn_temp)
    assert (cfg.sampling.denoise.multiplier, cfg.sampling.denoise.noise_std) == (denoise, noise)
    assert cfg.sampling.labels == ("uniform" if classes else "none")

    config = published_architecture(file_name, size, classes)
    with torch.device("meta"):
        model = Model.from_config(config)
    assert model.num_tokens == tokens
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_a_checkpoint_in_the_published_key_layout_loads_strictly(name, tmp_path):
    file_name, size, classes, *_ = PUBLISHED[name]
    config = published_architecture(file_name, size, classes)
    T, D = config.num_tokens, config.in_channels * config.patch_size ** 2
    # every tensor a broadcast of one value, so the file is small; loading materialises the full model
    mask = torch.tril(torch.ones(T, T))
    state = {k: mask if k.endswith("attn_mask") else torch.full((1,) * len(shape), 0.01 * (i % 7 + 1)).expand(shape)
             for i, (k, shape) in enumerate(ref.key_table(T, D, config.channels, config.num_blocks,
                                                          config.layers_per_block, classes).items())}
    path = tmp_path / file_name
    torch.save(state, path)
    assert path.stat().st_size < 16 * 2 ** 20
    model = load_checkpoint(path, in_channels=3)
    assert model.config == config
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k in ("var", "blocks.3.attn_blocks.5.mlp.main.0.weight", "blocks.7.proj_out.bias"):
        assert torch.equal(loaded[k], state[k]) and loaded[k].stride()[-1] == 1  # materialised, not a view
    del state["blocks.0.proj_in.bias"]
    torch.save(state, path)
    with pytest.raises(Exception, match="blocks.0.proj_in.bias"):
        load_checkpoint(path, in_channels=3)
