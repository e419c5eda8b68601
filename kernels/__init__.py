"""Triton kernels of greg_fast (installed as ``greg_fast.kernels``); nothing here touches a GPU at
import time, so the package imports on CPU-only machines and under ``TRITON_INTERPRET=1``."""
if __name__ == "kernels":
    # Imported by that name only where the repository root is on sys.path (``python -m pytest``, a
    # script run from the root), where this folder shadows PyPI's ``kernels``, which transformers
    # imports: hand the name over to the installed one (the import system returns what sys.modules
    # holds once this runs).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or ".") != _here])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this folder is greg_fast.kernels, not PyPI's kernels)",
                                  name="kernels")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed
    _spec.loader.exec_module(_installed)
