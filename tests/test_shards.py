"""Shard files and manifests on a real local filesystem: schema, PNG round trip, atomic writes, corruption."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from tarflow import ModelRef, SamplingSpec
from workflows.config import GenerateConfig, SampleSet
from workflows.storage import files, shards as sh

# a set as main's code (manifest version 3) left it after two crashes, kept byte for byte: tests/data/make_v3_set.py
V3_SET = Path(__file__).parent / "data" / "v3-set"


def _write_set(uri, num_samples=10, shard_size=4, seed=7):
    manifest = sh.Manifest({"seed": seed}, num_samples, shard_size)
    rng = np.random.default_rng(0)
    images = {}
    for index in range(manifest.num_shards):
        shard = manifest.shard(index)
        ids = np.asarray(shard.sample_ids)
        imgs = rng.integers(0, 256, (len(ids), 6, 5, 3), dtype=np.uint8)
        images.update(zip(ids.tolist(), imgs))
        table = sh.shard_table(ids, ids % 3, seed, [sh.encode_png(im) for im in imgs], [[1, 2]] * len(ids),
                               [0] * len(ids), [0.5] * len(ids))
        manifest.add(shard.write(uri, table, {"shard": index}))
        sh.write_manifest(uri, manifest)
    return manifest, images


def test_png_round_trip_and_rounding():
    x = torch.tensor([-1.0, -0.9999, 0.0, 0.5, 1.0, 1.7]).view(1, 1, 1, 6)
    u8 = sh.to_uint8(x)
    # save_image's rule: floor(255 * (x/2 + 1/2) + 1/2), clipped
    assert u8.shape == (1, 1, 6, 1) and u8.ravel().tolist() == [0, 0, 128, 191, 255, 255]
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8, 1)
    rgb = np.random.default_rng(1).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    for image in (grey, rgb):
        assert np.array_equal(sh.decode_png(sh.encode_png(image)), image)
    with pytest.raises(ValueError, match="uint8"):
        sh.encode_png(grey.astype(np.float32))


def test_shard_set_round_trip_schema_and_manifest(tmp_path):
    uri = str(tmp_path / "set")
    manifest, images = _write_set(uri)
    assert manifest.complete and manifest.num_shards == 3
    on_disk = json.loads((tmp_path / "set" / "_manifest.json").read_text())
    assert on_disk["complete"] and on_disk["rows"] == 10
    assert [(s["first_id"], s["last_id"], s["rows"]) for s in on_disk["shards"]] == [(0, 3, 4), (4, 7, 4), (8, 9, 2)]
    # no temporaries left behind; any Parquet reader opens the directory itself
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["_manifest.json", "data"]
    assert sorted(p.name for p in (tmp_path / "set" / "data").iterdir()) == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert pq.ParquetFile(tmp_path / "set" / "data" / "train-00000-of-00003.parquet").metadata.num_row_groups == 1
    table = ds.dataset(uri, format="parquet").to_table()
    assert sorted(table.column("sample_id").to_pylist()) == list(range(10))
    assert pq.read_table(uri).num_rows == 10
    assert table.schema.field("image").type == sh.IMAGE_TYPE
    assert table.schema.field("sample_id").type == pa.int64() and table.schema.field("label").type == pa.int32()
    assert sh.open_dataset(uri).count_rows() == 10
    ids, labels, decoded = sh.read_images(uri)
    assert ids.tolist() == list(range(10)) and labels.tolist() == [i % 3 for i in range(10)]
    assert all(np.array_equal(decoded[i], images[i]) for i in range(10))
    meta = pq.read_schema(str(tmp_path / "set" / "data" / "train-00001-of-00003.parquet")).metadata
    assert json.loads(meta[sh.METADATA_KEY]) == {"shard": 1} and b"huggingface" in meta
    assert sh.verify_shards(uri).rows == 10
    # file:// URIs go through pyarrow.fs as any remote filesystem would
    assert sh.read_images(f"file://{tmp_path}/set")[0].tolist() == list(range(10))


def test_the_shard_schema_is_one_definition_and_earlier_shards_hold_it():
    """`SCHEMA` is what `shard_table` fills and what the Hugging Face features follow: columns, types and the
    features' bytes as the shards an earlier version wrote hold them."""
    earlier = pq.read_schema(V3_SET / "data" / "train-00000-of-00004.parquet")
    assert earlier.remove_metadata().equals(sh.SCHEMA)
    assert earlier.metadata[b"huggingface"] == json.dumps(sh.HF_FEATURES).encode()
    table = sh.shard_table(range(3, 5), np.array([-1, 2]), 9, [b"a", b"b"], [[1, 2], [1, 2]], [0, 1], [0.5, 0.25])
    assert table.schema.equals(sh.SCHEMA) and table.column("image").to_pylist() == [
        {"bytes": b"a", "path": "00000003.png"}, {"bytes": b"b", "path": "00000004.png"}]
    assert table.column("label").to_pylist() == [-1, 2] and table.column("seed").to_pylist() == [9, 9]


def test_corrupt_missing_and_incomplete_shards_raise_clear_errors(tmp_path):
    uri = str(tmp_path / "set")
    _write_set(uri)
    shard = tmp_path / "set" / "data" / "train-00001-of-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(sh.ShardError, match="train-00001-of-00003.parquet fails its sha256 check"):
        sh.read_images(uri)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(sh.ShardError, match="train-00001-of-00003.parquet has .* bytes, the manifest says"):
        sh.open_dataset(uri)
    shard.unlink()
    with pytest.raises(sh.ShardError, match="train-00001-of-00003.parquet is listed in the manifest but missing"):
        sh.verify_shards(uri)
    manifest = sh.read_manifest(uri)
    manifest.shards = manifest.shards[:1]
    sh.write_manifest(uri, manifest)
    with pytest.raises(sh.ShardError, match="incomplete: 1 of 3 shards"):
        sh.read_images(uri)
    assert sh.read_images(uri, allow_partial=True)[0].tolist() == [0, 1, 2, 3]
    (tmp_path / "set" / "_manifest.json").write_text("{not json")
    with pytest.raises(sh.ShardError, match="_manifest.json is corrupt .the text is not valid JSON"):
        sh.read_manifest(uri)
    with pytest.raises(sh.ShardError, match="no _manifest.json"):
        sh.read_manifest(str(tmp_path / "elsewhere"))


def test_atomic_write_replaces_whole_file_and_cleans_temporaries(tmp_path):
    fs, base = files.resolve(str(tmp_path))
    files.write_below(fs, base, "f.bin", b"first")
    files.write_below(fs, base, "f.bin", b"second")
    assert (tmp_path / "f.bin").read_bytes() == b"second"
    (tmp_path / ".shard-00003.parquet.tmp-deadbeef").write_bytes(b"half a shard")
    assert files.remove_temporaries(fs, base) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_shard_records_cost_the_same_for_the_first_shard_and_the_last(tmp_path):
    """Per-shard bookkeeping is one small record: bytes per commit do not grow with the set, readers see
    records and folded entries alike, and folding leaves one manifest (bench/manifest.py times 10,000)."""
    uri = str(tmp_path / "set")
    m = sh.Manifest({"seed": 1}, num_samples=2000 * 4, shard_size=4)
    sh.write_manifest(uri, m)
    written = []
    for index in range(2000):
        entry = sh.ShardEntry(m.shard_file(index), index, 4, 4 * index, 4 * index + 3, "0" * 64, 1000,
                              {"batches": 1, "block_passes": [15, 15, 15, 15], "fallbacks": 0})
        written.append(sh.commit_shard(uri, entry))
    assert max(written[-100:]) <= 1.05 * min(written[:100])  # the same few hundred bytes (id digits aside)
    assert (tmp_path / "set" / "_manifest.json").stat().st_size < 1000  # not rewritten per shard
    seen = sh.read_manifest(uri)
    assert seen.complete and [e.index for e in seen.shards] == list(range(2000))
    sh.write_manifest(uri, seen)  # fold
    assert not (tmp_path / "set" / sh.RECORDS_DIR).exists()
    assert sh.read_manifest(uri).shards == seen.shards


def test_any_parquet_reader_opens_the_output_directory_as_it_is(tmp_path):
    """pandas, DuckDB and pyarrow.dataset read the folder itself: the manifest, records, lease and
    temporaries (names starting with '_' or '.') are not taken for data."""
    import duckdb
    import pandas as pd

    uri = str(tmp_path / "set")
    manifest, images = _write_set(uri)
    (tmp_path / "set" / "_lease.json").write_text("{}")
    (tmp_path / "set" / "data" / ".train-00009-of-00010.parquet.tmp-run-abc").write_bytes(b"half")
    (tmp_path / "set" / "_fid-mnist5k-classifier.json").write_text("{}")
    frame = pd.read_parquet(uri)
    assert sorted(frame["sample_id"]) == list(range(10)) and set(frame.columns) >= {"image", "label", "seed"}
    ((count, total),) = duckdb.sql(f"select count(*), sum(sample_id) from read_parquet('{uri}/data/*.parquet')").fetchall()
    assert (count, total) == (10, 45)
    assert ds.dataset(uri, format="parquet").count_rows() == 10


def test_hugging_face_datasets_loads_the_output_as_it_is(tmp_path):
    """Both ways users load a folder: an `image` column of decoded PIL images, the other columns typed,
    and the manifest, FID results, records and lease beside the shards are not taken for data."""
    import datasets
    from PIL.Image import Image as PILImage

    uri = str(tmp_path / "set")
    _, images = _write_set(uri)
    for name in ("_fid-mnist5k-classifier.json", "_lease.json"):
        (tmp_path / "set" / name).write_text("{}")
    for loaded in (datasets.load_dataset(uri, split="train", cache_dir=str(tmp_path / "hf")),
                   datasets.load_dataset("parquet", data_dir=uri, split="train", cache_dir=str(tmp_path / "hf2"))):
        assert loaded.num_rows == 10
        assert loaded.features["label"].dtype == "int32" and loaded.features["sample_id"].dtype == "int64"
        assert isinstance(loaded.features["image"], datasets.Image)
        row = loaded.sort("sample_id")[3]
        assert isinstance(row["image"], PILImage) and np.array_equal(np.asarray(row["image"]), images[3])


def _v3_set(tmp_path) -> Path:
    out = tmp_path / "set"
    shutil.copytree(V3_SET, out)
    return out


def _v3_config(out) -> GenerateConfig:
    return GenerateConfig(model=ModelRef("demo"), out=str(out), samples=SampleSet(num_samples=8, shard_size=2),
                          spec=SamplingSpec(seed=3, batch_size=2))


def test_a_set_written_before_the_typed_manifest_reads_and_resumes(ray_local, tmp_path):
    """The manifest (shards 0 and 1 folded in) and the record of shard 2 that main's code wrote read as they
    are and are written back byte for byte; generate resumes the set, redoing nothing it holds."""
    from workflows.stages.generate import Job, _read_output, _with_pending, generate, read_inputs

    out = _v3_set(tmp_path)
    text = (out / sh.MANIFEST_NAME).read_text()
    assert sh.Manifest.from_json(text).to_json() == text
    record = (out / sh.RECORDS_DIR / "00002.json").read_bytes()
    sh.commit_shard(str(tmp_path / "again"), sh.ShardEntry(**json.loads(record)))
    assert (tmp_path / "again" / sh.RECORDS_DIR / "00002.json").read_bytes() == record
    assert [e.index for e in sh.read_manifest(str(out)).shards] == [0, 1, 2]
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    job = Job.new(*read_inputs(_v3_config(out)))
    _read_output(job)
    assert _with_pending(job).pending == [3] and job.notes == []
    summary = generate(_v3_config(out), progress=False)
    assert (summary.shards_written, summary.shards_skipped) == (1, 3)
    assert sh.verify_shards(str(out)).complete
    assert all((out / "data" / name).read_bytes() == data for name, data in before.items())


def _set_at(d, path, value):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("path, value, named", [
    (("shards", 0, "rows"), -2, "shards[0].rows: Input should be greater than 0"),
    (("shards", 1, "rows"), NAN, "shards[1].rows: Input should be a finite number"),
    (("shards", 0, "first_id"), -1, "shards[0].first_id: Input should be greater than or equal to 0"),
    (("shards", 1, "last_id"), 2, "shards[1].rows=2: ids 2..2 are 1"),
    (("shards", 0, "size_bytes"), 0, "shards[0].size_bytes: Input should be greater than 0"),
    (("shards", 0, "sha256"), "00", "shards[0].sha256: String should match pattern"),
    (("shards", 0, "file"), "../../secret.parquet", "shards[0].file='../../secret.parquet': shard 0 is "
                                                      "data/train-00000-of-00004.parquet"),
    (("shards", 1, "index"), 7, "shards[1].index=7: the set has shards 0..3"),
    (("shards", 1, "index"), 0, "shards[1].file='data/train-00001-of-00004.parquet': shard 0 is"),
    (("shards", 0, "stats", "seconds"), NAN, "shards[0].stats.seconds: Input should be a finite number"),
    (("shards", 0, "stats", "fallbacks"), -1, "shards[0].stats.fallbacks: Input should be greater than or equal"),
    (("shards", 0, "stats", "block_passes", 2), -195, "shards[0].stats.block_passes[2]: Input should be greater"),
    (("shards", 0, "stats", "gpu_hours"), 1, "shards[0].stats.gpu_hours: unknown field"),
    (("shards", 0, "colour"), "red", "shards[0].colour: unknown field"),
    (("num_samples",), -8, "num_samples: Input should be greater than 0"),
    (("shard_size",), INF, "shard_size: Input should be a finite number"),
    (("settings", "shard_size"), 3, "shard_size=2: its settings say 3"),
    (("provenance", "writer", "pid"), -1, "provenance.writer.pid: Input should be greater than 0"),
    (("provenance", "writer", "port"), 80, "provenance.writer.port: unknown field"),
    (("rows",), NAN, "rows=nan: its shards say 4"),
    (("complete",), True, "complete=True: its shards say False"),
    (("owner",), "me", "owner: unknown field"),
])
def test_every_number_and_field_of_a_manifest_is_checked(tmp_path, path, value, named):
    """Each number of `_manifest.json` out of range, NaN or inf, a listed file or id range outside the set's
    layout, an unknown field: the reader names the file and the dotted field (all were read as they were)."""
    out = _v3_set(tmp_path)
    d = json.loads((out / sh.MANIFEST_NAME).read_text())
    _set_at(d, path, value)
    (out / sh.MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(sh.ShardError) as e:
        sh.read_manifest(str(out))
    assert str(e.value).startswith(f"{out}/_manifest.json is corrupt (") and named in str(e.value), str(e.value)


@pytest.mark.parametrize("key, value, named", [
    ("rows", NAN, "rows: Input should be a finite number"),
    ("size_bytes", -9886, "size_bytes: Input should be greater than 0"),
    ("index", 4, "index=4: the set has shards 0..3"),
    ("first_id", 6, "first_id=6: shard 2 starts at id 4"),
    ("stats", {"seconds": -0.5}, "stats.seconds: Input should be greater than or equal to 0"),
])
def test_every_number_of_a_shard_record_is_checked(tmp_path, key, value, named):
    """The same for a record in `_shards/`, against the manifest's layout: named, with what to do."""
    out = _v3_set(tmp_path)
    record = out / sh.RECORDS_DIR / "00002.json"
    d = json.loads(record.read_text())
    d[key] = value
    if key == "first_id":
        d["last_id"] = 7  # rows stay 2: only the range is off
    record.write_text(json.dumps(d))
    with pytest.raises(sh.ShardError) as e:
        sh.read_manifest(str(out))
    message = str(e.value)
    assert message.startswith(f"{record} is corrupt (") and named in message, message
    assert message.endswith("delete it and resume generate to redo its shard")


def test_every_number_of_a_run_identity_is_checked():
    """The identity a manifest and every shard's metadata record: each number in range, the sampling spec's
    own checks, no unknown fields."""
    from workflows.stages.generate import RunIdentity

    settings = json.loads((V3_SET / sh.MANIFEST_NAME).read_text())["settings"]
    assert RunIdentity.from_settings(settings, "x").to_dict() == settings
    for path, value, named in [(("numerics", "threads"), 0, "settings.numerics.threads: Input should be greater"),
                               (("num_samples",), NAN, "settings.num_samples: Input should be a finite number"),
                               (("image_shape", 1), -28, "settings.image_shape[1]: Input should be greater"),
                               (("image_shape",), [28, 28], "settings.image_shape: List should have at least 3"),
                               (("num_classes",), -1, "settings.num_classes: Input should be greater than or"),
                               (("spec", "seed"), -3, "settings.spec.seed=-3: must be an integer >= 0"),
                               (("spec", "guidance", "scale"), INF, "settings.spec.guidance.scale: Input should be "
                                                                    "a finite number"),
                               (("numerics", "gpus"), 1, "settings.numerics.gpus: unknown field")]:
        bad = json.loads(json.dumps(settings))
        _set_at(bad, path, value)
        with pytest.raises(sh.ShardError, match="x: its run identity is not one this build reads") as e:
            RunIdentity.from_settings(bad, "x")
        assert named in str(e.value), str(e.value)


def test_a_lost_manifest_recovers_no_shard_whose_metadata_has_bad_numbers(tmp_path):
    """Recovery from shards alone takes each shard's stats from its Parquet metadata: one whose stats
    hold NaN (it was recovered with them) is left out, to be redone, like any shard that fails a check."""
    out = _v3_set(tmp_path)
    manifest = sh.read_manifest(str(out))
    path = out / manifest.shards[0].file
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[sh.METADATA_KEY])
    meta["stats"]["seconds"] = NAN
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, sh.METADATA_KEY: json.dumps(meta)}), path,
                   write_page_checksum=True)
    found = sh.recover_entries(str(out), manifest)
    assert [e.index for e, _ in found] == [1, 2]
    assert all(meta["settings"] == manifest.settings for _, meta in found)
