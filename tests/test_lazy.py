"""Lazy package exports: every public name resolves, and a CLI start does not load what it
does not run (the reason they are lazy: ``import sparkvision.cli`` took 13.6 s when it did)."""

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["sparkvision.train", "sparkvision.ssl", "sparkvision.retrieval"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves_to_its_module(package: str) -> None:
    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        obj = getattr(pkg, name)
        assert getattr(obj, "__module__", package).startswith(package), name
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        pkg.no_such_name  # noqa: B018


def test_cli_start_leaves_the_heavy_modules_unloaded() -> None:
    heavy = [
        "torchvision",
        "fastapi",
        "sqlalchemy",
        "matplotlib",
        "sklearn",
        "scipy",
        "sparkvision.train.engine",
        "sparkvision.web.app",
        "sparkvision.retrieval.search",
    ]
    code = f"import sys, sparkvision.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
