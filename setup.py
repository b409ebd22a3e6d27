"""Build hook: the optional compiled CPU extension from csrc/ (see README).

It is a plain C++/OpenMP shared library loaded with ctypes, so it needs no torch
headers at build time and installs under pip's build isolation. It is built when
a C++ compiler is present and TP_KERNELS_NO_EXT is unset; a failed build is
skipped (tp_kernels then uses its composed-torch CPU path).
"""

from setuptools import setup

setup()
