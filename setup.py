"""Builds the C++ extension greg_fast._C (csrc/) when torch is importable at build time.

Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
``GREG_FAST_MARCH_NATIVE=1`` tunes it for the building machine's CPU (the result may not run on
older CPUs). ``GREG_FAST_NO_EXT=1`` skips the native build; without torch (an isolated build) it
is skipped too. Either way the package works, on the eager backend (``greg-fast info`` says which
backends are active and why the others are not).
"""
import os
import sys
from pathlib import Path

from setuptools import setup


def openmp_link_args() -> list[str]:
    """Link the OpenMP runtime that torch itself loads, never a second one: two runtimes keep two
    thread pools that spin against each other on every parallel region (a training step under
    GrowingReg took 2.7x a plain one that way). Wheels carry it in torch/lib or torch.libs (there
    under a hashed name); a torch built against the system's runtime needs no more than -fopenmp."""
    import torch
    root = Path(torch.__file__).parent
    for folder in (root / "lib", root.parent / "torch.libs"):
        for lib in sorted(folder.glob("libgomp*.so*")):
            return [str(lib), f"-Wl,-rpath,{folder}"]
    return ["-fopenmp"]


ext_modules, cmdclass = [], {}
if os.environ.get("GREG_FAST_NO_EXT", "0") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("greg_fast: torch not importable at build time; skipping the C++ extension "
              "(use pip install --no-build-isolation)", file=sys.stderr)
    else:
        # portable by default (a wheel built with -march=native dies with SIGILL on an older CPU)
        flags = ["-O3", "-fopenmp"] + (["-march=native"] if os.environ.get("GREG_FAST_MARCH_NATIVE") == "1" else [])
        ext_modules = [CppExtension("greg_fast._C", ["csrc/greg_fast.cpp"],
                                    extra_compile_args=flags, extra_link_args=openmp_link_args())]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
