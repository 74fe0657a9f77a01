"""Run folders and files: exclusive version folders, resume in place, atomic writes with the umask's permissions."""

from __future__ import annotations

import os
import stat

import pytest

from amax_lightning.runs import RunLogger, claim_version_folder, find_last_checkpoint, write_text_atomic


def test_a_new_run_claims_a_version_folder_no_other_run_has(tmp_path, monkeypatch):
    logger = RunLogger(save_dir=str(tmp_path))
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)  # as if another run took version_0 just now
    logger.claim()
    assert logger.version == 1 and (tmp_path / "lightning_logs" / "version_1").is_dir()
    assert logger.log_dir == str(tmp_path / "lightning_logs" / "version_1")
    assert claim_version_folder(str(tmp_path / "lightning_logs")) == 2


def test_a_version_given_by_the_user_or_a_resume_is_used_as_given(tmp_path):
    given = RunLogger(save_dir=str(tmp_path), version=7)
    given.claim()
    assert given.version == 7
    resumed = RunLogger(save_dir=str(tmp_path))
    resumed.resume(3)
    assert resumed.log_dir.endswith("version_3")


def test_find_last_checkpoint_takes_the_newest(tmp_path):
    assert find_last_checkpoint(str(tmp_path)) is None
    for version, mtime in ((0, 100), (4, 300), (2, 200)):
        path = tmp_path / f"version_{version}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert find_last_checkpoint(str(tmp_path)) == (str(tmp_path / "version_4" / "checkpoints" / "last.ckpt"), 4)


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
    from amax_lightning.runs import write_atomic

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "report.md"), fail)
    assert list(tmp_path.iterdir()) == []
