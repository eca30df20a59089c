"""The test harness itself: settings the suite documents must do what the README says."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from sandbox.blueshift_standin import free_port
from tests.conftest import ROOT


def test_blueshift_test_pg_overrides_the_test_postgresql():
    """A PostgreSQL test run against ``BLUESHIFT_TEST_PG`` reaches that server, not the default one."""
    port = free_port()  # nothing listens there: the run must fail to connect to it
    env = {**os.environ, "BLUESHIFT_TEST_PG": f"postgresql://postgres@127.0.0.1:{port}/postgres"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/plugins/blueshift/test_state.py::test_schema_qualified_staging_table_gets_its_index",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert f"port {port} failed" in output, output[-2000:]


def _imported_top_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_tests_and_bench_share_only_the_sandbox():
    """The harness lives in ``sandbox/``: ``bench/`` never imports ``tests``, ``tests/`` never ``bench``."""
    crossings = [
        f"{path.relative_to(ROOT)} imports {other}"
        for folder, other in (("bench", "tests"), ("tests", "bench"), ("sandbox", "tests"))
        for path in (ROOT / folder).rglob("*.py")
        if other in _imported_top_packages(path)
    ]
    assert crossings == []


def test_the_source_table_is_defined_once():
    """``reconsented_users`` is created from ``sandbox.demo_warehouse.SOURCE_DDL`` only."""
    definitions = [
        str(path.relative_to(ROOT))
        for folder in ("bench", "tests", "sandbox", "plugins", "dags")
        for path in (ROOT / folder).rglob("*.py")
        if re.search(r"CREATE TABLE[^\"']*reconsented_users", path.read_text())
    ]
    assert definitions == ["sandbox/demo_warehouse.py"]
