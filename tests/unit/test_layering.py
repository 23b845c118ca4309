"""The layering the code keeps, read from every import statement (module level or inside a function):
the converter never imports the trainer, the model families never import the data pipeline, and the
benchmarks never import the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO

RULES = [  # (files, what they must not import, why)
    (
        "data_tools",
        "trainer",
        "the converter runs without the trainer (and on machines without torch's GPU stack)",
    ),
    (
        "trainer/models",
        "trainer.data",
        "a family describes a model; the data pipeline calls it, not the reverse",
    ),
    (
        "benchmarks",
        "tests",
        "benchmarks run from an installed checkout; shared data helpers live in data_tools.samples",
    ),
]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize(("folder", "forbidden", "why"), RULES)
def test_imports_keep_the_layers(folder: str, forbidden: str, why: str) -> None:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    broken = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in files
        for line, module in imported_modules(path)
        if module == forbidden or module.startswith(forbidden + ".")
    ]
    assert not broken, f"{folder} must not import {forbidden} ({why}):\n" + "\n".join(broken)


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/support (and a family's base classes in tests/families)."""
    broken = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        for line, module in imported_modules(path)
        if module.rsplit(".", 1)[-1].startswith("test_")
    ]
    assert not broken, "import shared helpers from tests/support instead:\n" + "\n".join(broken)


def test_the_rule_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os\n\ndef f():\n    from trainer.data.render import IGNORE\n    return IGNORE\n"
    )
    assert imported_modules(module) == [(1, "os"), (4, "trainer.data.render")]
