"""Local files that a crash leaves whole or absent: checkpoints, training states, JSON files, fetched
checkpoints. One way to do it, for all of `tarflow`."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a hidden temporary beside `path`, then rename it over `path` (atomic on one
    filesystem): readers see the old file or the new one, never part of one. The temporary is created
    afresh (O_EXCL, a name no one can guess), so a link planted beside `path` is never written through;
    a link at `path` itself is replaced by the file, its target untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shared checkpoint or plan unreadable to others
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
