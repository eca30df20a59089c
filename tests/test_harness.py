"""The test harness itself: settings the suite documents must do what the README says."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, free_loopback_port


def test_blueshift_test_pg_overrides_the_test_postgresql():
    """A PostgreSQL test run against ``BLUESHIFT_TEST_PG`` reaches that server, not the default one."""
    port = free_loopback_port()  # nothing listens there: the run must fail to connect to it
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
