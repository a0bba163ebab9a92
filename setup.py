"""Build of aecore: the library, the built-in plugins and (see csrc/) its kernels.

The built-in variants in plugins/ install as the package ``aecore_plugins`` and are
registered through the ``aecore.models`` entry-point group, exactly as a third-party
package registers its own.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "aecore/_version.py").read_text()).group(1)

BUILTIN_MODELS = [
    "ae = aecore_plugins.ae:PlainAutoencoder",
    "denoising = aecore_plugins.denoising:DenoisingAutoencoder",
    "sparse = aecore_plugins.sparse:SparseAutoencoder",
    "conv = aecore_plugins.conv:ConvAutoencoder",
    "vae = aecore_plugins.vae:VariationalAutoencoder",
    "rbm = aecore_plugins.rbm:RBM",
    "deep = aecore_plugins.deep:DeepAutoencoder",
]

setup(
    name="aecore",
    version=VERSION,
    description="Plugin-based autoencoders for PyTorch: fused kernels, ONNX export",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aecore", "aecore.*"]) + ["aecore_plugins"],
    package_dir={"aecore_plugins": "plugins"},
    install_requires=[
        # older torch has known torch.load code-execution holes
        "torch>=2.10",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        "runtime": ["numpy>=1.24", "onnxruntime>=1.18"],
        "sklearn": ["scikit-learn>=1.3"],
        "plots": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": ["aecore = aecore.cli:main"],
        "aecore.models": BUILTIN_MODELS,
    },
)
