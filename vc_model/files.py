"""Writing output files so that an interrupted write never leaves a file that looks complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path, force: bool = True):
    """Yield a temporary path in the folder of `path`; rename it to `path` only when the block ends cleanly.

    On any exception (KeyboardInterrupt included) the temporary file is removed and nothing is left.
    With force=False an existing `path` raises FileExistsError before anything is written.
    """
    path = Path(path)
    if not force and path.exists():
        raise FileExistsError(f"{path} already exists (use --force to overwrite it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
