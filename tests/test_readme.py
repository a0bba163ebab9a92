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


def test_scikit_learn_example_runs():
    code = python_block("The same models as a scikit-learn transformer")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]


def test_anomaly_example_runs(tmp_path):
    code = python_block("Anomaly detection with PyOD's conventions")
    ran = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (tmp_path / "zeros.onnx").exists()


def test_plugin_example_matches_the_one_the_tests_install():
    """The README's plugin is the plugin tests/plugin_example ships (minus its docstring)."""
    shipped = (
        Path(__file__).parent / "plugin_example" / "aecore_example_plugin" / "__init__.py"
    ).read_text()
    readme = python_block("## Writing a plugin")
    for line in (
        "class TinyAutoencoder(aecore.Autoencoder):",
        'return {**self.base_config(), "bias": self.bias}',
        "self.enc = nn.Linear(self.input_size, latent_dim, bias=bias)",
    ):
        assert line in shipped and line in readme
