"""Every module of lightcook.app imports on its own in a fresh interpreter (no import circle hides
behind an import order that happens to work), and ``from lightcook.app import train`` still works."""

import subprocess
import sys

import pytest

from tests.helpers import REPO

MODULES = sorted(
    f"lightcook.app.{p.stem}".removesuffix(".__init__") for p in (REPO / "lightcook" / "app").glob("*.py")
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone_in_a_fresh_interpreter(module):
    code = f"import importlib; importlib.import_module({module!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_package_api():
    from lightcook.app import CONFIG_DIR, compose_config, train
    from lightcook.app.train import train as train_function

    assert train is train_function and callable(compose_config) and CONFIG_DIR.is_dir()
    assert "lightcook.app.__init__" not in MODULES and "lightcook.app.train" in MODULES
