"""A missing prerequisite skips on a laptop and fails in CI (tests/helpers.py, skip_or_fail):
shown on the Triton tile tests with `import triton` broken, as a broken install breaks it."""
from __future__ import annotations

import re

import pytest

from helpers import broken_import_env, run_cli

pytestmark = pytest.mark.slow
TILE_TEST = "lm_kernels/test_attention.py::test_every_fp32_gpu_tile_is_correct"


@pytest.mark.parametrize("ci", ["", "true"], ids=["laptop", "CI"])
def test_a_broken_triton_skips_on_a_laptop_and_fails_in_ci(tmp_path, ci):
    env = {**broken_import_env(tmp_path, "triton"), "CI": ci}
    res = run_cli("-m", "pytest", "-q", "-ra", "-n", "0", "-p", "no:cacheprovider", "-k", "sm80-D64-0",
                  TILE_TEST, env=env, timeout=300)
    reason = "triton does not import (triton is broken here on purpose (a test shim))"
    if ci:
        assert res.returncode == 1, res.stdout[-3000:]
        # the prerequisite is checked in a fixture, so pytest counts an error at setup
        assert re.search(r"\b1 (failed|error)\b", res.stdout), res.stdout[-3000:]
        assert "CI=true, so a missing prerequisite fails" in res.stdout
    else:
        assert res.returncode == 0, res.stdout[-3000:]
        assert "1 skipped" in res.stdout
    assert reason in res.stdout, res.stdout[-3000:]
