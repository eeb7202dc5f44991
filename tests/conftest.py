"""Fixtures of more than one test file."""

import os
import shutil

import pytest

from moe_cl.data.readers import OFFLINE_ENV
from tests.suite_helpers import compare_tiny

# Tests never reach the network: data sets download on first use by default, so every test
# process (and the commands they start, which inherit it) is marked offline.
os.environ[OFFLINE_ENV] = "1"


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
