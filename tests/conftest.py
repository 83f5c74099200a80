import inspect
import os
import sys

import pytest

# tests/hf_tiny.py is imported by name from every test file
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Source that shows a test (or a fixture it uses) runs transformers, the oracle.
_ORACLE_SIGNS = ("transformers", "save_hf", "make_hf")


def _uses_oracle(item) -> bool:
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        funcs += [d.func for d in defs]
    for f in funcs:
        try:
            src = inspect.getsource(f)
        except (OSError, TypeError):
            continue
        body = src.split('"""', 2)[-1] if src.count('"""') >= 2 else src  # not the docstring
        if any(s in body for s in _ORACLE_SIGNS):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """`oracle`: needs transformers (found from the test's and its fixtures' source); `kernels`: the
    C kernels' tests. `slow` is set where the test is written."""
    for item in items:
        if _uses_oracle(item):
            item.add_marker(pytest.mark.oracle)
        if item.module.__name__ == "test_kernels" or "kernel" in item.name:
            item.add_marker(pytest.mark.kernels)


@pytest.fixture(scope="module")
def http(server):
    """An HTTP client of the module's `server` (a serve_helpers.start_server), sending its API key."""
    import httpx

    key = server.state.api_key
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        yield c
