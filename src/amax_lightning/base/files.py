"""Files that appear whole or not at all: atomic writes (temp file + rename) with the umask's permissions."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def file_mode() -> int:
    """The permissions a new file gets from the process's umask (typically 0o644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` for a temp file beside ``path``, then rename it over ``path``.

    Readers never see half a file, a failed write leaves no temp file behind, and the file gets the
    permissions the umask gives (``mkstemp`` alone would leave 0600).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    write_atomic(path, write)
