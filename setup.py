"""Build of aecore: the library, the built-in plugins, the benchmarks and (see csrc/)
its kernels.

The built-in variants in plugins/ install as the package ``aecore_plugins`` and are
registered through the ``aecore.models`` entry-point group, exactly as a third-party
package registers its own; benchmarks/ installs as ``aecore_benchmarks`` so that
``aecore bench`` works for a pip-installed user too.
"""

import os
import re
import shutil
import sys
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
    "sae-topk = aecore_plugins.sae:TopKSAE",
    "sae-batchtopk = aecore_plugins.sae:BatchTopKSAE",
    "sae-matryoshka = aecore_plugins.sae:MatryoshkaSAE",
    "sae-relu = aecore_plugins.sae:ReLUSAE",
    "sae-jumprelu = aecore_plugins.sae:JumpReLUSAE",
]


# --- kernels (csrc/): the CPU extension always, the CUDA one where torch has CUDA ---------


# one C++ standard for every translation unit (CMakeLists.txt and the nvcc check agree)
CXX_STD = "-std=c++20"


def _kernel_extensions():
    """ext_modules and cmdclass for aecore._C (the op schemas), aecore._C_cpu (CPU
    kernels) and aecore._C_cuda (CUDA kernels).

    AECORE_CUDA=0|1 forces the CUDA extension off/on; by default it is built when torch
    has CUDA and nvcc is found. Without torch or a compiler nothing is built and aecore
    runs on its pure-PyTorch reference kernels.
    """
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    csrc = "csrc"
    include = [str(ROOT / csrc)]
    cpu_flags = ["-O3", CXX_STD, "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    exts = [
        cpp_extension.CppExtension(
            "aecore._C",
            [f"{csrc}/ops.cpp"],
            include_dirs=include,
            extra_compile_args={"cxx": ["-O2", CXX_STD]},
        ),
        cpp_extension.CppExtension(
            "aecore._C_cpu",
            [f"{csrc}/cpu/ops_cpu.cpp"],
            include_dirs=include,
            extra_compile_args={"cxx": cpu_flags},
            extra_link_args=["-fopenmp"],
        ),
    ]
    want_cuda = os.environ.get("AECORE_CUDA")
    has_cuda = cpp_extension.CUDA_HOME is not None and shutil.which("nvcc") is not None
    try:
        import torch

        has_cuda = has_cuda and torch.version.cuda is not None
    except ImportError:
        has_cuda = False
    if want_cuda == "1" or (want_cuda is None and has_cuda):
        try:
            exts.append(
                cpp_extension.CUDAExtension(
                    "aecore._C_cuda",
                    [
                        f"{csrc}/cuda/ops_cuda.cpp",
                        f"{csrc}/cuda/rbm_cuda.cu",
                        f"{csrc}/cuda/sparsity_cuda.cu",
                        f"{csrc}/cuda/sae_cuda.cu",
                    ],
                    include_dirs=include,
                    extra_compile_args={"cxx": ["-O3", CXX_STD], "nvcc": ["-O3", CXX_STD]},
                )
            )
        except (OSError, RuntimeError) as exc:  # e.g. no CUDA_HOME
            if want_cuda == "1":
                raise RuntimeError(
                    f"AECORE_CUDA=1 but the CUDA extension cannot be configured: {exc}"
                ) from exc
            print(f"WARNING: not building the CUDA kernels: {exc}", file=sys.stderr)

    # AECORE_STRICT_BUILD=1 (make cuda-check): a kernel that fails to build fails the build
    strict = os.environ.get("AECORE_STRICT_BUILD") == "1"

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed kernel build warns and leaves aecore on its reference kernels."""

        def build_extensions(self):
            self._failed = set()
            try:  # torch checks the compiler here, before any extension is built
                super().build_extensions()
            except Exception as exc:  # no usable compiler: non-fatal
                if strict:
                    raise
                print(
                    f"WARNING: not building aecore's kernels ({exc}); aecore will use its "
                    "pure-PyTorch reference kernels",
                    file=sys.stderr,
                )
                self._failed = {ext.name for ext in self.extensions}
            # what failed is not copied into the package
            self.extensions = [e for e in self.extensions if e.name not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # any compiler failure is non-fatal
                if strict:
                    raise
                print(
                    f"WARNING: building {ext.name} failed ({exc}); aecore will use its "
                    "pure-PyTorch reference kernels",
                    file=sys.stderr,
                )
                self._failed.add(ext.name)

    return exts, {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _kernel_extensions()

setup(
    name="aecore",
    version=VERSION,
    description="Plugin-based autoencoders for PyTorch: fused kernels, ONNX export",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["aecore", "aecore.*"])
    + ["aecore_plugins", "aecore_benchmarks"],
    package_dir={"aecore_plugins": "plugins", "aecore_benchmarks": "benchmarks"},
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
        "sklearn": ["scikit-learn>=1.6"],
        "plots": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": ["aecore = aecore.cli:main"],
        "aecore.models": BUILTIN_MODELS,
    },
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
