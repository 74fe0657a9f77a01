"""Run folders: exclusive ``version_N`` folders (``RunLogger``), resume in place, the newest ``last.ckpt``."""

from __future__ import annotations

import glob
import os

from lightning.pytorch.loggers import TensorBoardLogger


def claim_version_folder(root: str, first: int = 0) -> int:
    """Create ``<root>/version_N`` exclusively for the smallest N >= ``first`` no one has; return N.

    ``os.mkdir`` fails if the folder exists, so two runs started at the same moment never share one.
    """
    os.makedirs(root, exist_ok=True)
    version = first
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{version}"))
            return version
        except FileExistsError:
            version += 1


def find_last_checkpoint(logs_root: str) -> tuple[str, int] | None:
    """The most recently written ``<logs_root>/version_N/checkpoints/last.ckpt`` and its N, or None."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(logs_root), "version_*", "checkpoints", "last.ckpt")):
        suffix = os.path.basename(os.path.dirname(os.path.dirname(path)))[len("version_") :]
        if suffix.isdigit():
            found.append((os.path.getmtime(path), int(suffix), path))
    if not found:
        return None
    _, version, path = max(found)
    return path, version


class RunLogger(TensorBoardLogger):
    """TensorBoard logger whose ``version_N`` folder is claimed exclusively (``claim``) or resumed (``resume``).

    Until one of them is called it behaves as Lightning's TensorBoardLogger (a ``version`` given to the
    constructor is used as given).
    """

    def __init__(self, save_dir: str = ".", name: str | None = "lightning_logs", version: int | str | None = None,
                 **kwargs) -> None:
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self._chosen_version: int | str | None = version

    @property
    def version(self) -> int | str:
        if self._chosen_version is None:
            return super().version
        return self._chosen_version

    def claim(self) -> None:
        """Take the next free ``version_N`` with an exclusive ``mkdir`` (a version given by the user is kept)."""
        if self._chosen_version is None:
            self._chosen_version = claim_version_folder(self.root_dir)

    def resume(self, version: int) -> None:
        """Write into the existing ``version_<version>`` folder of an interrupted run."""
        self._chosen_version = version


