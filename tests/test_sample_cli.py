"""`tarflow-gs sample` writes a deterministic PNG grid; the shipped demo checkpoint loads and samples."""
import json

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import make_tiny_model
from tarflow import GSJacobi, Guidance, Plan, SamplingSpec, demo_checkpoint, load_checkpoint, sample_ids
from workflows.cli import main
from workflows.report.grid import save_grid


def run(*args):
    result = CliRunner().invoke(main, ["sample", *map(str, args)])
    return result


def test_sample_writes_a_deterministic_grid(tmp_path, tiny8x8_checkpoint_path_with_noise_std):
    ckpt = tiny8x8_checkpoint_path_with_noise_std
    common = ["--checkpoint", ckpt, "--num-samples", 6, "--labels", "3,7", "--nrow", 3, "--denoise", 1]
    first = run(*common, "--seed", 5, "--out", tmp_path / "a.png")
    assert first.exit_code == 0, first.output
    assert "passes" in first.output and "block 3: sequential" in first.output  # solver statistics
    assert "labels: 3,7,3,7,3,7" in first.output
    again = run(*common, "--seed", 5, "--batch-size", 4, "--out", tmp_path / "b.png")
    other = run(*common, "--seed", 6, "--out", tmp_path / "c.png")
    assert again.exit_code == 0 and other.exit_code == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in "abc")
    # same seed, another batching: the same images up to one 8-bit level (a batch of 4 + 2 orders its float32
    # sums otherwise than a batch of 6: ~1e-7 apart, which can round a pixel the other way), as docs promise
    assert np.abs(a - b).max() <= 1
    assert np.abs(a - c).max() > 1  # another seed: other images
    with Image.open(tmp_path / "a.png") as img:
        assert img.size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)  # 3x2 grid of 8x8 images, 2px padding


def _grid(path):
    with Image.open(path) as img:
        return np.asarray(img)


def test_sample_with_plan_and_guidance(tmp_path, tiny8x8_checkpoint_path_with_noise_std):
    """Every guidance option reaches the sampler: each changes the images, and the grid is exactly what
    `sample_ids` draws under the same spec and plan."""
    ckpt = tiny8x8_checkpoint_path_with_noise_std
    plan = Plan.uniform(4, 16, GSJacobi(segment_len=5, tol=0.0))
    plan.save(tmp_path / "plan.json")
    common = ["--checkpoint", ckpt, "--num-samples", 4, "--plan", tmp_path / "plan.json", "--nrow", 4]
    variants = {"plain": [], "guided": ["--guidance", 1.5], "annealed": ["--guidance", 1.5, "--annealed"],
                "tempered": ["--guidance", 1.5, "--annealed", "--attn-temp", 0.5],
                "guide_a": ["--guidance", 1.5, "--annealed", "--attn-temp", 0.5, "--guide-what", "a"]}
    grids = {}
    for name, extra in variants.items():
        result = run(*common, *extra, "--out", tmp_path / f"{name}.png")
        assert result.exit_code == 0, result.output
        assert "gs_jacobi  L=5" in result.output
        grids[name] = _grid(tmp_path / f"{name}.png")
    names = list(grids)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(grids[a], grids[b]), f"{a} and {b} gave the same images"
    model = load_checkpoint(ckpt)
    spec = SamplingSpec(guidance=Guidance(1.5, annealed=True, attn_temp=0.5)).for_model(10)
    images = sample_ids(model, spec, range(4), Plan.load(tmp_path / "plan.json")).images
    save_grid(images, tmp_path / "direct.png", nrow=4)
    assert np.array_equal(_grid(tmp_path / "direct.png"), grids["tempered"])


def test_sample_reports_bad_input(tmp_path, tiny8x8_checkpoint_path_with_noise_std):
    ckpt = tiny8x8_checkpoint_path_with_noise_std
    bad_label = run("--checkpoint", ckpt, "--labels", "12", "--out", tmp_path / "x.png")
    assert bad_label.exit_code != 0 and "class 12 out of range" in bad_label.output
    missing = run("--checkpoint", tmp_path / "none.safetensors", "--out", tmp_path / "x.png")
    assert missing.exit_code != 0 and "not found" in missing.output
    wrong_plan = tmp_path / "plan.json"
    wrong_plan.write_text(json.dumps(Plan.sequential(2, 16).to_dict()))
    mismatch = run("--checkpoint", ckpt, "--plan", wrong_plan, "--out", tmp_path / "x.png")
    assert mismatch.exit_code != 0 and "4 blocks" in mismatch.output
    raw = tmp_path / "raw.pth"
    torch.save(make_tiny_model().state_dict(), raw)
    no_std = run("--checkpoint", raw, "--in-channels", 1, "--denoise", 1, "--out", tmp_path / "x.png")
    assert no_std.exit_code != 0 and "noise_std" in no_std.output
    assert not (tmp_path / "x.png").exists()


def test_sample_takes_the_demo_alias(tmp_path):
    result = run("--checkpoint", "demo", "--num-samples", 2, "--batch-size", 2, "--labels", "3,8",
                 "--out", tmp_path / "demo.png")
    assert result.exit_code == 0, result.output
    assert "labels: 3,8" in result.output and (tmp_path / "demo.png").is_file()


def test_demo_checkpoint_loads_and_samples():
    path = demo_checkpoint()
    assert path.stat().st_size < 15 * 2**20
    model, meta = load_checkpoint(path, with_metadata=True)
    cfg = model.config
    assert (cfg.num_tokens, cfg.token_dim, cfg.num_classes, cfg.img_size) == (196, 4, 10, 28)
    assert meta["dataset"] == "mnist5k" and meta["noise_std"] > 0 and "heldout_bits_per_dim" in meta
    from tarflow import sample, sample_noise

    out = sample(model, sample_noise(0, [0, 1], 196, 4), torch.tensor([3, 8]))
    assert out.images.shape == (2, 1, 28, 28) and torch.isfinite(out.images).all()
