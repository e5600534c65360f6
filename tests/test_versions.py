"""The installed environment meets the floors pyproject.toml declares, and a resolver that hands it a
release below one (s3fs 0.4.2 in a fresh virtualenv, 2026-12-06) fails here, naming the package,
rather than as an AttributeError deep in the lease."""
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from conftest import locked_versions
from workflows import versions
from workflows.storage import files

ROOT = Path(__file__).resolve().parents[1]


def _fake_distribution(where: Path, name: str, version: str) -> None:
    """An installed distribution's metadata, as pip writes it: what importlib.metadata reads first when
    its folder leads sys.path."""
    info = where / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_installed_versions_meet_the_declared_floors():
    declared = {r.name for r in versions.declared(("test",))}
    assert {"torch", "ray", "pyarrow", "pydantic", "s3fs", "gcsfs", "botocore", "moto"} <= declared, \
        "tarflow-gs is not installed (pip install -e '.[test]'): its floors cannot be read"
    unmet = versions.unmet(("test",))
    assert not unmet, "the environment does not meet pyproject.toml's floors:\n" + "\n".join(unmet)


def test_every_dependency_has_a_floor():
    """lowest-direct resolution (.ci/run) takes each direct dependency at its floor: one without a floor
    would resolve to the first release ever published."""
    for req in versions.declared(("test",)):
        assert any(s.operator in (">=", "==", "~=") for s in req.specifier), f"{req} has no floor"


def test_a_client_below_its_floor_is_named_with_the_version_and_the_floor(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "s3fs", "0.4.2")
    monkeypatch.syspath_prepend(str(tmp_path))
    files._client_unmet.cache_clear()
    try:
        assert versions.installed("s3fs") == "0.4.2"
        floor = next(r for r in versions.declared(("s3",), base=False) if r.name == "s3fs").specifier
        unmet = versions.unmet(("test",))
        assert any(line.startswith(f"s3fs 0.4.2 is installed, but tarflow-gs needs s3fs{floor}") for line in unmet)
        # the store layer says so before any request, and says nothing of credentials
        with pytest.raises(files.StoreError) as e:
            files.resolve("s3://bucket/set")
        assert "s3fs 0.4.2 is installed" in str(e.value) and str(floor) in str(e.value)
        assert "pip install -U 'tarflow-gs[s3]'" in str(e.value) and "credentials" not in str(e.value)
        files.resolve("memory://set")  # other stores are not held up by it
    finally:
        files._client_unmet.cache_clear()


def test_a_missing_client_is_named_with_its_floor(monkeypatch):
    monkeypatch.setattr(versions, "installed", lambda dist: None if dist == "gcsfs" else "999")
    assert versions.unmet(("gcs",), base=False) == [
        f"gcsfs is not installed, but tarflow-gs needs gcsfs{versions.declared(('gcs',), base=False)[0].specifier} "
        "(pip install -U 'tarflow-gs[gcs]')"]


def test_the_cluster_image_installs_the_tested_lock():
    """cluster/constraints.txt (written by `bash .ci/run --lock` from the environment its tests passed in)
    pins every package the project declares, in range; the image installs the project under it, and its
    base image's Ray and its CUDA torch are the lock's versions."""
    pins = locked_versions()
    for req in versions.declared(("test",)):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but not locked: bash .ci/run --lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"the lock's {name}=={pins[name]} is not {req}"
    dockerfile = (ROOT / "cluster/Dockerfile").read_text()
    assert "COPY --chown=ray:users cluster/constraints.txt ./constraints.txt" in dockerfile
    assert "pip install --no-cache-dir -c constraints.txt -e '.[s3,gcs]'" in dockerfile
    assert f"FROM rayproject/ray:{pins['ray']}-py311-gpu" in dockerfile
    assert f"torch=={pins['torch']} torchvision=={pins['torchvision']} --index-url" in dockerfile
