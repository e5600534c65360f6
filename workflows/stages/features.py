"""One pass of a feature extractor over a set of images, in a Ray actor pool: what FID and the metrics beside
it need.

Each task reduces one unit of images (a shard, a chunk of an image folder or of a dataset) to a
`PassStats` inside an actor that loaded its extractor once: FID's sufficient statistics, Inception
Score sums (where the extractor has class logits) and KID's strided feature subset (see
`fidelity.metrics`), and where asked sFID's spatial statistics and precision/recall's feature rows
(put in Ray's object store by the actor; the driver keeps references). The driver adds the sums up
as they arrive, so it holds one D x D matrix per task in flight and never all features; precision and
recall then run block by block in the same actors (`FeaturePool.precision_recall`). A task is a whole
shard rather than a Ray Data batch because a D x D float64 sum per batch (32 MiB at D = 2048) would
cost more to ship than the features it sums.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from .. import runtime
from ..config import FidSettings, Resources
from ..fidelity.extractors import build_extractor, check_extractor, extract, has_isc, watch_spatial
from ..fidelity.metrics import ISCStats, KeptFeatures, covered, knn_radii, kid_stride
from ..fidelity.paired import id_groups
from ..fidelity.stats import FeatureStats, FIDStats, StatsMismatchError, npz_image_rows, npz_images
from ..progress import Progress
from ..storage import shards as sh

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
STATS_SUFFIXES = (".npz", ".pth", ".pt")
CHUNK_IMAGES = 1024  # images per task for folders and datasets (shards are one task each)


class EvaluateError(ValueError):
    """An evaluation that cannot run as asked (unknown source, empty set, mixed image sizes)."""


@dataclass(frozen=True)
class ImageSource:
    """Where a set of images (or its statistics) comes from."""

    kind: str  # "shards" | "folder" | "dataset" | "stats"
    location: str

    @classmethod
    def parse(cls, spec: str) -> "ImageSource":
        from tarflow.data import BUILTIN_DATASETS

        spec = str(spec)
        if spec.endswith(STATS_SUFFIXES):
            return cls("stats", spec.removeprefix("file://"))
        if spec in BUILTIN_DATASETS:
            return cls("dataset", spec)
        if "://" in spec and not spec.startswith("file://"):
            return cls("shards", spec)
        path = Path(spec.removeprefix("file://")).expanduser()
        if (path / sh.MANIFEST_NAME).is_file():
            return cls("shards", spec)
        if path.is_dir():
            return cls("folder", str(path))
        raise EvaluateError(f"{spec!r} is neither a shard set (a directory or URI with {sh.MANIFEST_NAME}), an image "
                            f"folder, a dataset name ({', '.join(BUILTIN_DATASETS)}) nor statistics "
                            f"({', '.join(STATS_SUFFIXES)})")


@dataclass
class PassStats:
    """What a pass keeps of a set of images; `+` merges disjoint parts in any order."""

    features: FeatureStats
    isc: ISCStats | None  # None: the extractor has no class logits
    kid: KeptFeatures
    size: tuple[int, int]  # (H, W) of every image
    # precision/recall's feature rows: (first index, object reference) per task, in Ray's object store (owned by
    # the actor that made them: used while the pool lives); empty when not asked for
    rows: list[tuple[int, object]] = field(default_factory=list)
    spatial: FeatureStats | None = None  # sFID's statistics; None when not asked for or not given by the network
    # FID's statistics per jackknife group of sample ids (`fidelity.paired.id_groups`); None when not asked for
    groups: list[FeatureStats] | None = None

    def __add__(self, other: "PassStats") -> "PassStats":
        if other.size != self.size:
            raise EvaluateError(f"images of sizes {self.size} and {other.size} in one set")
        isc = None if self.isc is None or other.isc is None else self.isc + other.isc
        spatial = None if self.spatial is None or other.spatial is None else self.spatial + other.spatial
        groups = None if self.groups is None or other.groups is None else [
            a + b for a, b in zip(self.groups, other.groups)]
        return PassStats(self.features + other.features, isc, self.kid + other.kid, self.size,
                         sorted(self.rows + other.rows, key=lambda r: r[0]), spatial, groups)

    def fid_stats(self, extractor: str, dataset: str) -> FIDStats:
        return FIDStats.from_features(self.features, extractor, self.size, dataset, self.kid, self.spatial)


class FeatureWorker(runtime.Worker):
    """Loads the extractor once; turns a unit of images into a `PassStats`, and computes precision/recall's
    blocks against the rows the pool's passes kept."""

    def __init__(self, settings: FidSettings, groups: int, threads: int):
        super().__init__(threads)
        self.groups = groups
        self.extractor = build_extractor(settings.extractor, settings.weights, str(self.device), isc=True)
        self.batch_size, self.kid_samples = settings.batch_size, settings.kid_samples
        self.keep_rows = "prc" in settings.metrics
        self.spatial = watch_spatial(self.extractor) if "sfid" in settings.metrics else None

    def _reduce(self, batches, offset: int, num_images: int, where: str) -> PassStats:
        """The images `offset`, `offset` + 1, ... of a set of `num_images`, batch by batch."""
        total, index, rows = None, offset, []
        stride = kid_stride(num_images, self.kid_samples)
        for images in batches:
            layers = extract(self.extractor, images)
            at = np.arange(index, index + len(images))
            groups = None
            if self.groups:  # the batch's statistics are their groups' sum: each outer product made once
                group = id_groups(at, num_images, self.groups)
                groups = [FeatureStats.of(layers[0][group == k]) for k in range(self.groups)]
            part = PassStats(FeatureStats.of(layers[0]) if groups is None else functools.reduce(operator.add, groups),
                             ISCStats.of(layers[1], at, num_images) if has_isc(self.extractor) else None,
                             KeptFeatures.of(layers[0], index, stride), tuple(int(s) for s in images.shape[1:3]),
                             spatial=None if self.spatial is None else FeatureStats.of(self.spatial()),
                             groups=groups)
            try:
                total = part if total is None else total + part
            except EvaluateError as e:
                raise EvaluateError(f"{where}: {e}") from None
            if self.keep_rows:
                rows.append(np.asarray(layers[0], np.float32))
            index += len(images)
        if total is None:
            raise EvaluateError(f"{where} holds no images")
        if rows:
            total.rows = [(offset, ray.put(np.concatenate(rows)))]
        return total

    def shard(self, uri: str, entry: sh.ShardEntry, num_images: int):
        """One manifest shard, its size, checksum and rows verified before any image counts."""
        pngs = sh.read_shard(uri, entry, ["image"]).column("image").combine_chunks().field("bytes")
        batches = (np.stack([sh.decode_png(b.as_py()) for b in pngs[i:i + self.batch_size]])
                   for i in range(0, len(pngs), self.batch_size))
        return self._reduce(batches, entry.first_id, num_images, f"shard {uri}/{entry.file}")

    def files(self, paths: list[str], offset: int, num_images: int):
        from PIL import Image

        def load(path):
            with Image.open(path) as img:
                array = np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))
            return array[:, :, None] if array.ndim == 2 else array

        batches = (np.stack([load(p) for p in paths[i:i + self.batch_size]])
                   for i in range(0, len(paths), self.batch_size))
        return self._reduce(batches, offset, num_images, f"images {paths[0]}..{paths[-1]}")

    def array(self, images: np.ndarray, offset: int, num_images: int):
        batches = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
        return self._reduce(batches, offset, num_images, "image array")

    def npz(self, path: str, start: int, stop: int, num_images: int):
        """Images start..stop-1 of an ADM reference batch's `arr_0`, read here from the file."""
        images = npz_image_rows(path, start, stop)
        batches = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
        return self._reduce(batches, start, num_images, f"{path} arr_0[{start}:{stop}]")

    # `block` arrives as its rows (Ray resolves a reference given as an argument); `blocks`, a list, as references,
    # fetched one at a time
    def radii(self, block: np.ndarray, blocks: list) -> np.ndarray:
        """k-NN radii of one block's rows within their set (`blocks`: references to all of its blocks)."""
        return knn_radii(block, (_fetch(b) for b in blocks))

    def covered(self, block: np.ndarray, blocks: list, radii: list[np.ndarray]) -> int:
        """Rows of one block inside the other set's manifold (its blocks' references and radii)."""
        return covered(block, ((_fetch(b), r) for b, r in zip(blocks, radii)))


def _fetch(ref) -> np.ndarray:
    try:
        return ray.get(ref)
    except ray.exceptions.ObjectLostError:
        raise EvaluateError("features kept for precision/recall were lost with the worker that held them (it "
                            "died): run the evaluation again") from None


def check_shards(location: str) -> sh.Manifest:
    """The manifest of a complete shard set whose every listed shard is there with its listed size: what a
    pass would otherwise find only on reaching the shard (hours in, at 50k images on a GPU)."""
    sh.shard_paths(location)
    return sh.read_manifest(location)


@dataclass
class Work:
    """The tasks of one source as (worker method, args), a description of its images and their number:
    made from the source's listing alone (a manifest, a folder, a dataset), so bad input is found before
    any Ray starts."""

    units: list[tuple]
    description: str
    num_images: int

    @classmethod
    def of(cls, source: ImageSource, image_size: tuple[int, int] | None = None) -> "Work":
        if source.kind == "shards":
            manifest = check_shards(source.location)
            return cls([(FeatureWorker.shard, (source.location, e, manifest.num_samples)) for e in manifest.shards],
                       source.location, manifest.num_samples)
        if source.kind == "folder":
            root = Path(source.location)
            paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not paths:
                raise EvaluateError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            return cls([(FeatureWorker.files, (paths[i:i + CHUNK_IMAGES], i, len(paths)))
                        for i in range(0, len(paths), CHUNK_IMAGES)], str(root), len(paths))
        if source.kind == "dataset":
            from tarflow.data import load_dataset

            size = None if image_size is None else image_size[0]
            images = sh.to_uint8(load_dataset(source.location, image_size=size).images.numpy())
            # chunks go to the object store with their task (Ray puts large arguments there itself)
            return cls([(FeatureWorker.array, (images[i:i + CHUNK_IMAGES], i, len(images)))
                        for i in range(0, len(images), CHUNK_IMAGES)], f"{source.location} (all {len(images)} images)",
                       len(images))
        if source.kind == "stats":
            found = npz_images(source.location) if source.location.endswith(".npz") else None
            if found is not None:
                count = found[0]
                return cls([(FeatureWorker.npz, (source.location, i, min(i + CHUNK_IMAGES, count), count))
                            for i in range(0, count, CHUNK_IMAGES)], f"{source.location} (arr_0: {count} images)",
                           count)
        raise EvaluateError(f"a {source.kind} source has no images to extract")


class FeaturePool:
    """Extractor actors, started once and used for every image source of an evaluation."""

    def __init__(self, settings: FidSettings = FidSettings(), resources: Resources = Resources(),
                 progress: bool | None = False, groups: int = 0):
        """`groups` > 0: every pass also keeps FID's statistics per group of sample ids (`PassStats.groups`)."""
        check_extractor(settings.extractor, settings.weights)
        runtime.connect()
        self.settings, self.progress = settings, progress
        self.pool = runtime.ActorPool(FeatureWorker, (settings, groups), resources, "fid")

    def __enter__(self) -> "FeaturePool":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.close()

    def run(self, source: ImageSource | str | Work, image_size: tuple[int, int] | None = None) -> tuple[PassStats, str]:
        """(PassStats, description) of one source (or its `Work`, made beforehand), merged in the driver as
        tasks finish.

        `image_size` resizes a dataset to it; other sources must already have it (else an error)."""
        source = ImageSource.parse(source) if isinstance(source, str) else source
        work = source if isinstance(source, Work) else Work.of(source, image_size)
        description = work.description
        total = None
        with Progress(work.num_images, f"features ({self.settings.extractor})", "img", self.progress) as bar:
            for _, part in self.pool.map_unordered(work.units):
                try:
                    total = part if total is None else total + part
                except EvaluateError as e:
                    raise EvaluateError(f"{description}: {e}") from None
                bar.update(part.features.count)
        if image_size is not None and tuple(total.size) != tuple(image_size):
            raise StatsMismatchError(f"{description} holds {total.size[0]}x{total.size[1]} images, the samples are "
                                     f"{image_size[0]}x{image_size[1]}: compare images of one size")
        return total, description

    def precision_recall(self, samples: PassStats, reference: PassStats) -> tuple[float, float]:
        """(precision, recall) of the samples against the reference from the rows their passes kept: the share of
        samples inside the reference's k-NN manifold, and of reference images inside the samples'. Exact (every
        row against every row), block by block in the pool: the driver holds references and radii only."""
        def radii(blocks: list) -> list[np.ndarray]:
            found = dict(self.pool.map_unordered((FeatureWorker.radii, (b, blocks)) for b in blocks))
            return [found[i] for i in range(len(blocks))]

        def share_inside(blocks: list, others: list, their_radii: list[np.ndarray], count: int) -> float:
            units = ((FeatureWorker.covered, (b, others, their_radii)) for b in blocks)
            return sum(n for _, n in self.pool.map_unordered(units)) / count

        mine, theirs = [r for _, r in samples.rows], [r for _, r in reference.rows]
        my_radii, their_radii = radii(mine), radii(theirs)
        return (share_inside(mine, theirs, their_radii, samples.features.count),
                share_inside(theirs, mine, my_radii, reference.features.count))

    def stats(self, source: ImageSource | str, image_size: tuple[int, int] | None = None) -> FIDStats:
        """FID statistics (with KID's subset) of one source; see `run`."""
        total, description = self.run(source, image_size)
        return total.fid_stats(self.settings.extractor, description)


def compute_stats(source: ImageSource | str, settings: FidSettings, resources: Resources = Resources(),
                  image_size: tuple[int, int] | None = None) -> FIDStats:
    """FID statistics of one image source with a pool of its own (see `FeaturePool.stats`)."""
    with FeaturePool(settings, resources) as pool:
        return pool.stats(source, image_size)
