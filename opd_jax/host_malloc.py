"""glibc malloc settings that keep XLA's CPU backend from page-faulting its buffers every step.

XLA's CPU client allocates each execution's large buffers (temporaries, outputs) with `malloc`
from its worker threads and frees them when the execution ends. glibc serves a large request
from a worker thread's arena with a fresh `mmap` and returns it with `munmap` on free (a thread
arena cannot grow past 64 MiB, and the `mmap_max` limit applies to the main arena only), so
every step maps its buffers anew and the kernel zeroes every page on first touch: measured on a
2-core Xeon, a `small`-preset [8, 256] training step spent ~1 s of system time per step in page
faults (4.4M minor faults over `bench/train_step.py`), and a jitted function with a 512 MiB
temporary 370 ms per call against 210 ms once the memory stays mapped.

`tune()` makes every thread allocate from the main arena (`M_ARENA_MAX` = 1), serves large
requests from the heap instead of `mmap` (`M_MMAP_MAX` = 0) and keeps freed memory mapped
(`M_TRIM_THRESHOLD` at its maximum, 2 GiB), so the next step reuses pages that are already
there. The cost: the process's resident memory stays at its peak instead of shrinking between
steps, and every thread shares one arena's lock (XLA allocates a few buffers per op, so no lock
contention was measurable).

It acts on threads that have not allocated yet: call it before the first JAX computation
(XLA's worker threads take their arena when the CPU backend starts). The `opd-jax` command, the
`bench/` scripts and the test suite call it first thing; in a notebook, call
`opd_jax.host_malloc.tune()` before the first JAX operation.

`$OPD_JAX_HOST_MALLOC`: `auto` (default) tunes a process that computes on the CPU backend
(`$JAX_PLATFORMS` starts with `cpu`, or no TPU / GPU plugin is installed) and leaves an
accelerator host's allocator alone; `on` always tunes; `off` never does. A `$GLIBC_TUNABLES`
that already sets `glibc.malloc.*` is the user's choice and is kept.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import pkgutil
import sys

# mallopt parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): freed memory up to this stays mapped.
KEEP_BYTES = 2 ** 31 - 1

ENV = "OPD_JAX_HOST_MALLOC"


@dataclasses.dataclass(frozen=True)
class MallocTuning:
  """What `tune` did: `applied` (the settings are in force) and why (one line)."""
  applied: bool
  reason: str


_RESULT: MallocTuning | None = None


def _mode() -> str:
  mode = os.environ.get(ENV, "auto").strip().lower()
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"${ENV}={os.environ[ENV]!r}: expected auto, on or off")
  return mode


def accelerator_plugins() -> tuple[str, ...]:
  """Installed JAX accelerator plugins, found without importing them: `libtpu` and the PJRT
  plugins of the `jax_plugins` namespace (CUDA, ROCm, ...)."""
  found = ["libtpu"] if importlib.util.find_spec("libtpu") is not None else []
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    found += sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
  return tuple(found)


def computes_on_cpu() -> bool:
  """Whether JAX will compute on its CPU backend, decided without starting a backend:
  `$JAX_PLATFORMS` starting with `cpu`, or (unset) no accelerator plugin installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not accelerator_plugins()


def _backend_started() -> bool:
  jax = sys.modules.get("jax")
  if jax is None:
    return False
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def _glibc():
  """The process's glibc with `mallopt`, or None (not Linux / not glibc)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
  except (OSError, AttributeError):
    return None


def tune() -> MallocTuning:
  """Applies the settings once per process (module docstring); later calls return the first
  call's result."""
  global _RESULT
  if _RESULT is not None:
    return _RESULT
  mode = _mode()
  if mode == "off":
    _RESULT = MallocTuning(False, f"${ENV}=off")
  elif "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    _RESULT = MallocTuning(False, "$GLIBC_TUNABLES sets glibc.malloc.* (kept)")
  elif mode == "auto" and not computes_on_cpu():
    _RESULT = MallocTuning(False, "an accelerator computes (plugins: "
                           f"{', '.join(accelerator_plugins())})")
  else:
    libc = _glibc()
    if libc is None:
      _RESULT = MallocTuning(False, "not glibc")
    else:
      ok = all(libc.mallopt(param, value) == 1 for param, value in (
          (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES)))
      late = " (after the JAX backend started: its threads keep their arenas)" \
          if _backend_started() else ""
      _RESULT = MallocTuning(ok, ("main arena, no mmap, freed memory kept" + late) if ok
                             else "mallopt refused a setting")
  return _RESULT
