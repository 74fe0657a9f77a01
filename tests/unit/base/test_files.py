"""Atomic writes: the umask's permissions, and nothing left behind by a failed write."""

from __future__ import annotations

import os
import stat

import pytest

from amax_lightning.base.files import write_text_atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_umasks_permissions(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_text_atomic(str(tmp_path / "results.json"), "{}\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_write_leaves_nothing(tmp_path):
    from amax_lightning.base.files import write_atomic

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "report.md"), fail)
    assert list(tmp_path.iterdir()) == []
