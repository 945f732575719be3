"""Under CI (CI=true) a skipped test fails the run (tests/conftest.py); elsewhere it stays a
skip. Checked on a throwaway test file run by pytest with our conftest as its plugin."""

import os

import pytest

from conftest import ROOT, run_python

SKIPPING = """
import pytest

def test_skipped_inside():
    pytest.skip("the data is not here")

@pytest.mark.skipif(True, reason="the schemas are not here")
def test_skipped_by_a_mark():
    pass

def test_passes():
    pass
"""


# A skip by a mark happens in the test's setup: pytest counts that failure as an error.
@pytest.mark.parametrize(
    "ci, expected", [("true", "1 failed, 1 passed, 1 error"), ("", "1 passed, 2 skipped")]
)
def test_a_skip_fails_only_under_ci(tmp_path, ci, expected):
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    result = run_python(
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "conftest",
        tmp_path / "test_skipping.py",
        "--rootdir",
        tmp_path,
        cwd=tmp_path,
        env=dict(os.environ, CI=ci, PYTHONPATH=os.path.join(ROOT, "tests")),
    )
    assert result.stdout.splitlines()[-1].startswith(expected), result.stdout[-2000:]
    assert (result.returncode != 0) == bool(ci)
    if ci:
        assert (
            "skipped under CI=true, where every test must run: Skipped: the data is not here"
            in result.stdout
        )
