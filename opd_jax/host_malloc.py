"""glibc malloc settings, and synchronous CPU dispatch, that keep XLA's CPU backend from
page-faulting an execution's buffers in again at every call. On by default where JAX computes on
its CPU backend (`$OPD_JAX_HOST_MALLOC`).

XLA gathers an execution's temporaries into one allocation (`memory_analysis().temp_size_in_bytes`)
that the thread running the execution `malloc`s when the call starts and frees when it ends. With
JAX's default asynchronous CPU dispatch that thread is one of the client's workers; glibc serves a
worker's large request from the thread's arena, which cannot grow past 64 MiB, so with a fresh
`mmap`, returned with `munmap` on free: every call maps its temporaries anew and the kernel zeroes
each page on first touch. Measured on a 2-core Xeon: the sampler's batch-1 call faults 49,236
pages, exactly its 192.3 MiB of temporaries, every call; the `small` preset's [8, 256] SFT step
~408,000 pages (1.6 GiB) every step.

`tune()`:
- runs each execution on the thread that calls it (`jax_cpu_enable_async_dispatch=False`): the
  Python thread, whose allocations come from glibc's main arena;
- serves the main arena's large requests from the heap instead of `mmap` (`M_MMAP_MAX` = 0) and
  keeps freed memory mapped (`M_TRIM_THRESHOLD` at its maximum, 2 GiB): the next call reuses the
  pages that are already there (0 faults per step after the first few).
The compiler's threads keep their own arenas, so compilation is as fast as untuned (an earlier
version put every thread in the main arena, `M_ARENA_MAX` = 1: the compiler's threads then
contended for its lock and compiles took 1.3-1.9x as long). Same Xeon, alternated runs: the SFT
step 3.4-3.6 s against 3.7-4.7 s, compile and first step 7.7 s against 7.7-8.6; one
`bench/opd_iteration.py` iteration 1.30-1.42 s against 1.42-1.48; the sampler's batch-1 call
~43 ms of fixed cost against ~80.
What it costs: the calling thread waits for each execution instead of running ahead (host work
no longer overlaps a running step; on the CPU backend both share the cores anyway, and
`train.timing.PhaseClock` times phases either way), and the heap keeps its peak instead of
shrinking between steps.

`$OPD_JAX_HOST_MALLOC`: `on` (the default) tunes a process that computes on the CPU backend
(`$JAX_PLATFORMS` starts with `cpu`, or no TPU / GPU plugin is installed) and leaves an
accelerator host alone; `force` tunes any process; `off` tunes nothing. A `$GLIBC_TUNABLES` that
already sets `glibc.malloc.*` is the user's choice and is kept.

Both settings must precede the CPU backend's start (the dispatch mode is fixed when the client is
made): the `opd-jax` command and the `bench/` scripts call `tune()` first thing; in a notebook,
call `opd_jax.host_malloc.tune()` before the first JAX operation. Called later it changes nothing
and says so.
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
  mode = os.environ.get(ENV, "on").strip().lower()
  if mode not in ("off", "on", "force"):
    raise HostMallocError(f"${ENV}={os.environ[ENV]!r}: expected on, off or force")
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


def _dispatch_on_calling_thread() -> None:
  """The CPU client, once made, runs each execution on the thread that calls it."""
  import jax
  jax.config.update("jax_cpu_enable_async_dispatch", False)


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
  elif mode == "on" and not computes_on_cpu():
    platforms = os.environ.get("JAX_PLATFORMS", "")
    _RESULT = MallocTuning(False, f"an accelerator computes ($JAX_PLATFORMS={platforms!r})"
                           if platforms.strip() else "an accelerator computes (plugins: "
                           f"{', '.join(accelerator_plugins())})")
  elif _backend_started():
    _RESULT = MallocTuning(False, "the JAX backend had started (tune() must come before the "
                           "first JAX computation)")
  else:
    libc = _glibc()
    if libc is None:
      _RESULT = MallocTuning(False, "not glibc")
    elif all(libc.mallopt(param, value) == 1
             for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES))):
      _dispatch_on_calling_thread()
      _RESULT = MallocTuning(True, "executions on the calling thread; its large buffers from "
                             "the heap, freed memory kept")
    else:
      _RESULT = MallocTuning(False, "mallopt refused a setting")
  return _RESULT
