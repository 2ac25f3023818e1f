"""The test tree stays importable: pytest's default import mode needs unique basenames."""

from collections import Counter
from pathlib import Path


def test_test_modules_have_unique_names():
    names = Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, count in names.items() if count > 1]


def test_every_package_ships_its_type_marker():
    assert (Path(__file__).parents[1] / "src" / "atoll" / "py.typed").exists()


def test_no_test_imports_from_conftest():
    # Several conftest.py files exist; `from conftest import` picks whichever came first.
    offenders = [
        p.name
        for p in Path(__file__).parent.rglob("*.py")
        if p != Path(__file__) and ("from conftest " in p.read_text())
    ]
    assert not offenders
