"""The package's import structure: every module imports alone, and no two modules import each other in a cycle."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "lora_trainer")
sys.path.insert(0, os.path.join(ROOT, "tools"))

from check_import_cycles import find_cycles, import_graph  # noqa: E402


def test_the_package_has_no_import_cycle():
    assert find_cycles(import_graph(PACKAGE)) == []


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text(
        "import pkg.a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n"
    )
    (package / "d.py").write_text("from pkg import c\n")  # d -> c only: the TYPE_CHECKING import does not count
    assert find_cycles(import_graph(str(package))) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="children are forked from a parent without our modules")
def test_each_module_imports_alone_in_a_fresh_process():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "import_each_module.py"), PACKAGE],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_family_names_a_standalone_adapter_that_imports():
    """Families name their adapters by string (``adapter_class``) to keep adapter -> family one-way; a typo in
    one would only show when that family's model is opened, so every name is resolved here."""
    from lora_trainer.models.adapter import DiffusionAdapter
    from lora_trainer.models.families import FAMILIES
    from lora_trainer.models.families.base import adapter_class

    for family in FAMILIES:
        assert issubclass(adapter_class(family.standalone_adapter), DiffusionAdapter), family.name
