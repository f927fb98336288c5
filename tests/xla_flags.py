"""XLA flags for the test suite's processes (pytest's own and every process a test starts).

The suite is bound by compilation: its programs run for milliseconds. `COMPILE_FAST`:
  - LLVM at -O0 without its expensive passes (about a third of every compile);
  - XLA CPU's classic elemental emitter for fusions instead of its MLIR fusion emitters (about
    half of what is left: tests/test_train_steps.py 89 s -> 48 s).
The HLO (what is computed, collective order, shardings) is the same program; only the machine
code of each kernel differs. Without fast-math (off in XLA by default) neither pipeline
reassociates floating point; transcendental functions may round differently in the last bit.
Exact comparisons between two different programs (the continuous or compact sampler against
the static one, bit for bit) hold under production codegen but not always under `COMPILE_FAST`
(measured: under -O0 with the classic emitter together, not under either alone, two samplers'
log-probs differed in the last bit once the decode step wrote its caches before reading them).
Such a test carries `@pytest.mark.production_codegen`: conftest reruns it in a child pytest
process without `COMPILE_FAST` (`CODEGEN_ENV`). Every other exact comparison is between
processes with the same flags, the others against references with tolerances.
"""

import os

COMPILE_FAST = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


# Set (to "production") in the process that reruns a `production_codegen` test (conftest).
CODEGEN_ENV = "OPD_JAX_TEST_CODEGEN"


def production() -> bool:
  """Whether this process compiles as production does (no `COMPILE_FAST`)."""
  return os.environ.get(CODEGEN_ENV) == "production"


def with_devices(n: int) -> str:
  """XLA_FLAGS with `COMPILE_FAST` (unless `production()`) and `n` fake CPU devices (pytest's
  process: 8)."""
  fast = "" if production() else COMPILE_FAST + " "
  return f"{fast}--xla_force_host_platform_device_count={n}"
