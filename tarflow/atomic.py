"""Local files that a crash leaves whole or absent: checkpoints, training state, JSON files, fetched
checkpoints. One way to do it, for all of `tarflow`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a hidden temporary beside `path`, then rename it over `path` (atomic on one
    filesystem): readers see the old file or the new one, never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
