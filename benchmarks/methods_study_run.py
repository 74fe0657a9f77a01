"""The methods study (configs/methods_study.yaml) on a random-weight GPT-2 small, for the closing note and
BENCHMARKS.md: writes the model to a temp folder, runs ``python -m amax_lightning study`` in ``--out`` with any extra
arguments, and prints the table and the wall time.

    python benchmarks/methods_study_run.py --out runs/methods [--trainer.max_steps 100 --trainer.accelerator gpu]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from time_to_result import REPO, write_gpt2_small  # noqa: E402


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "--out":
        raise SystemExit(__doc__)
    out, extra = Path(sys.argv[2]).resolve(), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    from amax_lightning.__main__ import main as amax_main

    with tempfile.TemporaryDirectory() as tmp:
        model = write_gpt2_small(Path(tmp))
        os.chdir(out)
        start = time.perf_counter()
        code = amax_main(["study", "--config", str(REPO / "configs" / "methods_study.yaml"),
                          "--model.model_name_or_path", str(model), *extra])
        print(f"methods study wall time {time.perf_counter() - start:.1f} s, exit {code}", flush=True)


if __name__ == "__main__":
    main()
