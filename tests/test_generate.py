"""The generate stage on a real local Ray: determinism over actors, resume, killed actors, bad input."""
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from click.testing import CliRunner
from conftest import holding_lease, make_tiny16x16_4blocks_model, make_tiny_model, our_ray_processes

from tarflow import CheckpointError, GSJacobi, Guidance, ModelRef, Plan, PlanError, SamplingSpec, SpecError, \
    load_checkpoint, sample, sample_ids, save_checkpoint
from tarflow.denoise import denoise
from tarflow.noise import sample_noise
from workflows.cli import main as cli
from workflows.config import GenerateConfig, Resources, SampleSet
from workflows.runtime import WorkerStartError
from workflows.stages.generate import GenerateError, generate, read_inputs
from workflows.storage import shards as sh
from workflows.storage.lease import LeaseError

SEED = 11


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny8x8_checkpoint_path):
    root = tmp_path_factory.mktemp("generate")
    ckpt = tiny8x8_checkpoint_path
    plan = Plan.uniform(4, 16, GSJacobi(segment_len=5)).save(root / "plan.json")
    other = save_checkpoint(make_tiny_model(img_size=16), root / "other.safetensors")
    return {"ckpt": str(ckpt), "plan": str(plan), "other": str(other)}


def _cfg(assets, out, num_samples=40, shard_size=16, actors=1, plan="default", checkpoint=None, num_cpus=None,
         **spec):
    return GenerateConfig(model=ModelRef(checkpoint or assets["ckpt"], 1), out=str(out),
                          samples=SampleSet(num_samples=num_samples, shard_size=shard_size),
                          spec=SamplingSpec(**{"seed": SEED, "batch_size": 8, **spec}),
                          plan=Plan.load(assets["plan"]) if plan == "default" else plan,
                          resources=Resources(actors=actors, num_cpus=num_cpus))


def _direct(assets, ids, batch_size=8, classes=10, denoise_lr=0.0, noise_std=0.1, threads=1):
    """uint8 images and solver stats of `ids` from tarflow.sample (and tarflow.denoise) called directly."""
    model, plan = load_checkpoint(assets["ckpt"]), Plan.load(assets["plan"])
    out, passes, before = [], [], torch.get_num_threads()
    torch.set_num_threads(threads)  # the workers' torch threads (1: one whole CPU or less)
    try:
        for s in range(0, len(ids), batch_size):
            chunk = ids[s : s + batch_size]
            noise = sample_noise(SEED, chunk, model.num_tokens, model.token_dim)
            labels = torch.as_tensor(np.arange(classes) if isinstance(classes, int) else classes)
            y = labels[torch.as_tensor(chunk) % len(labels)]
            result = sample(model, noise, y, plan=plan)
            images = result.images
            if denoise_lr:
                images = denoise(model, images, y, noise_std=noise_std, lr_multiplier=denoise_lr)
            out.append(sh.to_uint8(images))
            by_block = {b.block: b.passes for b in result.stats.blocks}
            passes += [[by_block[i] for i in range(len(model.blocks))]] * len(chunk)
    finally:
        torch.set_num_threads(before)
    return np.concatenate(out), passes


def test_actor_count_never_changes_an_image(ray_local, tmp_path):
    """1, 2 and 3 actors with the default resources: the same bytes, and those of direct sampling at the
    workers' one thread; every actor sampled with one torch thread, as it reports it (whether 2 threads
    change this model's pixels depends on the torch build, so the thread count is checked directly, not
    through the pixels); the shards' solver stats are those of the batch that made each row."""
    model = make_tiny16x16_4blocks_model()
    ckpt = save_checkpoint(model, tmp_path / "m16.safetensors")
    spec = SamplingSpec(seed=SEED, batch_size=8)

    def cfg(out, actors):
        return GenerateConfig(model=ModelRef(str(ckpt), 1), out=str(out), samples=SampleSet(num_samples=96,
                              shard_size=16), spec=spec, resources=Resources(actors=actors))

    runs = [generate(cfg(tmp_path / f"a{n}", n), progress=False) for n in (1, 2, 3)]
    assert all(r.samples_written == 96 and r.shards_written == 6 for r in runs)
    sets = [sh.read_images(str(tmp_path / f"a{n}")) for n in (1, 2, 3)]
    ids, labels, images = sets[0]
    assert ids.tolist() == list(range(96)) and np.array_equal(labels, ids % 10)
    for other in sets[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(sets[0], other))  # bitwise, whichever actor took a shard

    def direct_at_one_thread():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            outs = [sample_ids(model, spec.for_model(10), range(s, s + 8)) for s in range(0, 96, 8)]
        finally:
            torch.set_num_threads(before)
        return np.concatenate([sh.to_uint8(o.images) for o in outs]), outs

    one, outs = direct_at_one_thread()
    assert np.array_equal(images, one)
    assert all(torch.equal(o.labels, torch.arange(s, s + 8) % 10) for s, o in zip(range(0, 96, 8), outs))
    assert {p["torch_threads"] for r in runs for p in r.placements} == {1}
    table = ds.dataset(str(tmp_path / "a3"), format="parquet").to_table().sort_by("sample_id")
    passes = [[{b.block: b.passes for b in o.stats.blocks}[i] for i in range(4)] for o in outs for _ in range(8)]
    assert table.column("block_passes").to_pylist() == passes
    assert table.column("seed").to_pylist() == [SEED] * 96

    manifest = sh.read_manifest(str(tmp_path / "a1"))
    assert manifest.settings["numerics"] == {"threads": 1, "device": "cpu"}
    meta = sh.read_metadata(str(tmp_path / "a1"), manifest.shards[0])
    assert meta["settings"] == manifest.settings and meta["provenance"]["software"]["torch"]
    assert {p["device"] for r in runs for p in r.placements} == {"cpu"} and 1 <= len(runs[2].placements) <= 3


def test_another_batch_size_moves_pixels_by_one_level_at_most(assets):
    images, _ = _direct(assets, list(range(24)))
    assert np.abs(images.astype(int) - _direct(assets, list(range(24)), batch_size=3)[0]).max() <= 1


def test_resume_refuses_other_numerics(complete_set, assets, tmp_path):
    """Threads decide pixels on a CPU: a resume (or a second run) with another thread count is refused."""
    out, _ = _copy(complete_set, tmp_path)
    with pytest.raises(GenerateError, match=r"numerics.threads=1 there vs 2 now"):
        generate(_cfg(assets, out, num_samples=32, shard_size=8, num_cpus=2), progress=False)
    assert generate(_cfg(assets, out, num_samples=32, shard_size=8), progress=False).shards_written == 0


def _damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "flipped":  # same size: only a checksum can tell. The byte is in the middle of the images'
        # column chunk, which its pages' payload fills: the chunk starts at its dictionary page where the writer
        # made one (pyarrow 15-17 did; the middle of the data pages alone fell past the chunk's end there)
        import pyarrow.parquet as pq

        column = next(c for c in (pq.ParquetFile(path).metadata.row_group(0).column(i) for i in range(8))
                      if c.path_in_schema == "image.bytes")
        start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
        data = bytearray(path.read_bytes())
        data[start + column.total_compressed_size // 2] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.unlink()


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
    assert np.array_equal(images, _direct(assets, list(range(56)))[0])


@pytest.fixture(scope="module")
def complete_set(ray_local, assets, tmp_path_factory):
    """A finished 4-shard set, copied by each test that damages one: (its path, {file: sha256})."""
    out = tmp_path_factory.mktemp("complete") / "set"
    generate(_cfg(assets, out, num_samples=32, shard_size=8), progress=False)
    return out, {e.file: e.sha256 for e in sh.read_manifest(str(out)).shards}


def _copy(complete_set, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(complete_set[0], out)
    return out, complete_set[1]


@pytest.mark.parametrize("how", ["truncated", "flipped", "deleted"])
def test_damaged_shards_are_redone_and_nothing_else(complete_set, assets, tmp_path, how):
    out, before = _copy(complete_set, tmp_path)
    cfg = _cfg(assets, out, num_samples=32, shard_size=8)
    _damage(out / "data" / "train-00002-of-00004.parquet", how)
    with pytest.raises(sh.ShardError, match="re-run generate to redo it|missing"):
        sh.verify_shards(cfg.out)  # the readers refuse it and say what to do; doing it repairs the set
    summary = generate(cfg, progress=False)
    assert (summary.shards_written, summary.shards_skipped) == (1, 3)
    assert any("train-00002-of-00004.parquet" in n for n in summary.notes)
    after = {e.file: e.sha256 for e in sh.verify_shards(cfg.out).shards}
    assert after == before  # the redone shard is byte for byte the original, and nothing else was touched
    assert generate(cfg, progress=False).shards_written == 0


def test_large_sets_are_verified_in_the_actors(complete_set, assets, tmp_path, monkeypatch):
    import workflows.stages.generate as stage

    out, before = _copy(complete_set, tmp_path)
    cfg = _cfg(assets, out, num_samples=32, shard_size=8, actors=2)
    _damage(out / "data" / "train-00001-of-00004.parquet", "flipped")
    monkeypatch.setattr(stage, "LOCAL_VERIFY_BYTES", 0)  # every shard counts as a large set's

    def not_in_the_driver(*args):
        raise AssertionError("the driver hashed a shard")

    monkeypatch.setattr(sh, "check_entry", not_in_the_driver)  # the actors' processes keep the real one
    summary = generate(cfg, progress=False)
    assert summary.shards_written == 1 and any("train-00001-of-00004.parquet" in n for n in summary.notes)
    assert {e.file: e.sha256 for e in sh.verify_shards(cfg.out).shards} == before


def test_a_corrupt_manifest_is_named_and_its_shards_recovered(complete_set, assets, tmp_path):
    out, before = _copy(complete_set, tmp_path)
    cfg = _cfg(assets, out, num_samples=32, shard_size=8)
    (out / "_manifest.json").write_bytes(b"\xff\xfe\x00 torn")
    _damage(out / "data" / "train-00003-of-00004.parquet", "flipped")
    with pytest.raises(sh.ShardError, match="out/_manifest.json is corrupt"):
        sh.read_manifest(cfg.out)
    summary = generate(cfg, progress=False)
    assert summary.shards_written == 1 and "recovered 3 shard(s)" in summary.notes[0]
    assert {e.file: e.sha256 for e in sh.verify_shards(cfg.out).shards} == before


def test_one_writer_per_output(ray_local, assets, tmp_path):
    """A live run's lease refuses a second writer, naming it; a dead run's lease and temporaries are taken over."""
    out = tmp_path / "out"
    out.mkdir()
    with holding_lease(out) as (run_id, pid):  # a live process on this host holds the lease
        with pytest.raises(LeaseError, match=f"being written by run {run_id} on host .* \\(pid {pid}"):
            generate(_cfg(assets, out, num_samples=16, shard_size=8), progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["_lease.json"]  # nothing else was touched
    # the holder died: its lease is taken over at once (same host), its leftover temporary removed
    (out / "data").mkdir()
    (out / "data" / f".train-00000-of-00002.parquet.tmp-{run_id}-abc123").write_bytes(b"half a shard")
    summary = generate(_cfg(assets, out, num_samples=16, shard_size=8), progress=False)
    assert summary.shards_written == 2
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json", "data"]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00002.parquet",
                                                                 "train-00001-of-00002.parquet"]


def test_a_full_disk_is_a_message_and_the_run_resumes(ray_local, assets, tmp_path, monkeypatch):
    import errno

    out = tmp_path / "out"
    real, calls = sh.commit_shard, []

    def full_after_one(uri, entry):
        calls.append(entry.index)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(uri, entry)

    monkeypatch.setattr(sh, "commit_shard", full_after_one)
    args = ["generate", "--checkpoint", assets["ckpt"], "--in-channels", "1", "--plan", assets["plan"],
            "--num-samples", "24", "--seed", str(SEED), "--batch-size", "8", "--shard-size", "8", "--out", str(out),
            "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "cannot write the record of data/train-0000" in result.output and "No space left" in result.output
    assert "finished shards are kept" in result.output
    monkeypatch.undo()
    assert len(sh.read_manifest(str(out)).shards) == 1
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "1 already done" in again.output, again.output
    assert sh.verify_shards(str(out)).complete


def test_killed_actor_is_replaced_and_every_id_written_once(ray_local, assets, tmp_path, capfd):
    """...and without Ray's warning that a restart may fail for lack of constructor arguments (ray#53727):
    the pool hands every (re)started actor its arguments (the checkpoint's reference, not its weights)."""
    cfg = _cfg(assets, tmp_path / "out", num_samples=96, shard_size=8, actors=2)
    killed, first_shard, done = [], threading.Event(), threading.Event()

    def kill_one():  # once a shard is committed, the first actor seen running a unit (a start is no replacement)
        first_shard.wait()
        while not killed and not done.is_set():
            busy = our_ray_processes("ray::ShardWorker.call")
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        summary = generate(cfg, progress=False, on_shard=lambda entry: first_shard.set())
    finally:
        done.set()
        first_shard.set()
        killer.join()
    assert killed and summary.actor_replacements >= 1
    manifest = sh.verify_shards(cfg.out)
    assert manifest.complete and manifest.rows == 96
    ids, _, images = sh.read_images(cfg.out)
    assert ids.tolist() == list(range(96))
    assert np.array_equal(images[:16], _direct(assets, list(range(16)))[0])
    assert "53727" not in capfd.readouterr().err


def test_the_driver_reads_the_checkpoint_once_and_each_worker_checks_its_own(ray_local, assets, tmp_path,
                                                                             monkeypatch):
    """The driver reads the checkpoint once, for the run's identity; each worker loads the model from the
    checkpoint's reference and refuses weights other than those the identity names (a file replaced while
    the run lasts, another file at the same path on another node)."""
    import tarflow.checkpoint as checkpoint

    reads, real = [], checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda ref, *a, **k: reads.append(ref) or real(ref, *a, **k))
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(assets["ckpt"], ckpt)
    cfg = _cfg(assets, tmp_path / "out", num_samples=8, shard_size=8, checkpoint=str(ckpt))
    assert generate(cfg, progress=False).shards_written == 1 and reads == [str(ckpt)]

    checked, identity = read_inputs(cfg.model_copy(update={"out": str(tmp_path / "other")}))
    save_checkpoint(make_tiny_model(seed=1), ckpt)
    with pytest.raises(WorkerStartError, match=rf"m.safetensors is model \w+ on .*, the run samples model "
                                               rf"{identity.model_hash}: every worker must read the driver's"):
        generate(checked, progress=False, identity=identity)
    assert not list((tmp_path / "other").glob("data/*"))


def test_bad_inputs_fail_before_any_work(assets, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        generate(_cfg(assets, out, checkpoint=str(tmp_path / "missing.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        generate(_cfg(assets, out, checkpoint=str(tmp_path / "junk.safetensors")))
    with pytest.raises(PlanError, match="plan is for 4 blocks x 16 tokens, the model has 4 blocks x 64 tokens"):
        generate(_cfg(assets, out, checkpoint=assets["other"]))
    with pytest.raises(SpecError, match="class 12 out of range"):
        generate(_cfg(assets, out, labels=(3, 12)))
    with pytest.raises(SpecError, match="batch_size=0"):
        generate(_cfg(assets, out, batch_size=0))
    with pytest.raises(SpecError, match="scale=nan: must be a finite number"):
        generate(_cfg(assets, out, guidance=Guidance(float("nan"))))
    certified = Plan.load(assets["plan"])
    certified.spec = SamplingSpec(guidance=Guidance(2.0))
    with pytest.raises(PlanError, match="certified for another sampling map"):
        generate(_cfg(assets, out, plan=certified))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(GenerateError, match="cannot create output .*a_file is a file"):
        generate(_cfg(assets, tmp_path / "a_file" / "out"))
    with pytest.raises(GenerateError, match="is a file; give a directory"):
        generate(_cfg(assets, tmp_path / "a_file"))
    assert not out.exists()  # checked before the output is touched

    generate(_cfg(assets, out, num_samples=8, shard_size=8), progress=False)
    with pytest.raises(GenerateError, match=r"different settings \(spec.seed=11 there vs 12 now\)"):
        generate(_cfg(assets, out, num_samples=8, shard_size=8, seed=12))
    with pytest.raises(GenerateError, match="plan_hash="):
        generate(_cfg(assets, out, num_samples=8, shard_size=8, plan=None))
    assert sh.read_manifest(str(out)).settings["spec"]["seed"] == SEED

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "part-0.parquet").write_bytes(b"PAR1")
    with pytest.raises(GenerateError, match="no _manifest.json"):
        generate(_cfg(assets, foreign))


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
    assert np.array_equal(images, _direct(assets, list(range(12)), classes=[3, 4], denoise_lr=1.0)[0])
    assert not np.array_equal(images, _direct(assets, list(range(12)), classes=[3, 4])[0])
    again = CliRunner().invoke(cli, [*args, "--seed", "1"])  # the last --seed wins
    assert again.exit_code != 0 and "different settings" in again.output
    missing = CliRunner().invoke(cli, ["generate", "--checkpoint", str(tmp_path / "nope"), "--num-samples", "1",
                                       "--seed", "0", "--batch-size", "1", "--out", str(tmp_path / "x")])
    assert missing.exit_code != 0 and "checkpoint not found" in missing.output
    json.loads((out / "_manifest.json").read_text())
