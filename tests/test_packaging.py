"""A non-editable wheel holds every module of the source tree: a package missing from pyproject's
list installs fine in editable mode (the tests' own) and breaks only for users."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def source_modules() -> set[str]:
    names = {"greg_fast/" + str(p.relative_to(ROOT / "greg_fast")) for p in (ROOT / "greg_fast").rglob("*.py")}
    return names | {"greg_fast/kernels/" + p.name for p in (ROOT / "kernels").glob("*.py")}


def test_the_wheel_holds_and_imports_every_module(tmp_path):
    env = {"GREG_FAST_NO_EXT": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    # from a clean copy of the sources: a build/ folder left by an earlier build would be packed as it is
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns("build", "*.egg-info", ".git", "runs", "__pycache__", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, env={**env, **_python_env()}, capture_output=True)
    wheel, = tmp_path.glob("greg_fast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packed = {n for n in z.namelist() if n.endswith(".py")}
        z.extractall(tmp_path / "site")
    missing = sorted(source_modules() - packed)
    assert not missing, f"pyproject.toml's packages leave out {missing}"
    modules = [n[:-3].replace("/", ".").removesuffix(".__init__") for n in sorted(packed)]
    # import every module from the unpacked wheel alone (not from this checkout)
    code = ("import importlib, sys; sys.path.insert(0, sys.argv[1]); "
            "[importlib.import_module(m) for m in sys.argv[2:]]; import greg_fast; "
            "assert greg_fast.__file__.startswith(sys.argv[1]), greg_fast.__file__")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), *modules], check=True, cwd=tmp_path,
                   env={**env, **_python_env(), "PYTHONPATH": ""})


def _python_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(("PYENV", "VIRTUAL_ENV", "LD_LIBRARY", "PIP_"))}


def test_pypis_kernels_is_not_shadowed_from_the_repository_root():
    """The root's kernels/ is greg_fast.kernels; imported as ``kernels`` (the root on sys.path, as under
    ``python -m pytest``) it hands the name to PyPI's package, which transformers imports."""
    pytest.importorskip("transformers", reason="transformers (the hf extra) brings PyPI's kernels")
    code = ("import kernels, greg_fast.kernels as ours; from transformers.integrations import hub_kernels; "
            "print(kernels.__file__, ours.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    installed, name = out.split()
    assert Path(installed).resolve().parent != (ROOT / "kernels").resolve() and name == "greg_fast.kernels"
