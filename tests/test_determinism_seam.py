"""Framework code reaches time and randomness only through atoll.determinism."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "atoll"
EXEMPT_DIRS = {"determinism", "testing"}
FORBIDDEN = {
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("time", "sleep"),
    ("asyncio", "sleep"),
    ("uuid", "uuid1"),
    ("uuid", "uuid4"),
    ("os", "urandom"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
}
MARKER = "determinism: allowed"


def offences(path: Path) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            module = node.module if isinstance(node, ast.ImportFrom) else None
            if "random" in names or module == "random" or "secrets" in names:
                found.append(f"{path}:{node.lineno}: imports random")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
        if (name, node.func.attr) not in FORBIDDEN:
            continue
        # asyncio.sleep(0) only yields to the loop; it reads no time.
        if node.func.attr == "sleep" and name == "asyncio" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and arg.value == 0:
                continue
        if MARKER in lines[node.lineno - 1]:
            continue
        found.append(f"{path}:{node.lineno}: {name}.{node.func.attr}()")
    return found


def test_framework_code_uses_the_injected_clock_and_random_source():
    files = [p for p in SRC.rglob("*.py") if not EXEMPT_DIRS & set(p.relative_to(SRC).parts)]
    assert len(files) > 20
    problems = [o for f in files for o in offences(f)]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_an_offence(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time, asyncio\nasync def f():\n    time.time()\n    await asyncio.sleep(1)\n"
    )
    assert len(offences(bad)) == 2
