"""The persistent XLA compilation cache, on by default: a second run of the same shapes loads its
executables instead of compiling them (the explorer's loop: change a knob, run a few steps).

Location: `$OPD_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/opd_jax/xla` (default
`~/.cache/opd_jax/xla`). `OPD_JAX_CACHE_DIR=off` disables it. A cache directory the caller already
configured (`jax.config.jax_compilation_cache_dir`, e.g. the test suite's) is kept. JAX writes each
entry atomically, so concurrent processes (several hosts, parallel runs) share it safely.
"""

from __future__ import annotations

import os

import jax


def default_dir() -> str | None:
  env = os.environ.get("OPD_JAX_CACHE_DIR")
  if env is not None:
    return None if env.strip().lower() in ("", "off", "0", "none") else env
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "opd_jax", "xla")


def enable(path: str | None = None) -> str | None:
  """Turns the persistent cache on (unless already configured or disabled); returns its dir."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = path or default_dir()
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program: a warm start is otherwise a string of small compiles (RNG seeding,
  # fold-ins, the MFU peak's matmul: 0.01-0.2 s each), where reading an entry takes milliseconds.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
