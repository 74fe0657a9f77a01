"""The README's "Python API" block runs as written, on the tiny GPT-2 (model, target and sizes swapped in)."""

from __future__ import annotations

import re

from conftest import REPO, TINY_TARGET


def readme_api_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_readme_python_api_block_runs(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    code = readme_api_block()
    swaps = {'"gpt2"': repr(str(tiny_gpt2_dir)),
             '"blocks.8.hook_resid_pre:91"': repr(TINY_TARGET), "max_steps=500": "max_steps=20",
             "null_samples=2000": "null_samples=200"}
    for old, new in swaps.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("torch.Size([3, 5]) tensor(")
    (path_line,) = [line for line in printed if line.startswith("amax_runs/")]
    results = namespace["results"]
    assert results.model == str(tiny_gpt2_dir) and (tmp_path / path_line.split()[0]).is_file()
    assert path_line.split()[0].endswith("results.json")
    assert f"{results.uniqueness.n_unique} of 15 {results.null_model.p_value}" in path_line
    assert float(printed[-1]) == namespace["expected_n_unique"]([0.5, 0.25, 0.25], 5)
