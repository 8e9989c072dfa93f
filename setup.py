"""The optional C++ extension build (project metadata lives in pyproject.toml).

Install with the torch you already have:  pip install --no-build-isolation -e .
The C++ CPU kernels in csrc/ are built with torch's extension tooling when a
compiler is present; a failed or skipped build (TRANSXNET_NO_CPP=1) leaves a
working package that runs the Triton and reference backends.
"""

import glob
import os
import re
import sys

from setuptools import setup


def cxx_standard(torch_version: str) -> str:
    """The C++ standard torch's headers need: C++20 from torch 2.14 on, C++17 before."""
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def cpp_extension():
    if os.environ.get("TRANSXNET_NO_CPP") == "1":
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("transxnet-kernels: torch is not importable at build time; skipping the C++ extension", file=sys.stderr)
        return [], {}
    if not sources:
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Build the C++ kernels if possible; never fail the install because of them."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # e.g. the compiler check before any extension is built
                print(
                    f"transxnet-kernels: C++ extension build failed ({exc}); the cpp backend will be unavailable",
                    file=sys.stderr,
                )
                self._failed = {ext.name for ext in self.extensions}

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # no compiler, no OpenMP, ...: the package falls back
                print(
                    f"transxnet-kernels: C++ extension build failed ({exc}); the cpp backend will be unavailable",
                    file=sys.stderr,
                )
                self._failed = getattr(self, "_failed", set()) | {ext.name}

        def copy_extensions_to_source(self):
            # `--inplace` / editable installs copy the built library next to the sources;
            # an extension that failed to build has nothing to copy.
            failed = getattr(self, "_failed", set())
            built = self.extensions
            self.extensions = [ext for ext in built if ext.name not in failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = built

    ext = CppExtension(
        "transxnet_kernels._C",
        sources,
        extra_compile_args={"cxx": ["-O3", "-fopenmp", cxx_standard(torch.__version__)]},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
