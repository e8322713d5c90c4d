"""Shared test fixtures.

`test_data`: tests/data, the real label files and the 55-image LIVE Challenge miniature the tests read (each source
with its README and licence; tests/data/README.md).
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

TEST_DATA = pathlib.Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def test_data() -> pathlib.Path:
  """tests/data: clive-mini/ (LIVE Challenge miniature) and labels/ (label files of other IQA datasets)."""
  return TEST_DATA
