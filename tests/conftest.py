"""Test set-up: 8 fake CPU devices and fast-compiling XLA flags (`xla_flags`; set before jax is
imported) and a persistent compile cache."""

import os
import pathlib

import xla_flags  # tests/ has no __init__.py, so pytest puts it on sys.path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                           xla_flags.with_devices(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def _fresh_jax_state():
  """Each test starts with float32 defaults (x64 is only ever enabled locally)."""
  yield
