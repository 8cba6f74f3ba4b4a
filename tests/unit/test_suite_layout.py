"""The test suite's own rules: helpers are imported from tests/support, never from a conftest or a test
module (pytest imports those under names of its own choosing, so importing them again runs them twice or
picks another directory's conftest)."""

from __future__ import annotations

import ast

from tests.support.paths import REPO


def imported_modules(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_no_test_imports_a_conftest_or_a_test_module():
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for module in imported_modules(ast.parse(path.read_text(), str(path))):
            last = module.rpartition(".")[2]
            if last == "conftest" or last.startswith("test_"):
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offenders, "import helpers from tests.support instead:\n" + "\n".join(offenders)


def test_snippets_run_in_children_import_no_test_module():
    """Source run with `python -c` (tests.support.child) is text: check the import lines in it too."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for line in path.read_text().splitlines():
            words = line.split()
            if (
                len(words) >= 2
                and words[0] in ("import", "from")
                and words[1].startswith(("test_", "conftest"))
            ):
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
