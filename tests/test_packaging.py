"""The distribution as a user installs it: the wheel's files, its metadata, the versions.

The wheel is built (``pip wheel --no-deps``) from a copy of the files that go into it, so
leftovers of earlier builds in the checkout cannot reach it.
"""

import email
import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("accel_torch", "accel_jax")


def _pyproject_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.M).group(1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("whl")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_ships_only_the_two_packages(wheel):
    version = _pyproject_version()
    dist_info = f"accel_rmsnorm-{version}.dist-info"
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names} == {*PACKAGES, dist_info}
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names and f"{pkg}/py.typed" in names
    assert f"{dist_info}/licenses/LICENSE" in names
    license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text


def test_wheel_metadata_has_no_framework_without_its_extra(wheel):
    version = _pyproject_version()
    meta = email.message_from_bytes(wheel.read(f"accel_rmsnorm-{version}.dist-info/METADATA"))
    assert meta["Version"] == version and meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    assert base == ["numpy"]
    by_extra: dict[str, list[str]] = {}
    for r in requires:
        if "extra ==" in r:
            extra = re.search(r'extra == "([^"]+)"', r).group(1)
            by_extra.setdefault(extra, []).append(re.match(r"[A-Za-z0-9_.-]+", r).group())
    assert set(meta.get_all("Provides-Extra")) == {"torch", "jax", "bench", "dev", "all"}
    assert set(by_extra["torch"]) == {"torch", "triton"}
    assert set(by_extra["jax"]) == {"jax", "jaxlib", "flax"}
    assert "matplotlib" in by_extra["bench"] and "pytest" in by_extra["dev"]
    triton = next(r for r in requires if r.startswith("triton"))
    assert 'sys_platform == "linux"' in triton  # no Triton wheels elsewhere
    urls = meta.get_all("Project-URL") or []
    assert not [u for u in urls if "example" in u or "TODO" in u or "<" in u]
    assert any(
        c.startswith("Programming Language :: Python :: 3") for c in meta.get_all("Classifier")
    )


@pytest.mark.parametrize("pkg", PACKAGES)
def test_version_agrees_with_the_installed_metadata(pkg):
    if find_spec(pkg.replace("accel_", "")) is None:
        pytest.skip(f"{pkg}'s framework is not installed")
    version = importlib.import_module(pkg).__version__
    assert version == _pyproject_version()
    assert version == importlib.metadata.version("accel-rmsnorm")
