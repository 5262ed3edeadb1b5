"""The README's Python example runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readmes_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README shows no Python example"
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    result = namespace["result"]
    assert len(result.history) == 10 and set(result.final) == {"hospital-0", "hospital-1", "hospital-2"}
    assert all(np.isfinite(m["bacc"]) for m in result.final.values())
    printed = capsys.readouterr().out
    assert "Cleveland" in printed and "hospital-2" in printed
