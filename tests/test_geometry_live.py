"""geometry/live.py (the in-loop monitor) against float64 numpy: bf16-visible density (overall and
per module type), Frobenius norm, stable rank and Sim_K of the attention updates; sharded on a
fake 8-device mesh and compiled once; several points in a row on an 8-device mesh (in a child
process, under a timeout: a batched LAPACK call used to leave that program waiting forever)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import geometry_reference as ref
import xla_flags
from opd_jax.geometry import live, matrices

K = 4
CFG = live.LiveGeometryConfig(every=1, k=K, subspace_iters=6, oversample=6)


def _base(rng, d=32, layers=2):
  n = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
  return {"embed": {"embedding": n(64, d)},
          "layers": {"attn": {"q_proj": {"kernel": n(layers, d, d)},
                              "k_proj": {"kernel": n(layers, d, 16)},
                              "v_proj": {"kernel": n(layers, d, 16)},
                              "o_proj": {"kernel": n(layers, d, d)}},
                     "mlp": {"up_proj": {"kernel": n(layers, d, 48)}},
                     "input_norm": {"scale": np.ones((layers, d), np.float32)}}}


def _moved(rng, p0, scale):
  """p0 + a decaying-spectrum update on the attention kernels (rank 8, singular values 0.5^i:
  the shape real updates have) + sparse small noise elsewhere (some of it below a bf16 ulp)."""
  out = jax.tree.map(np.copy, p0)
  for mod in out["layers"]["attn"].values():
    w = mod["kernel"]
    lead, (m, n) = w.shape[:1], w.shape[1:]
    a = np.linalg.qr(rng.standard_normal(lead + (m, 8)))[0]
    b = np.linalg.qr(rng.standard_normal(lead + (n, 8)))[0]
    mod["kernel"] = (w + scale * (a * 0.5 ** np.arange(8)) @ np.swapaxes(b, -1, -2)).astype(
        np.float32)
  for path in (("embed", "embedding"), ("layers", "mlp", "up_proj", "kernel")):
    leaf = out
    for p in path[:-1]:
      leaf = leaf[p]
    w = leaf[path[-1]]
    mask = rng.random(w.shape) < 0.3
    leaf[path[-1]] = (w + mask * w * rng.choice([1e-4, 1e-1], w.shape)).astype(np.float32)
  return out


def _reference(p0, p1, prev_p1=None):
  """float64 numpy: density overall / per type; per attention type the layer means of
  ||dW||_F, stable rank and Sim_K against prev_p1's update."""
  out, changed, total = {}, {}, {}
  for m0, m1 in zip(matrices.named_matrices(p0, include_1d=True),
                    matrices.named_matrices(p1, include_1d=True)):
    c = ref.relative_changed(np.asarray(m0.array), np.asarray(m1.array))
    changed[m0.module_type] = changed.get(m0.module_type, 0) + int(c.sum())
    total[m0.module_type] = total.get(m0.module_type, 0) + c.size
  out["geometry/density"] = sum(changed.values()) / sum(total.values())
  for t in changed:
    out[f"geometry/density/{t}"] = changed[t] / total[t]
  prev = ({m.name: m for m in matrices.named_matrices(prev_p1, types=matrices.ATTENTION_TYPES)}
          if prev_p1 is not None else None)
  acc = {}
  for m0, m1 in zip(matrices.named_matrices(p0, types=matrices.ATTENTION_TYPES),
                    matrices.named_matrices(p1, types=matrices.ATTENTION_TYPES)):
    d = np.asarray(m1.array, np.float64) - np.asarray(m0.array, np.float64)
    u, s, _ = np.linalg.svd(d, full_matrices=False)
    row = acc.setdefault(m0.module_type, {"frobenius": [], "stable_rank": [], "sim_k": []})
    row["frobenius"].append(np.sqrt((d * d).sum()))
    row["stable_rank"].append((s ** 2).sum() / s[0] ** 2)
    if prev is not None:
      dp = np.asarray(prev[m0.name].array, np.float64) - np.asarray(m0.array, np.float64)
      up = np.linalg.svd(dp, full_matrices=False)[0]
      k = min(K, *d.shape)
      row["sim_k"].append(np.sum((up[:, :k].T @ u[:, :k]) ** 2) / k)
  for t, row in acc.items():
    for name, vals in row.items():
      if vals:
        out[f"geometry/{name}/{t}"] = float(np.mean(vals))
  return out


def _assert_close(got, want):
  assert set(want) <= set(got), sorted(set(want) - set(got))
  for k, v in want.items():
    tol = 1e-6 if k.startswith("geometry/density") else 1e-4   # counts exact; f32 ratio
    np.testing.assert_allclose(got[k], v, rtol=tol, atol=1e-6, err_msg=k)


def test_live_metrics_match_float64_numpy_and_sim_k_needs_a_previous_point():
  rng = np.random.default_rng(0)
  p0 = _base(rng)
  p1 = _moved(rng, p0, 0.05)
  p2 = _moved(np.random.default_rng(1), p0, 0.07)
  monitor = live.make_monitor(CFG)
  m1, bases = monitor(p0, p1, live.init_bases(p0, CFG))
  bases = jax.tree.map(np.asarray, bases)   # kept on the host: the monitor donates its input
  got1 = live.to_host(m1)
  assert not any(k.startswith("geometry/sim_k/") for k in got1)   # no previous point yet
  _assert_close(got1, _reference(p0, p1))
  assert 0 < got1["geometry/density/embed"] < 0.3 < got1["geometry/density/q"]
  m2, _ = monitor(p0, p2, jax.tree.map(np.asarray, bases))
  _assert_close(live.to_host(m2), _reference(p0, p2, prev_p1=p1))
  m3, _ = monitor(p0, p1, bases)   # the same update as the previous point: Sim_K = 1
  got3 = live.to_host(m3)
  for t in matrices.ATTENTION_TYPES:
    assert got3[f"geometry/sim_k/{t}"] == pytest.approx(1.0, abs=1e-4)


def test_sharded_on_a_fake_8_device_mesh_and_compiled_once():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(2)
  p0 = _base(rng)
  specs = {"embed": {"embedding": P("tensor", "fsdp")},
           "layers": {"attn": {k: {"kernel": P(None, "fsdp", "tensor")}
                               for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
                      "mlp": {"up_proj": {"kernel": P(None, "fsdp", "tensor")}},
                      "input_norm": {"scale": P(None, "fsdp")}}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, P))
  replicated = NamedSharding(mesh, P())
  monitor = live.make_monitor(CFG, replicated=replicated)
  origin = jax.device_put(p0, shardings)
  bases = jax.device_put(live.init_bases(p0, CFG), replicated)
  updates = [_moved(np.random.default_rng(10 + i), p0, 0.05) for i in range(2)]
  plain = live.make_monitor(CFG)
  prev = live.init_bases(p0, CFG)
  for p in updates:
    metrics, bases = monitor(origin, jax.device_put(p, shardings), bases)
    want, prev = plain(p0, p, prev)
    got = live.to_host(metrics)
    assert set(got) == set(live.to_host(want))
    for k, v in live.to_host(want).items():
      np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
  assert monitor._cache_size() == 1   # the second point reuses the first one's executable


MESH_POINTS = 5
MESH_TIMEOUT_S = 120
# The default block width (k + oversample = 24) on matrices of the tiny preset's width (64): a
# batched SVD of these is large enough for jaxlib 0.10 to split it over the intra-op pool (the
# monitor's batched SVDs never finished here: 4 of 4 child runs timed out before the first point).
MESH_CFG = live.LiveGeometryConfig(every=1, k=K, subspace_iters=6, oversample=20)


def _mesh_inputs():
  """Origin and MESH_POINTS updated parameters at the tiny preset's width (64)."""
  p0 = _base(np.random.default_rng(3), d=64, layers=2)
  return p0, [_moved(np.random.default_rng(20 + i), p0, 0.05 * (i + 1)) for i in range(MESH_POINTS)]


def _mesh_child() -> None:
  """Runs in a process of 8 fake devices: the monitor as the loop runs it (parameters sharded
  over fsdp x tensor, outputs replicated, the bases carried from point to point and donated), one
  JSON line of metrics per point (NaN as null)."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  p0, points = _mesh_inputs()
  spec = lambda x: P(*(None,) * (x.ndim - 2), "fsdp", "tensor")  # noqa: E731
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x) if x.ndim >= 2 else P()), p0)
  replicated = NamedSharding(mesh, P())
  monitor = live.make_monitor(MESH_CFG, replicated=replicated)
  origin = jax.device_put(p0, shardings)
  bases = jax.device_put(live.init_bases(p0, MESH_CFG), replicated)
  for p in points:
    metrics, bases = monitor(origin, jax.device_put(p, shardings), bases)
    got = {k: float(v) for k, v in jax.device_get(metrics).items()}
    print(json.dumps({k: (None if np.isnan(v) else v) for k, v in got.items()}), flush=True)
  assert monitor._cache_size() == 1


def test_several_points_on_an_8_device_mesh_match_one_device_and_float64_numpy():
  env = dict(os.environ, XLA_FLAGS=xla_flags.with_devices(8),
             JAX_PLATFORMS="cpu")
  if jax.config.jax_compilation_cache_dir:   # the suite's persistent cache, in the child too
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(
        jax.config.jax_persistent_cache_min_compile_time_secs)
  tests = pathlib.Path(__file__).resolve().parent
  try:
    out = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--mesh-child"],
                         env=env, cwd=tests.parent, capture_output=True, text=True,
                         timeout=MESH_TIMEOUT_S)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"the monitor did not finish {MESH_POINTS} points on 8 devices in "
                f"{MESH_TIMEOUT_S} s:\n{(e.stdout or b'')[-2000:]!r}")
  assert out.returncode == 0, out.stderr[-4000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert len(rows) == MESH_POINTS
  p0, points = _mesh_inputs()
  plain = live.make_monitor(MESH_CFG)
  prev = live.init_bases(p0, MESH_CFG)
  for i, (row, p) in enumerate(zip(rows, points)):
    got = {k: (float("nan") if v is None else v) for k, v in row.items()}
    want, prev = plain(p0, p, prev)
    want = {k: float(v) for k, v in want.items()}
    assert set(got) == set(want)
    for k, v in want.items():   # the one-device monitor: the same estimator, another layout
      np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-6, err_msg=f"point {i}: {k}")
    _assert_close(live.to_host(got), _reference(p0, p, points[i - 1] if i else None))
    assert (i == 0) == all(np.isnan(got[f"geometry/sim_k/{t}"]) for t in matrices.ATTENTION_TYPES)


def test_every_lapack_call_of_the_monitor_takes_one_matrix():
  """jaxlib 0.10 splits a batched LAPACK call over the intra-op pool and blocks its thread until
  the pieces finish (the multi-device hang); a call on one matrix runs inline. The compiled
  monitor (sharded like the loop's) holds LAPACK calls, all on rank-2 operands."""
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  p0, _ = _mesh_inputs()
  replicated = NamedSharding(mesh, P())
  monitor = live.make_monitor(MESH_CFG, replicated=replicated)
  shardings = jax.tree.map(
      lambda x: NamedSharding(mesh, P(*(None,) * (x.ndim - 2), "fsdp", "tensor")
                              if x.ndim >= 2 else P()), p0)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          p0, shardings)
  bases = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       live.init_bases(p0, MESH_CFG))
  hlo = monitor.lower(abstract, abstract, bases).compile().as_text()
  calls = [line for line in hlo.splitlines() if "custom_call_target=\"lapack_" in line]
  assert calls
  for line in calls:
    operand = re.search(r"operand_layout_constraints=\{\w+\[([\d,]*)\]", line)
    assert operand is not None, line
    assert operand.group(1).count(",") == 1, line   # [m, n]: no batch dimension


def test_config_is_checked_by_name():
  with pytest.raises(ValueError, match=r"LiveGeometryConfig\.k=0"):
    live.LiveGeometryConfig(k=0)
  assert not live.LiveGeometryConfig().enabled and live.LiveGeometryConfig(every=5).enabled


if __name__ == "__main__" and sys.argv[1:] == ["--mesh-child"]:
  _mesh_child()


def test_traces_for_a_model_with_more_than_2_31_entries():
  # Qwen3-8B's shapes (~7e9 entries, one group alone ~1.8e9): the totals stay Python ints and the
  # counts float32, so nothing reaches int32 at trace time (abstract shapes: nothing allocated).
  L, d, f, kv = 36, 4096, 12288, 1024
  a = lambda *s: jax.ShapeDtypeStruct(s, jax.numpy.bfloat16)  # noqa: E731
  attn = {"q_proj": a(L, d, d), "k_proj": a(L, d, kv), "v_proj": a(L, d, kv), "o_proj": a(L, d, d)}
  mlp = {"gate_proj": a(L, d, f), "up_proj": a(L, d, f), "down_proj": a(L, f, d)}
  params = {"embed": {"embedding": a(151936, d)},
            "layers": {"attn": {k: {"kernel": v} for k, v in attn.items()},
                       "mlp": {k: {"kernel": v} for k, v in mlp.items()},
                       "input_norm": {"scale": a(L, d)}}}
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) > 2 ** 32
  bases = jax.eval_shape(lambda: live.init_bases(params, CFG))
  metrics, _ = jax.eval_shape(lambda p0, p1, b: live._live(p0, p1, b, cfg=CFG), params, params,
                              bases)
  assert metrics["geometry/density"].dtype == np.float32
  assert metrics["geometry/density/up"].dtype == np.float32


def test_changed_count_is_exact_per_matrix():
  rng = np.random.default_rng(5)
  for shape in [(3, 5, 7), (6, 4), (9,), ()]:
    changed = rng.random(shape) < 0.4
    got = jax.jit(live._changed_count)(changed)
    assert got.dtype == np.float32 and float(got) == changed.sum()
