"""XLA flags for the test suite's processes (pytest's own and every process a test starts).

The suite is bound by compilation: its programs run for milliseconds. `COMPILE_FAST`:
  - LLVM at -O0 without its expensive passes (about a third of every compile);
  - XLA CPU's classic elemental emitter for fusions instead of its MLIR fusion emitters (about
    half of what is left: tests/test_train_steps.py 89 s -> 48 s).
The HLO (what is computed, collective order, shardings) is the same program; only the machine
code of each kernel differs. Without fast-math (off in XLA by default) neither pipeline
reassociates floating point; transcendental functions may round differently in the last bit.
The suite passes unchanged under them: its exact comparisons are between processes with the same
flags, the others against references with tolerances.
"""

COMPILE_FAST = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def with_devices(n: int) -> str:
  """XLA_FLAGS with `COMPILE_FAST` and `n` fake CPU devices (pytest's process: 8)."""
  return f"{COMPILE_FAST} --xla_force_host_platform_device_count={n}"
