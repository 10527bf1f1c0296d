"""Builds trm_fast (with `kernels/` installed as trm_fast.kernels) and the extension trm_fast._C.

The extension always gets its C++ CPU ops; the CUDA ops are added when this torch is a CUDA build and a
CUDA toolkit is found (TRM_FAST_NO_CUDA=1 skips them). If compiling fails, the package still installs
and every op runs on its pure-PyTorch fallback (`python -m trm_fast doctor` says which path is live).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("trm_fast: torch must be installed before building (pip install torch), "
             "and pip needs --no-build-isolation so that the build sees it.")


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    want_cuda = os.environ.get("TRM_FAST_NO_CUDA") != "1"
    if want_cuda and torch.version.cuda is not None and CUDA_HOME is not None:
        print(f"trm_fast: building trm_fast._C with CUDA ({CUDA_HOME})")
        return CUDAExtension("trm_fast._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                             extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
                             libraries=["cublasLt"])
    why = "disabled by TRM_FAST_NO_CUDA" if not want_cuda else (
        "this torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found")
    print(f"trm_fast: building trm_fast._C for CPU only ({why})")
    return CppExtension("trm_fast._C", sources, extra_compile_args={"cxx": cxx_flags})


class BuildWithFallback(BuildExtension):
    """Compiling is optional: on failure, say why and install the pure-PyTorch package (without the failed
    extension in the list of built ones, which an editable install would otherwise try to copy and fail on)."""

    def build_extensions(self):
        self.failed = []
        super().build_extensions()
        self.extensions = [ext for ext in self.extensions if ext not in self.failed]

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # a missing compiler or toolkit raises many different types
            self.failed.append(ext)
            print(f"\ntrm_fast: WARNING: could not build {ext.name} ({type(exc).__name__}: {exc}).\n"
                  "trm_fast installs without it; its ops use the pure-PyTorch fallback.\n", file=sys.stderr)


setup(
    name="trm_fast",
    version="0.1.0",
    description="Generative Tiny Recursion Model with fused Triton kernels and a C++/CUDA extension",
    python_requires=">=3.10",
    packages=["trm_fast", "trm_fast.kernels"],
    package_dir={"trm_fast": "trm_fast", "trm_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithFallback.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.6"], "spm": ["sentencepiece"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["trm-fast=trm_fast.__main__:main"]},
)
