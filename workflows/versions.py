"""What is installed against what the project declares: the floors in `pyproject.toml`, read back from
the installed package's metadata so that they are written in one place.

A resolver can hand a fresh environment a release the code cannot run on (s3fs 0.4.2, from 2019, when
an unrelated package pinned botocore too new for every modern s3fs). Such an environment then fails
deep inside a client call with an AttributeError; `unmet` names the package, the version found and the
floor instead, for the test suite (`tests/test_versions.py`) and for the store layer before it opens a
store.
"""
from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

PROJECT = "tarflow-gs"


def installed(dist: str) -> str | None:
    """The installed version of a distribution, or None if it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def declared(extras: tuple[str, ...] = (), *, base: bool = True) -> list[Requirement]:
    """The project's requirements: the base ones (unless `base=False`) and those of `extras`, an extra
    that names the project's own extras (`test` names `demo,s3,gcs`) expanded. Empty when the project
    is not installed (run from a source tree with PYTHONPATH=.): its floors are then unknown."""
    try:
        lines = metadata.requires(PROJECT) or []
    except metadata.PackageNotFoundError:
        return []
    requirements = [Requirement(line) for line in lines]

    def wanted(req: Requirement, extra: str | None) -> bool:
        """Whether `req` belongs to the base set (extra None) or to `extra`: its marker, evaluated whole (it
        may also name the Python version or platform), holds with no extra, or only with `extra`."""
        if req.marker is None:
            return extra is None
        base = req.marker.evaluate({"extra": ""})
        return base if extra is None else not base and req.marker.evaluate({"extra": extra})

    out, seen, todo = ([r for r in requirements if wanted(r, None)] if base else []), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in requirements:
            if not wanted(req, extra):
                continue
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


def unmet(extras: tuple[str, ...] = (), *, base: bool = True) -> list[str]:
    """One line per declared requirement the environment does not meet: the package, what is installed
    (or that nothing is), what the project needs and the install command that fixes it."""
    fix = f"pip install -U '{PROJECT}[{','.join(extras)}]'" if extras else f"pip install -U {PROJECT}"
    lines = []
    for req in declared(extras, base=base):
        found = installed(req.name)
        try:
            ok = found is not None and req.specifier.contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            have = f"{req.name} {found} is installed" if found else f"{req.name} is not installed"
            lines.append(f"{have}, but {PROJECT} needs {req.name}{req.specifier} ({fix})")
    return lines
