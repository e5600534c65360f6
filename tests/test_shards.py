"""Shard files and manifests on a real local filesystem: schema, PNG round trip, atomic writes, corruption."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from workflows.storage import files, shards as sh


def _write_set(uri, num_samples=10, shard_size=4, seed=7):
    manifest = sh.Manifest({"seed": seed}, num_samples, shard_size)
    rng = np.random.default_rng(0)
    images = {}
    for index in range(manifest.num_shards):
        ids = np.asarray(manifest.shard_ids(index))
        imgs = rng.integers(0, 256, (len(ids), 6, 5, 3), dtype=np.uint8)
        images.update(zip(ids.tolist(), imgs))
        table = sh.shard_table(ids, ids % 3, seed, [sh.encode_png(im) for im in imgs], [[1, 2]] * len(ids),
                               [0] * len(ids), [0.5] * len(ids))
        manifest.add(sh.write_shard(uri, manifest, index, table, {"shard": index}))
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
    with pytest.raises(sh.ShardError, match="_manifest.json is corrupt .not valid JSON"):
        sh.read_manifest(uri)
    with pytest.raises(sh.ShardError, match="no _manifest.json"):
        sh.read_manifest(str(tmp_path / "elsewhere"))


def test_atomic_write_replaces_whole_file_and_cleans_temporaries(tmp_path):
    fs, base = files.resolve(str(tmp_path))
    target = f"{base}/f.bin"
    files.write_atomic(fs, target, b"first")
    files.write_atomic(fs, target, b"second")
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
