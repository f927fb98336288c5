"""opd_jax.host_malloc: the decision (env, accelerator plugins, the user's GLIBC_TUNABLES) and the
effect it exists for (a jitted call with a large temporary stops page-faulting it every call)."""

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
# still held by the previous call; untuned, every call faults it in).
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
                      "faults": min(faults)}))
""")


def _child(mode: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
  env[host_malloc.ENV] = mode
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_process_stops_faulting_its_buffers_every_call():
  off, on = _child("off"), _child("on")
  assert not off["applied"] and off["reason"].startswith(f"${host_malloc.ENV}=off")
  assert on["applied"], on["reason"]
  # Untuned, each call maps its 256 MiB temporary anew (65,536 pages at 4 KiB, zeroed on first
  # touch); tuned, the freed pages stay mapped and a later call reuses them (measured: ~98,000
  # faults in every call untuned; tuned, 0-5 in most calls).
  assert off["faults"] > 50_000, off
  assert on["faults"] < 0.1 * off["faults"], (on, off)


@pytest.fixture
def fresh(monkeypatch):
  """tune() forgets the process's first result and sees the environment the test sets;
  mallopt is replaced by a recorder (the test process keeps its own settings)."""
  calls = []

  class FakeLibc:
    def mallopt(self, param, value):
      calls.append((param, value))
      return 1

  monkeypatch.setattr(host_malloc, "_RESULT", None)
  monkeypatch.setattr(host_malloc, "_glibc", FakeLibc)
  for name in (host_malloc.ENV, "GLIBC_TUNABLES", "JAX_PLATFORMS"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_force_sets_main_arena_no_mmap_keep_freed(fresh, monkeypatch):
  monkeypatch.setenv(host_malloc.ENV, "force")
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")   # 'force' tunes whatever computes
  result = host_malloc.tune()
  assert result.applied
  assert sorted(fresh) == sorted([(host_malloc.M_ARENA_MAX, 1), (host_malloc.M_MMAP_MAX, 0),
                                  (host_malloc.M_TRIM_THRESHOLD, 2 ** 31 - 1)])
  # Once per process: a second call returns the first result and calls nothing.
  assert host_malloc.tune() is result and len(fresh) == 3


def test_off_default_and_users_tunables_leave_malloc_alone(fresh, monkeypatch):
  assert not host_malloc.tune().applied   # unset: off
  monkeypatch.setattr(host_malloc, "_RESULT", None)
  monkeypatch.setenv(host_malloc.ENV, "off")
  assert not host_malloc.tune().applied
  monkeypatch.setattr(host_malloc, "_RESULT", None)
  monkeypatch.setenv(host_malloc.ENV, "on")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
  result = host_malloc.tune()
  assert not result.applied and "GLIBC_TUNABLES" in result.reason
  assert fresh == []


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
