"""The generate stage on a real local Ray: determinism over actors, resume, killed actors, bad input."""
import json
import os
import signal

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model

from tarflow import CheckpointError, GSJacobi, Guidance, ModelRef, Plan, PlanError, SamplingSpec, SpecError, \
    load_checkpoint, sample, save_checkpoint
from tarflow.denoise import denoise
from tarflow.noise import sample_noise
from workflows.cli import main as cli
from workflows.config import GenerateConfig, Resources, SampleSet
from workflows.stages.generate import GenerateError, generate, prepare
from workflows.storage import shards as sh

SEED = 11


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    ckpt = save_checkpoint(make_tiny_model(), root / "tiny.safetensors")
    plan = Plan.uniform(4, 16, GSJacobi(segment_len=5)).save(root / "plan.json")
    other = save_checkpoint(make_tiny_model(img_size=16), root / "other.safetensors")
    return {"ckpt": str(ckpt), "plan": str(plan), "other": str(other)}


def _cfg(assets, out, num_samples=40, shard_size=16, actors=1, plan="default", checkpoint=None, **spec):
    return GenerateConfig(model=ModelRef(checkpoint or assets["ckpt"], 1), out=str(out),
                          samples=SampleSet(num_samples=num_samples, shard_size=shard_size),
                          spec=SamplingSpec(**{"seed": SEED, "batch_size": 8, **spec}),
                          plan=Plan.load(assets["plan"]) if plan == "default" else plan,
                          resources=Resources(actors=actors, num_cpus=0.5))


def _direct(assets, ids, batch_size=8, classes=10, denoise_lr=0.0, noise_std=0.1):
    """uint8 images of `ids` from tarflow.sample (and tarflow.denoise) called directly, batch by batch."""
    model, plan = load_checkpoint(assets["ckpt"]), Plan.load(assets["plan"])
    out, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as the actors run (num_cpus=0.5); a tiny model gains nothing from more
    try:
        for s in range(0, len(ids), batch_size):
            chunk = ids[s : s + batch_size]
            noise = sample_noise(SEED, chunk, model.num_tokens, model.token_dim)
            labels = torch.as_tensor(np.arange(classes) if isinstance(classes, int) else classes)
            y = labels[torch.as_tensor(chunk) % len(labels)]
            images = sample(model, noise, y, plan=plan).images
            if denoise_lr:
                images = denoise(model, images, y, noise_std=noise_std, lr_multiplier=denoise_lr)
            out.append(sh.to_uint8(images))
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(out)


def test_one_vs_two_actors_identical_and_equal_to_direct_sampling(ray_local, assets, tmp_path):
    one = generate(_cfg(assets, tmp_path / "one", actors=1), progress=False)
    two = generate(_cfg(assets, tmp_path / "two", actors=2), progress=False)
    assert one.samples_written == two.samples_written == 40 and one.shards_written == 3
    ids1, labels1, images1 = sh.read_images(str(tmp_path / "one"))
    ids2, labels2, images2 = sh.read_images(str(tmp_path / "two"))
    assert ids1.tolist() == ids2.tolist() == list(range(40))
    assert np.array_equal(labels1, ids1 % 10) and np.array_equal(labels1, labels2)
    assert np.array_equal(images1, images2)  # bitwise, whichever actor took which shard
    assert np.array_equal(images1, _direct(assets, list(range(40))))
    # another batch size: same images up to one 8-bit level where reduction order flips a rounding
    assert np.abs(images1[:12].astype(int) - _direct(assets, list(range(12)), batch_size=3)).max() <= 1

    files = sorted(str(p) for p in (tmp_path / "one").glob("shard-*.parquet"))
    table = ds.dataset(files, format="parquet").to_table()
    assert table.num_rows == 40 and table.column("block_passes")[0].as_py() and table.column("seed")[0].as_py() == SEED
    manifest = sh.read_manifest(str(tmp_path / "one"))
    meta = sh.read_metadata(str(tmp_path / "one"), manifest.shards[0])
    assert meta["settings"]["plan_hash"] == Plan.load(assets["plan"]).fingerprint()
    assert meta["settings"]["model_hash"] == manifest.settings["model_hash"]
    assert meta["provenance"]["software"]["torch"] and meta["settings"]["spec"]["labels"] == "uniform"
    assert SamplingSpec(**{k: v for k, v in meta["settings"]["spec"].items() if k in ("seed", "batch_size")}) == \
        SamplingSpec(seed=SEED, batch_size=8)
    assert {p["device"] for p in one.placements} == {"cpu"} and 1 <= len(two.placements) <= 2


def test_resume_after_interrupted_run_has_no_gaps_or_duplicates(ray_local, assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "out", num_samples=56, shard_size=8)
    done = []

    def interrupt(entry):
        done.append(entry)
        if len(done) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(cfg, progress=False, on_shard=interrupt)
    partial = sh.read_manifest(cfg.out)
    assert len(partial.shards) == 3 and not partial.complete
    kept = {e.file: e.sha256 for e in partial.shards}

    summary = generate(cfg, progress=False)
    assert (summary.shards_skipped, summary.shards_written) == (3, 4)
    manifest = sh.verify_shards(cfg.out)
    assert manifest.complete and {e.file: e.sha256 for e in manifest.shards if e.file in kept} == kept
    ids, _, images = sh.read_images(cfg.out)
    assert ids.tolist() == list(range(56))
    assert np.array_equal(images[-8:], _direct(assets, list(range(48, 56))))

    # a shard damaged after the run is found on resume and made again; nothing else is redone
    (tmp_path / "out" / "shard-00002.parquet").write_bytes(b"truncated")
    assert prepare(cfg).pending == [2]
    assert generate(cfg, progress=False).shards_written == 1
    assert sh.verify_shards(cfg.out).complete and generate(cfg, progress=False).shards_written == 0


def _our_shard_workers():
    """pids of ShardWorker actor processes of this test's Ray (children of its raylet), busy ones first."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = open(f"/proc/{pid}/cmdline").read()
            parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            grandparent = int(open(f"/proc/{parent}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith("ray::ShardWorker") and grandparent == me:
            found.append((not title.startswith("ray::ShardWorker.call"), int(pid)))
    return [pid for _, pid in sorted(found)]


def test_killed_actor_is_replaced_and_every_id_written_once(ray_local, assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "out", num_samples=96, shard_size=8, actors=2)
    killed = []

    def kill_one(entry):
        if not killed:
            pid = _our_shard_workers()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = generate(cfg, progress=False, on_shard=kill_one)
    assert killed and summary.actor_replacements >= 1
    manifest = sh.verify_shards(cfg.out)
    assert manifest.complete and manifest.rows == 96
    ids, _, images = sh.read_images(cfg.out)
    assert ids.tolist() == list(range(96))
    assert np.array_equal(images[:16], _direct(assets, list(range(16))))


def test_bad_inputs_fail_before_any_work(assets, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        prepare(_cfg(assets, out, checkpoint=str(tmp_path / "missing.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        prepare(_cfg(assets, out, checkpoint=str(tmp_path / "junk.safetensors")))
    with pytest.raises(PlanError, match="plan is for 4 blocks x 16 tokens, the model has 4 blocks x 64 tokens"):
        prepare(_cfg(assets, out, checkpoint=assets["other"]))
    with pytest.raises(SpecError, match="class 12 out of range"):
        prepare(_cfg(assets, out, labels=(3, 12)))
    with pytest.raises(SpecError, match="batch_size=0"):
        prepare(_cfg(assets, out, batch_size=0))
    with pytest.raises(SpecError, match="scale=nan: must be a finite number"):
        prepare(_cfg(assets, out, guidance=Guidance(float("nan"))))
    certified = Plan.load(assets["plan"])
    certified.spec = SamplingSpec(guidance=Guidance(2.0))
    with pytest.raises(PlanError, match="certified for another sampling map"):
        prepare(_cfg(assets, out, plan=certified))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(GenerateError, match="cannot create output|is a file"):
        prepare(_cfg(assets, tmp_path / "a_file" / "out"))
    assert not out.exists()

    prepare(_cfg(assets, out))  # creates the output and its manifest, samples nothing
    with pytest.raises(GenerateError, match=r"different settings \(spec.seed=11 there vs 12 now\)"):
        prepare(_cfg(assets, out, seed=12))
    with pytest.raises(GenerateError, match="plan_hash="):
        prepare(_cfg(assets, out, plan=None))
    assert sh.read_manifest(str(out)).settings["spec"]["seed"] == SEED
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(GenerateError, match="no _manifest.json"):
        prepare(_cfg(assets, foreign))


def test_cli_generates_with_denoising_and_reports(ray_local, assets, tmp_path):
    out = tmp_path / "cli"
    args = ["generate", "--checkpoint", assets["ckpt"], "--in-channels", "1", "--plan", assets["plan"],
            "--num-samples", "12", "--seed", str(SEED), "--labels", "3,4", "--actors", "1", "--num-cpus", "0.5",
            "--batch-size", "8", "--shard-size", "8", "--denoise", "1", "--noise-std", "0.1", "--out", str(out),
            "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "12 samples complete" in result.output and "images/s" in result.output
    _, labels, images = sh.read_images(str(out))
    assert labels.tolist() == [3, 4] * 6
    assert np.array_equal(images, _direct(assets, list(range(12)), classes=[3, 4], denoise_lr=1.0))
    assert not np.array_equal(images, _direct(assets, list(range(12)), classes=[3, 4]))
    again = CliRunner().invoke(cli, [*args, "--seed", "1"])  # the last --seed wins
    assert again.exit_code != 0 and "different settings" in again.output
    missing = CliRunner().invoke(cli, ["generate", "--checkpoint", str(tmp_path / "nope"), "--num-samples", "1",
                                       "--seed", "0", "--batch-size", "1", "--out", str(tmp_path / "x")])
    assert missing.exit_code != 0 and "checkpoint not found" in missing.output
    json.loads((out / "_manifest.json").read_text())
