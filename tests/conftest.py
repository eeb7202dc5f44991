"""Fixtures of more than one test file."""

import shutil

import pytest

from tests.suite_helpers import compare_tiny


@pytest.fixture(scope="session")
def finished_suite(tmp_path_factory):
    """A compare folder with naive-class and ewc-class finished for seed 0 (in this process,
    one run after the other)."""
    out = tmp_path_factory.mktemp("finished")
    assert compare_tiny(out, "--only", "naive", "ewc") == 0
    return out


@pytest.fixture
def suite_out(finished_suite, tmp_path):
    """A copy of ``finished_suite`` to change."""
    out = tmp_path / "out"
    shutil.copytree(finished_suite, out)
    return out
