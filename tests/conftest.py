"""Test set-up: 8 fake CPU devices and fast-compiling XLA flags (`xla_flags`; set before jax is
imported) and a persistent compile cache."""

import os
import pathlib
import re
import subprocess
import sys

import xla_flags  # tests/ has no __init__.py, so pytest puts it on sys.path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                           xla_flags.with_devices(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The backend starts now, so that a test calling the CLI in this process (`cli.main`, whose
# `host_malloc.tune()` acts only before the backend starts) leaves it as every other test finds
# it: asynchronous dispatch, glibc's own settings. CLI subprocesses tune as a user's run does.
jax.devices()


@pytest.fixture(autouse=True)
def _fresh_jax_state():
  """Each test starts with float32 defaults (x64 is only ever enabled locally)."""
  yield


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """A `production_codegen` test runs in a child pytest process compiling as production does
  (`xla_flags.CODEGEN_ENV`; the child runs it in-process). It must pass there, not skip."""
  if pyfuncitem.get_closest_marker("production_codegen") is None or xla_flags.production():
    return None
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, **{xla_flags.CODEGEN_ENV: "production"})
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
       "-rs", pyfuncitem.nodeid], cwd=root, env=env, capture_output=True,
      text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0 and re.search(r"^1 passed in ", out, re.M), (
      f"{pyfuncitem.nodeid} under production codegen: rc {proc.returncode}\n{out[-4000:]}")
  return True
