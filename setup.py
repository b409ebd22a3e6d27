"""Build hook: the optional compiled CPU extension from csrc/.

It is a plain C++17/OpenMP shared library loaded with ctypes (tp_kernels/_ext.py), so it needs no torch
headers at build time and builds under pip's build isolation. Instruction sets are chosen at run time
(csrc/dispatch.cpp), so the compile flags are safe for any machine of the target architecture.

It is built when a C++ compiler is present and TP_KERNELS_NO_EXT is unset or 0. A failed build is
reported and skipped (tp_kernels then uses its composed-torch CPU path); it never fails the install.
For development, ``python setup.py build_ext --inplace`` puts the library next to tp_kernels/_ext.py.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

LIB_NAME = "tp_kernels._cpu_kernels"  # -> tp_kernels/_cpu_kernels.so (not a Python module: no ABI tag)
SOURCES = ["csrc/dispatch.cpp", "csrc/routed_lora.cpp", "csrc/gate.cpp", "csrc/attention.cpp",
           "csrc/layer_norm.cpp", "csrc/isa_avx512bf16.cpp", "csrc/isa_avx512.cpp", "csrc/isa_avx2.cpp", "csrc/isa_base.cpp"]
CFLAGS = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast", "-fno-math-errno",
          "-Wall", "-Wno-unknown-pragmas"]
OPENMP = ["-fopenmp"]


class OptionalBuildExt(build_ext):
    """Builds the ctypes library; on any failure, retries without OpenMP, then gives up with a warning."""

    def get_ext_filename(self, ext_name):
        # called with the full dotted name or just its last part, depending on the setuptools code path
        if ext_name.split(".")[-1] == LIB_NAME.split(".")[-1]:
            return os.path.join(*ext_name.split(".")) + ".so"
        return super().get_ext_filename(ext_name)

    def get_export_symbols(self, ext):
        return []  # no PyInit_ entry point: it is loaded with ctypes, not imported

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            return
        except Exception as err:  # noqa: BLE001 - any compiler failure means "build without it"
            first = err
        if OPENMP[0] in ext.extra_compile_args:
            ext.extra_compile_args = [f for f in ext.extra_compile_args if f not in OPENMP]
            ext.extra_link_args = [f for f in ext.extra_link_args if f not in OPENMP]
            try:
                super().build_extension(ext)
                print("tp_kernels: built the CPU extension without OpenMP (single-threaded)", file=sys.stderr)
                return
            except Exception as err:  # noqa: BLE001
                first = err
        print(f"tp_kernels: skipping the optional CPU extension ({first}); "
              "the composed-torch CPU path will be used", file=sys.stderr)


def extensions():
    if os.environ.get("TP_KERNELS_NO_EXT", "0") not in ("", "0") or os.name == "nt":
        return []
    return [Extension(LIB_NAME, sources=SOURCES, depends=["csrc/kernels.h", "csrc/kernels_impl.h", "csrc/common.h"],
                      language="c++", extra_compile_args=CFLAGS + OPENMP, extra_link_args=OPENMP, optional=True)]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
