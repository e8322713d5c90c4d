"""`python -m mcpf_jax.aot`: the environment of a compile-only process, then the command (`mcpf_jax.aot.cli`)."""

import os

if __name__ == "__main__":
  # A pre-flight only compiles: the runtime backend stays the CPU (never a real chip this host may have), and
  # libtpu, loaded for its compiler, may coexist with other processes that load it.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU VM metadata server to ask: this is not a TPU host
  # ... so libtpu, loading, would print errors about the TPU worker it cannot identify (INVALID_ARGUMENT ...
  # TPU_WORKER_HOSTNAMES, "Failed to find host bounds"). This process is one host of its own, worker 0; the
  # target's hosts come from the topology (get_topology_desc), not from these.
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
  # A deviceless GPU compile cannot autotune, and XLA's Triton GEMM fusions need autotuning to pick their tiles
  # ("Couldn't find output tile sizes"): use its cuBLAS GEMMs, as with autotuning off. A GPU-only flag.
  if "--xla_gpu_enable_triton_gemm" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()

  # The package under its import name, so that its flags are `mcpf_jax.aot`'s.
  from mcpf_jax import aot  # pylint: disable=g-import-not-at-top

  aot.cli()
