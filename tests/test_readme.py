"""The README's examples run as written."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def python_block(after_heading: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_is_exactly_two_commands():
    quick = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```sh\n(.*?)```", quick, re.S).group(1).strip().splitlines()
    assert [c.split("#")[0].strip() for c in commands] == ["make demo", "make test"]


def test_python_api_example_runs(tmp_path):
    code = python_block("## Python API")
    ran = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (tmp_path / "runs" / "ae" / "model.json").exists()
    assert (tmp_path / "ae.onnx").exists()
