"""Human-readable views of a results dict: the per-seed summary table, and atomic file writing."""

from __future__ import annotations

import json
import os
import tempfile


def summary_markdown(results: dict) -> str:
    """A markdown table (seed, tokens, cosines, final activation, decoded activation) and the uniqueness line."""
    lines = [
        f"target {results['target']} of {results['model']}, {results['steps']} steps, lr {results['lr']}",
        "",
        "| seed | tokens | cosine | final activation | decoded activation |",
        "|---:|---|---|---:|---:|",
    ]
    for run in results["runs"]:
        tokens = " ".join(json.dumps(t) for t in run["tokens"])
        cosines = " ".join(f"{c:.3f}" for c in run["cosine"])
        lines.append(
            f"| {run['seed']} | {tokens} | {cosines} | {run['final_activation']:.4g} | {run['decoded_activation']:.4g} |"
        )
    u = results["uniqueness"]
    repeated = [f"{json.dumps(t)} x{c}" for t, c in zip(u["tokens"], u["counts"]) if c > 1]
    lines += ["", f"unique tokens: {u['n_unique']} of {u['n_total']}" + (f" (repeated: {', '.join(repeated)})" if repeated else "")]
    return "\n".join(lines)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
