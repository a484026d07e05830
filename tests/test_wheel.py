"""The ops library is built on the LibTorch stable ABI (issue 24, part 1): what makes one wheel load
beside every torch from 2.10 on is checked here on the binary itself, and `make wheel`'s command runs.
(`make test-wheel` installs that wheel beside two torch versions; too heavy for this suite.)"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import doe_ext
from doe_ext import _C

ROOT = Path(__file__).parents[1]


def undefined_symbols(path: str) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", path], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(None, 1)[1] for line in out.splitlines() if line.strip()]  # "U name" / "w name"


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_ops_library_calls_torch_through_its_stable_c_shim_only():
    assert _C.__file__.endswith("_C.abi3.so"), _C.__file__
    syms = undefined_symbols(_C.__file__)
    # ATen/c10/torch C++ symbols are what break across torch versions ("undefined symbol" on import).
    cxx_torch = [s for s in syms if re.match(r"^(at|c10|torch|caffe2)::", s)]
    assert cxx_torch == [], cxx_torch[:10]
    torch_c = [s for s in syms if s.startswith(("aoti_torch_", "torch_"))]
    assert "torch_call_dispatcher" in torch_c, torch_c  # the kernels' ATen ops go through the dispatcher
    # Python: only the limited API's module creation (the library has no Python functions).
    assert [s for s in syms if s.startswith("Py")] == ["PyModule_Create2"]


def test_build_info_names_the_stable_abi_and_its_target():
    info = doe_ext.build_info()
    assert info["abi"] == "stable"
    target = tuple(int(x) for x in info["torch_target"].split("."))
    built = tuple(int(x) for x in info["torch_built"].split(".")[:2])
    assert target == (2, 10) and built >= target, info


@pytest.mark.slow
def test_make_wheel_builds_one_wheel_holding_the_abi3_library(tmp_path):
    # make wheel's command (the Makefile adds only `rm -f dist/doe_ext-*.whl` and `-w dist`).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, cwd=ROOT)
    wheels = list(tmp_path.glob("doe_ext-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "doe_ext/_C.abi3.so" in names
    assert any(re.fullmatch(r"doe_ext/_lda\.cpython-\d+-.*\.so", n) for n in names), names
    assert "doe_ext/ops/__init__.py" in names and "doe_ext/selftest.py" in names
    assert "doe_ext_cli/__init__.py" in names  # the `doe-ext` script's entry point, outside the package
    entry = zipfile.ZipFile(wheels[0]).read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert "doe-ext = doe_ext_cli:main" in entry, entry
    metadata = zipfile.ZipFile(wheels[0]).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "Requires-Dist: torch>=2.10" in metadata
