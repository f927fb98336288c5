"""XLA flags for the test suite's processes (pytest's own and every process a test starts).

The suite is bound by compilation: its programs run for milliseconds, while LLVM's `-O2` pipeline
and its expensive passes cost about a third of every compile. `COMPILE_FAST` turns both down.
The HLO (what is computed, collective order, shardings) is the same program; only the machine
code of each kernel is less tuned. LLVM never reassociates floating point without fast-math
(off in XLA by default), so results are the ones `-O2` code gives.
"""

COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_devices(n: int) -> str:
  """XLA_FLAGS for a child process with `n` fake CPU devices."""
  return f"{COMPILE_FAST} --xla_force_host_platform_device_count={n}"
