"""Every kernel test that runs the Triton backend needs triton to import: without it such a test
skips with the reason on a laptop and fails under CI=true (tests/helpers.py, skip_or_fail)."""
import pytest

from helpers import require_triton


@pytest.fixture(autouse=True)
def triton_available(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "triton":
        require_triton()
