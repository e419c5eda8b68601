"""Builds the C++ extension greg_fast._C (csrc/) when torch is importable at build time.

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
``GREG_FAST_NO_EXT=1`` skips the native build; without torch (an isolated build) it is skipped
too. Either way the package works, on the eager backend (``greg-fast info`` says which are active).
"""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("GREG_FAST_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("greg_fast: torch not importable at build time; skipping the C++ extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
    else:
        flags = ["-O3", "-fopenmp", "-march=native"]
        ext_modules = [CppExtension("greg_fast._C", ["csrc/greg_fast.cpp"],
                                    extra_compile_args=flags, extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
