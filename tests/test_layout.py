"""The package's layering: library modules never reach up into a command line."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vertjax"
# Modules that define a command line (flags, a main): vertjax.cli and the
# `python -m vertjax.<name>` aliases that only hand over to it.
COMMAND_LINE = {"cli", "main", "data", "ship", "__main__"}


def _top_level_imports(path: Path) -> set[str]:
    """vertjax modules imported at module level (not inside functions or `__main__`)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module == "vertjax":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vertjax."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vertjax.")}
    return found


def _function_imports(path: Path) -> set[str]:
    """vertjax modules imported inside functions (lazy imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module == "vertjax":
                    found |= {alias.name for alias in inner.names}
    return found


LIBRARY = sorted(
    p for p in PACKAGE.rglob("*.py") if p.stem not in COMMAND_LINE and p.stem != "__init__"
)


@pytest.mark.parametrize(
    "path", LIBRARY, ids=lambda p: p.relative_to(PACKAGE).with_suffix("").as_posix()
)
def test_library_modules_do_not_import_a_command_line(path):
    reached = (_top_level_imports(path) | _function_imports(path)) & COMMAND_LINE
    assert not reached, f"{path.name} imports the command-line module(s) {sorted(reached)}"


def test_every_command_line_alias_hands_over_to_the_cli():
    for stem in ("data", "ship", "review/__main__"):
        assert "cli.run_command(" in (PACKAGE / f"{stem}.py").read_text()


def test_the_check_sees_an_import():
    """The scan is not blind: cli's own imports are found."""
    assert {"predict", "report", "datasets"} <= _top_level_imports(PACKAGE / "cli.py")
