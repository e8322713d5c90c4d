"""Shared test fixtures.

`../shared/data` (beside the checkout) holds real label files and the 55-image LIVE Challenge miniature. Tests
that need it use the `shared_data` fixture: when the folder is missing they FAIL with a message saying so,
unless MCPF_ALLOW_MISSING_SHARED_DATA=1, in which case they are skipped (still reported, never passed).
"""

import os
import pathlib
import tempfile

import pytest

# The tests run on the CPU backend. requirements-test.txt installs libtpu (jax[tpu]) for the ahead-of-time
# compiles of tests/test_aot.py, which only use it as a compiler; without this, jax would try to initialise it as
# the default backend of every test process (and, on a machine with chips, take them).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole session (the xdist workers and the train.py / eval.py
# subprocesses inherit it): many tests compile the same tiny models, and CPU compiles dominate the suite's time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mcpf_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("MCPF_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  if not (SHARED_DATA / "clive-mini").is_dir() or not (SHARED_DATA / "labels").is_dir():
    msg = (f"shared test data not found at {SHARED_DATA} (expected clive-mini/ and labels/ there; set "
           "MCPF_SHARED_DATA to its location)")
    if os.environ.get("MCPF_ALLOW_MISSING_SHARED_DATA") == "1":
      pytest.skip(msg)
    pytest.fail(msg)
  return SHARED_DATA
