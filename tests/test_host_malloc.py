"""opd_jax.host_malloc: the decision (env, accelerator plugins, the user's GLIBC_TUNABLES, a
backend already started) and the effect it exists for (a jitted call with a large temporary stops
page-faulting it every call)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from opd_jax import host_malloc

# A fresh process: tunes (or not, per $OPD_JAX_HOST_MALLOC) before jax starts, then runs a jitted
# function with a 256 MiB temporary and reports the fewest minor page faults of 12 calls (a tuned
# process may still fault a temporary in for a few calls, when the block it would reuse is
# still held by the previous call; untuned, every call faults it in) and the dispatch mode.
_CHILD = textwrap.dedent("""
    import json, resource
    from opd_jax import host_malloc
    result = host_malloc.tune()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.exp(x)[:, ::-1] * 2.0, axis=0))
    x = jnp.ones((4096, 16384))
    for _ in range(3):   # the heap grows to the program's working set, then stops
      f(x).block_until_ready()
    faults = []
    for _ in range(12):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": result.applied, "reason": result.reason,
                      "faults": min(faults),
                      "synchronous": not jax.config.read("jax_cpu_enable_async_dispatch")}))
""")


def _child(mode: str | None) -> dict:
  """The child's report, `$OPD_JAX_HOST_MALLOC` set to `mode` (None: unset, the default)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", host_malloc.ENV)}
  env["JAX_PLATFORMS"] = "cpu"
  if mode is not None:
    env[host_malloc.ENV] = mode
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_stops_faulting_its_buffers_every_call():
  off, on = _child("off"), _child(None)   # unset: on
  assert not off["applied"] and off["reason"].startswith(f"${host_malloc.ENV}=off")
  assert on["applied"], on["reason"]
  assert on["synchronous"] and not off["synchronous"]
  # Untuned, each call maps its 256 MiB temporary anew (65,536 pages at 4 KiB, zeroed on first
  # touch); tuned, the freed pages stay mapped and a later call reuses them (measured: ~98,000
  # faults in every call untuned; tuned, 0-5 in most calls).
  assert off["faults"] > 50_000, off
  assert on["faults"] < 0.1 * off["faults"], (on, off)


@pytest.fixture
def fresh(monkeypatch):
  """tune() forgets the process's first result and sees the environment the test sets, as if
  the JAX backend had not started; mallopt and the dispatch setting are replaced by recorders
  (the test process keeps its own settings)."""
  calls = []

  class FakeLibc:
    def mallopt(self, param, value):
      calls.append((param, value))
      return 1

  monkeypatch.setattr(host_malloc, "_RESULT", None)
  monkeypatch.setattr(host_malloc, "_glibc", FakeLibc)
  monkeypatch.setattr(host_malloc, "_backend_started", lambda: False)
  monkeypatch.setattr(host_malloc, "_dispatch_on_calling_thread",
                      lambda: calls.append("synchronous dispatch"))
  for name in (host_malloc.ENV, "GLIBC_TUNABLES", "JAX_PLATFORMS"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_force_sets_no_mmap_keep_freed_synchronous_dispatch(fresh, monkeypatch):
  monkeypatch.setenv(host_malloc.ENV, "force")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")   # 'force' tunes whatever computes
  result = host_malloc.tune()
  assert result.applied
  # No M_ARENA_MAX: the compiler's threads keep their own arenas.
  assert fresh == [(host_malloc.M_MMAP_MAX, 0), (host_malloc.M_TRIM_THRESHOLD, 2 ** 31 - 1),
                   "synchronous dispatch"]
  # Once per process: a second call returns the first result and calls nothing.
  assert host_malloc.tune() is result and len(fresh) == 3


def test_on_by_default_off_and_users_tunables_leave_malloc_alone(fresh, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_malloc.tune().applied   # unset: on
  assert len(fresh) == 3
  fresh.clear()
  monkeypatch.setattr(host_malloc, "_RESULT", None)
  monkeypatch.setenv(host_malloc.ENV, "off")
  assert not host_malloc.tune().applied
  monkeypatch.setattr(host_malloc, "_RESULT", None)
  monkeypatch.setenv(host_malloc.ENV, "on")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
  result = host_malloc.tune()
  assert not result.applied and "GLIBC_TUNABLES" in result.reason
  assert fresh == []


def test_after_the_backend_started_nothing_changes(fresh, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(host_malloc, "_backend_started", lambda: True)
  result = host_malloc.tune()
  assert not result.applied and "backend had started" in result.reason
  assert fresh == []


def test_refused_mallopt_leaves_dispatch_alone(fresh, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")

  class RefusingLibc:
    def mallopt(self, param, value):
      fresh.append((param, value))
      return 0

  monkeypatch.setattr(host_malloc, "_glibc", RefusingLibc)
  result = host_malloc.tune()
  assert not result.applied and "refused" in result.reason
  assert "synchronous dispatch" not in fresh


def test_on_tunes_cpu_only(fresh, monkeypatch):
  monkeypatch.setenv(host_malloc.ENV, "on")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  result = host_malloc.tune()
  assert not result.applied and "JAX_PLATFORMS='cuda,cpu'" in result.reason
  assert fresh == []
  monkeypatch.setattr(host_malloc, "_RESULT", None)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_malloc.tune().applied


def test_accelerator_plugins_found_without_importing_them(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  plugin = tmp_path / "jax_plugins" / "xla_fake_accel"
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text("raise RuntimeError('imported')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)
  assert "xla_fake_accel" in host_malloc.accelerator_plugins()
  assert not host_malloc.computes_on_cpu()


def test_bad_mode_names_the_variable(fresh, monkeypatch):
  monkeypatch.setenv(host_malloc.ENV, "yes")
  with pytest.raises(ValueError, match=r"\$OPD_JAX_HOST_MALLOC='yes'"):
    host_malloc.tune()


def test_cli_refuses_a_bad_mode_in_one_line(fresh, monkeypatch, capsys, tmp_path):
  from opd_jax import cli
  monkeypatch.setenv(host_malloc.ENV, "yes")
  code = cli.main(["train", "--config", "configs/sft.py:smoke", "--workdir", str(tmp_path)])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err.splitlines() == [err] and "$OPD_JAX_HOST_MALLOC='yes'" in err and "Traceback" not in err
