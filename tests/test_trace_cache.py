"""The trace cache (`opd_jax.trace_cache`): a fresh `CachedJit` on the same directory (what a
second process sees) reads the exported program instead of tracing it and returns the bits
`jax.jit` returns; any change to what the trace reads (a bound knob, a closed-over array, a
static argument, a shape, dtype or sharding) is a new entry, never a stale one; what cannot be
keyed reliably is traced as usual."""

import functools
import json
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax import trace_cache
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRACES = []


class Out(NamedTuple):
  y_B: jax.Array
  aux: dict


def model(scale, x_BxD, params, mode):
  TRACES.append(mode)
  h_BxH = jnp.tanh(x_BxD @ params["w_DxH"] + params["b_H"]) * scale
  y_B = h_BxH.sum(-1) if mode == "sum" else h_BxH.mean(-1)
  return Out(y_B, {"norm": jnp.sqrt(jnp.sum(h_BxH**2)), "nothing": None})


def with_offset(offset_H):
  def fn(x_BxD, params, mode):
    return model(1.0, x_BxD, {**params, "b_H": params["b_H"] + offset_H}, mode)
  return fn


@pytest.fixture
def traces_dir(tmp_path, monkeypatch):
  """An empty cache directory, and this module's functions fingerprinted (as opd_jax's are)."""
  monkeypatch.setattr(trace_cache, "directory", lambda: tmp_path / "traces")
  monkeypatch.setattr(trace_cache, "_TRUSTED_PACKAGES",
                      trace_cache._TRUSTED_PACKAGES | {__name__.split(".")[0]})
  TRACES.clear()
  return tmp_path / "traces"


def _mesh():
  return jax.make_mesh((8,), ("d",))


def _inputs(seed=0, b=16, d=8, h=4, dtype=np.float32):
  rng = np.random.default_rng(seed)
  mesh = _mesh()
  x = jax.device_put(rng.normal(size=(b, d)).astype(dtype), NamedSharding(mesh, P("d")))
  params = {"w_DxH": rng.normal(size=(d, h)).astype(np.float32),
            "b_H": rng.normal(size=(h,)).astype(np.float32)}
  params = jax.device_put(params, NamedSharding(mesh, P()))
  return x, params


def _make(fn, **kw):
  mesh = _mesh()
  kw.setdefault("in_shardings", (NamedSharding(mesh, P("d")), NamedSharding(mesh, P())))
  kw.setdefault("out_shardings", NamedSharding(mesh, P()))
  return trace_cache.CachedJit(fn, name="model", static_argnums=(2,), **kw)


def _plain(fn, **kw):
  mesh = _mesh()
  kw.setdefault("in_shardings", (NamedSharding(mesh, P("d")), NamedSharding(mesh, P())))
  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()), static_argnums=(2,), **kw)


def _same_bits(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_fresh_instance_reads_the_program_and_returns_jits_bits(traces_dir):
  fn = functools.partial(model, 2.0)
  x, params = _inputs()
  first = _make(fn)
  got_first = first(x, params, "sum")
  assert (first.exports, first.loads, len(TRACES)) == (1, 0, 1)
  assert len(list(traces_dir.glob("*.jaxexp"))) == 1
  second = _make(fn)   # another process: nothing in memory
  got_second = second(x, params, "sum")
  assert (second.exports, second.loads, len(TRACES)) == (0, 1, 1)   # not traced again
  got_second_again = second(x, params, "sum")
  want = _plain(fn)(x, params, "sum")
  for got in (got_first, got_second, got_second_again):
    assert isinstance(got, Out) and got.aux["nothing"] is None
    _same_bits(got, want)
    assert got.y_B.sharding == NamedSharding(_mesh(), P())
  assert second._cache_size() == 1


def test_donation_and_abstract_compile_ahead(traces_dir):
  fn = functools.partial(model, 0.5)
  x, params = _inputs(1)
  want = _plain(fn)(x, params, "mean")
  _make(fn, donate_argnums=(0,))(x, params, "mean")
  assert x.is_deleted()
  warm = _make(fn, donate_argnums=(0,))
  spec = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(_mesh(), P("d")))
  warm.compile(spec, params, "mean")   # from ShapeDtypeStructs, as the loop compiles ahead
  x2, _ = _inputs(1)
  got = warm(x2, params, "mean")
  assert (warm.loads, warm.exports) == (1, 0) and x2.is_deleted()
  _same_bits(got, want)


@pytest.mark.parametrize("change", ["knob", "closed_over_array", "static_arg", "shape", "dtype",
                                    "in_shardings"])
def test_a_change_to_what_the_trace_reads_is_a_new_entry(traces_dir, change):
  mesh = _mesh()
  base_fn, fn = with_offset(np.zeros(4, np.float32)), None
  x, params = _inputs(2)
  mode, kw = "sum", {}
  _make(base_fn)(x, params, mode)
  if change == "knob":
    base_fn = functools.partial(model, 2.0)
    _make(base_fn)(x, params, mode)
    fn = functools.partial(model, 3.0)
  elif change == "closed_over_array":
    fn = with_offset(np.full(4, 0.25, np.float32))
  elif change == "static_arg":
    mode = "mean"
  elif change == "shape":
    x, params = _inputs(2, b=24)
  elif change == "dtype":
    x = jax.device_put(np.asarray(x, np.float16), NamedSharding(mesh, P("d")))
  elif change == "in_shardings":
    kw["in_shardings"] = (NamedSharding(mesh, P()), NamedSharding(mesh, P()))
    x = jax.device_put(x, NamedSharding(mesh, P()))
  fn = fn or base_fn
  changed = _make(fn, **kw)
  got = changed(x, params, mode)
  assert (changed.loads, changed.exports) == (0, 1), "a stale entry was read"
  want = _plain(fn, **kw)(x, params, mode)
  _same_bits(got, want)


def test_what_cannot_be_keyed_is_traced_as_usual(traces_dir, monkeypatch):
  def notebook_fn(x_BxD, params, mode):
    return model(1.0, x_BxD, params, mode)
  notebook_fn.__module__ = "__main__"   # user code: its callees are not fingerprinted
  x, params = _inputs(3)
  cached = _make(notebook_fn)
  for _ in range(2):
    got = cached(x, params, "sum")
  assert (cached.loads, cached.exports) == (0, 0) and not traces_dir.exists()
  _same_bits(got, _plain(notebook_fn)(x, params, "sum"))
  with pytest.raises(trace_cache.Uncacheable):
    trace_cache.fingerprint(functools.partial(model, jnp.ones(2)))  # a device array bound in


def test_a_damaged_entry_is_exported_again(traces_dir):
  fn = functools.partial(model, 1.5)
  x, params = _inputs(4)
  _make(fn)(x, params, "sum")
  (entry,) = traces_dir.glob("*.jaxexp")
  entry.write_bytes(b"not an exported program")
  again = _make(fn)
  got = again(x, params, "sum")
  assert (again.loads, again.exports) == (0, 1)
  _same_bits(got, _plain(fn)(x, params, "sum"))
  json.loads(entry.with_suffix(".json").read_text())   # rewritten whole
  assert _make(fn).prepare(x, params, "sum")     # and read by the next one


def test_a_second_opd_run_reads_its_programs_and_repeats_the_first_bit_for_bit(
    tmp_path, monkeypatch):
  monkeypatch.setattr(trace_cache, "directory", lambda: epath.Path(tmp_path / "traces"))
  exports = []
  export = trace_cache.CachedJit._export

  def count_export(self, *args):
    exports.append(self.name)
    return export(self, *args)

  monkeypatch.setattr(trace_cache.CachedJit, "_export", count_export)
  spec = str(ROOT / "configs" / "opd.py") + ":smoke"
  over = ["loop.steps=2", "loop.checkpoint_every=0", "loop.eval_every=0", "loop.progress=false",
          "loop.transfer_guard=disallow"]
  rows = []
  for run in ("first", "second"):
    # Each run as a new process: the module-level programs forget what this one (or an earlier
    # test in it) holds.
    for cached in _module_cached_jits():
      cached._entries.clear()
    exports.clear()
    cfg = config_lib.from_config_dict(config_lib.load_config(spec, over))
    loop.run(cfg, tmp_path / run)
    rows.append([{k: v for k, v in r.items() if k.startswith(("train/", "rollout/"))}
                 for r in metrics_lib.read_jsonl(tmp_path / run / "metrics.jsonl")
                 if "train/loss" in r])
    if run == "first":
      assert {"train_step", "sample"} <= set(exports)
  assert exports == []          # the second run traced none of the cached programs
  assert len(rows[0]) == 2 and rows[0] == rows[1]


def _module_cached_jits():
  from opd_jax.models import sampler
  from opd_jax.models import scoring
  from opd_jax.train import rollout
  from opd_jax.train import run_plan
  yield from (sampler._sample, scoring._token_logprobs, scoring._topk_logprobs,
              rollout._reverse_kl, rollout._values, rollout._advantages, rollout.distill_batch)
  run_plan._random_init_fn.cache_clear()
