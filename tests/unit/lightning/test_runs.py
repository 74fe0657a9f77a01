"""Run folders: exclusive version folders, resume in place, the newest last.ckpt."""

from __future__ import annotations

import os

from amax_lightning.lightning.runs import RunLogger, claim_version_folder, find_last_checkpoint


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


