"""The code shape the README promises a newcomer: a short operator, short functions, one home per default."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PLUGINS = ROOT / "plugins" / "blueshift"
MAX_FUNCTION_LINES = 50
MAX_OPERATOR_LINES = 200


def test_the_operator_module_stays_a_coordinator():
    lines = len((PLUGINS / "operators.py").read_text().splitlines())
    assert lines < MAX_OPERATOR_LINES, f"operators.py has {lines} lines: move machinery to the sender or hook"


def test_no_function_in_plugins_is_longer_than_fifty_lines():
    long_functions = []
    for path in sorted(PLUGINS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    long_functions.append(f"{where} {node.name} ({length} lines)")
    assert long_functions == []


def test_defaults_are_written_once_in_settings():
    """The defaults users may change live in ``Settings`` only: the DAG, operator and hook read them."""
    defaults = ['"blueshift_default"', '"warehouse_default"', "50.0"]
    found = {
        default: sorted(
            str(path.relative_to(ROOT))
            for folder in ("plugins", "dags")
            for path in (ROOT / folder).rglob("*.py")
            if default in path.read_text()
        )
        for default in defaults
    }
    assert found == {default: ["plugins/blueshift/settings.py"] for default in defaults}
