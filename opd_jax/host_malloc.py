"""Opt-in glibc malloc settings that keep XLA's CPU backend from page-faulting its large buffers
in again at every execution; they trade slower compilation for faster steps.

XLA's CPU client allocates an execution's large buffers (temporaries, outputs) with `malloc` from
its worker threads and frees them when the execution ends. glibc serves a large request from a
worker thread's arena with a fresh `mmap` and returns it with `munmap` on free (a thread arena
cannot grow past 64 MiB; `mmap_max` and the trim threshold bind the main arena only), so every
step maps its buffers anew and the kernel zeroes each page on first touch. Measured on a 2-core
Xeon: the `small` preset's [8, 256] SFT step faults ~470,000 pages (1.8 GiB) in every step.

`tune()` makes every thread allocate from the main arena (`M_ARENA_MAX` = 1), serves large
requests from the heap instead of `mmap` (`M_MMAP_MAX` = 0) and keeps freed memory mapped
(`M_TRIM_THRESHOLD` at its maximum, 2 GiB): a later step reuses pages that are already there
(0 faults per step in most steps). What it costs, same machine:
- compilation runs 1.3-1.9x slower (the compiler's threads share the one arena's lock: the
  [8, 256] SFT step's compile 3.9-5.2 s untuned, 6.9-7.5 s tuned);
- the process's resident memory stays at its peak instead of shrinking between steps.
What it gains: `bench/train_step.py` `fraction_of_peak` 0.47-0.55 untuned against 0.605-0.62
tuned (README), while a decode loop (`bench/sampler.py`, `bench/rollout.py`), whose buffers are
small, moved within the machine's noise. A long run whose programs come from the persistent
compile cache gains; a short cold run, or the test suite (hundreds of compiles), loses. Hence off
by default.

`$OPD_JAX_HOST_MALLOC`: `off` (default); `on` tunes a process that computes on the CPU backend
(`$JAX_PLATFORMS` starts with `cpu`, or no TPU / GPU plugin is installed) and leaves an
accelerator host's allocator alone; `force` tunes any process. A `$GLIBC_TUNABLES` that already
sets `glibc.malloc.*` is the user's choice and is kept.

It acts on threads that have not allocated yet, so it must run before the first JAX computation
(XLA's threads take their arena when the CPU backend starts): the `opd-jax` command and the
`bench/` scripts call `tune()` first thing; in a notebook, call `opd_jax.host_malloc.tune()`
(with the variable set) before the first JAX operation.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import pkgutil
import sys

from opd_jax.errors import UserError

# mallopt parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): freed memory up to this stays mapped.
KEEP_BYTES = 2 ** 31 - 1

ENV = "OPD_JAX_HOST_MALLOC"


class HostMallocError(UserError, ValueError):
  """`$OPD_JAX_HOST_MALLOC` holds a value other than off / on / force."""


@dataclasses.dataclass(frozen=True)
class MallocTuning:
  """What `tune` did: `applied` (the settings are in force) and why (one line)."""
  applied: bool
  reason: str


_RESULT: MallocTuning | None = None


def _mode() -> str:
  mode = os.environ.get(ENV, "off").strip().lower()
  if mode not in ("off", "on", "force"):
    raise HostMallocError(f"${ENV}={os.environ[ENV]!r}: expected off, on or force")
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
    _RESULT = MallocTuning(False, f"${ENV}=off (the default)")
  elif "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
    _RESULT = MallocTuning(False, "$GLIBC_TUNABLES sets glibc.malloc.* (kept)")
  elif mode == "on" and not computes_on_cpu():
    platforms = os.environ.get("JAX_PLATFORMS", "")
    _RESULT = MallocTuning(False, f"an accelerator computes ($JAX_PLATFORMS={platforms!r})"
                           if platforms.strip() else "an accelerator computes (plugins: "
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
