"""train/snapshot_delta.py: delta snapshots round-trip bit for bit (every float32 bit pattern),
store the bf16-visible change geometry reads, load through `load_params` from any link of a
chain, stay consistent when a step is rewritten, and a loop run with `loop.snapshot_format='delta'`
diagnoses exactly like one with full snapshots (also after a crash and resume)."""

import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from opd_jax.geometry import endpoint, linalg, report, trajectory
from opd_jax.models import config as model_config
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import snapshot_delta as sd

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = model_config.tiny(vocab_size=64, n_layers=1)


@pytest.fixture(autouse=True)
def _fresh_caches():
  sd.clear_caches()
  yield
  sd.clear_caches()


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(f"u{x.dtype.itemsize}")


def _assert_bit_identical(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=jax.tree_util.keystr(path))


# Values that exercise every branch of the codec: signed zeros, subnormals (smallest and largest),
# values rounding to bf16 -0, ties at 0x8000 with an even and an odd high half, the largest
# finite float, and neighbours of bf16 rounding boundaries.
_SPECIAL_BITS = np.array([
    0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00008000,
    0x80008000, 0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF,
    0xFF7FFFFF, 0x3F800000, 0x00010000, 0x80007FFF, 0x7F7F8000, 0x00018000,
], np.uint32)


def _random_tree(rng, scale=0.02):
  special = _SPECIAL_BITS.view(np.float32)
  return {
      "embed": {"embedding": (rng.standard_normal((32, 24)) * scale).astype(np.float32)},
      "layers": {"w": (rng.standard_normal((2, 24, 16)) * scale).astype(np.float32),
                 "special": special[rng.permutation(special.size)].copy()},
      "norm": {"scale": rng.standard_normal(24).astype(ml_dtypes.bfloat16)},
      "count": np.arange(6, dtype=np.int32) + int(rng.integers(10)),
  }


def _step(rng, tree, size):
  """A training-like move: every float32 weight moves by ~size relative, some bf16 weights flip."""
  def move(x):
    if x.dtype == np.float32:
      with np.errstate(over="ignore"):
        out = x + (x * rng.standard_normal(x.shape) * size).astype(np.float32)
      # Some weights do not move at all; all stay finite (the largest float does not overflow).
      return np.where((rng.random(x.shape) < 0.1) | ~np.isfinite(out), x, out)
    if x.dtype == ml_dtypes.bfloat16:
      out = x.copy()
      out[rng.random(x.shape) < 0.3] += ml_dtypes.bfloat16(0.25)
      return out
    return x + 1
  return jax.tree.map(move, tree)


def _reference_changed(p, x):
  """numpy reference of the bf16-visible change: ml_dtypes round-to-nearest-even, -0 == +0."""
  def codes(a):
    c = np.asarray(a).astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.where((c & 0x7FFF) == 0, 0, c)
  return np.flatnonzero((codes(p) != codes(x)).reshape(-1))


def test_codec_round_trips_every_bit_pattern_exactly():
  rng = np.random.default_rng(0)
  p, x = _random_tree(rng), None
  x = _step(rng, p, 1e-3)
  x["layers"]["special"] = x["layers"]["special"][::-1].copy()  # -0 <-> +0 and ties swap places
  delta = sd.encode(p, x)
  _assert_bit_identical(sd.decode(p, delta), x)
  assert delta.codecs == {"count": "raw", "embed/embedding": "f32", "layers/special": "f32",
                          "layers/w": "f32", "norm/scale": "bf16"}
  # Any 32-bit pattern at all (NaN payloads and infinities included, never saved by the loop).
  pb = rng.integers(0, 2**32, size=(50_000,), dtype=np.uint32)
  xb = np.concatenate([rng.integers(0, 2**32, size=(25_000,), dtype=np.uint32),
                       pb[25_000:] ^ rng.integers(0, 2**16, size=(25_000,), dtype=np.uint32)])
  pw, xw = {"w": pb.view(np.float32)}, {"w": xb.view(np.float32)}
  np.testing.assert_array_equal(np.asarray(sd.decode(pw, sd.encode(pw, xw))["w"]).view(np.uint32),
                                xb)
  # Planes: 5 per float32 entry, 3 per bfloat16 entry; an unchanged tree has empty change planes.
  same = sd.encode(p, p)
  assert same.planes["layers/w"].shape == (5, 2, 24, 16)
  assert same.planes["norm/scale"].shape == (3, 24)
  assert not np.asarray(same.planes["layers/w"]).any()
  assert all(v in (0, None) for v in same.bf16_changed.values())


def test_bf16_visible_change_equals_the_numpy_reference(tmp_path):
  rng = np.random.default_rng(1)
  p = _random_tree(rng)
  x = _step(rng, p, 4e-3)   # about half of the bf16 codes change
  # Sign flips of zeros and of the smallest subnormals (bf16 +-0 either way: no visible change),
  # and of a normal value (a visible change).
  special = p["layers"]["special"].copy()
  flip = np.isin(_bits(special), np.array([0x0, 0x80000000, 0x1, 0x80000001, 0x3F800000]))
  special[flip] = -special[flip]
  x["layers"]["special"] = special
  root = tmp_path / "snaps"
  ckpt_lib.save_snapshot(root, 0, p, CFG, snapshot_format="delta")
  ckpt_lib.save_snapshot(root, 5, x, CFG, snapshot_format="delta")
  changed = sd.bf16_change(root / "5")
  assert set(changed) == {"embed/embedding", "layers/special", "layers/w", "norm/scale"}
  flat_p = dict(zip(*sd._flatten(p)[:2]))
  flat_x = dict(zip(*sd._flatten(x)[:2]))
  meta = ckpt_lib._read_meta(root / "5")
  total = 0
  for name, idx in changed.items():
    ref = _reference_changed(flat_p[name], flat_x[name])
    np.testing.assert_array_equal(idx, ref, err_msg=name)
    geo = np.flatnonzero(np.asarray(linalg.bf16_changed(jnp.asarray(flat_p[name]),
                                                        jnp.asarray(flat_x[name]))).reshape(-1))
    np.testing.assert_array_equal(idx, geo, err_msg=name)
    assert meta["delta"]["leaves"][name]["bf16_changed"] == ref.size
    total += ref.size
  assert meta["delta"]["bf16_changed"] == total
  frac = total / meta["delta"]["n"]
  assert 0.2 < frac < 0.8, frac
  assert sd.summary(root / "5")["bf16_changed"] == total


def _trajectory(rng, n: int) -> list:
  """n parameter trees, each a small random step from the previous one."""
  trees = [_random_tree(rng)]
  for _ in range(n - 1):
    trees.append(_step(rng, trees[-1], 1e-3))
  return trees


def test_a_chain_loads_every_step_exactly_and_anchors_bound_it(tmp_path):
  trees = _trajectory(np.random.default_rng(2), 7)
  root = tmp_path / "snaps"
  for step, tree in enumerate(trees):
    path = ckpt_lib.save_snapshot(root, step * 10, tree, CFG, {"note": step},
                                  snapshot_format="delta") if step != 4 else sd.save(
                                      root, step * 10, tree, CFG, {"note": step}, anchor_every=3)
    assert path == root / str(step * 10)
  kinds = [sd.summary(root / str(s * 10))["format"] for s in range(7)]
  # Step 40 saved with anchor_every=3 after a chain 0 <- 10 <- 20 <- 30 of depth 3: full again.
  assert kinds == ["full", "delta", "delta", "delta", "full", "delta", "delta"]
  assert [s["depth"] for s in map(sd.summary, [root / "30", root / "60"])] == [3, 2]
  assert sd.chain(root / "60") == [root / "40", root / "50", root / "60"]
  for step in (6, 3, 1, 5, 0, 2, 4):   # any order, nothing held from an earlier load
    sd.clear_caches()
    loaded, cfg = ckpt_lib.load_params_and_config(root / str(step * 10))
    _assert_bit_identical(loaded, jax.tree.map(jnp.asarray, trees[step]))
    assert cfg == CFG
    assert ckpt_lib._read_meta(root / str(step * 10))["note"] == step
  # The latest step of the root is a delta: resolve_step_dir and load_params find it.
  assert ckpt_lib.resolve_step_dir(root) == root / "60"
  _assert_bit_identical(ckpt_lib.load_params(root), jax.tree.map(jnp.asarray, trees[6]))


def test_sharded_params_save_and_load_onto_shardings(tmp_path):
  from opd_jax.models import transformer
  from opd_jax.train import mesh as mesh_lib
  m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 4, 2)))
  shardings = mesh_lib.param_shardings(CFG, m)
  _, params = transformer.init(CFG, 0)
  params = jax.device_put(params, shardings)
  moved = jax.jit(lambda t: jax.tree.map(lambda x: x * 1.001 + 1e-4, t),
                  out_shardings=shardings)(params)
  root = tmp_path / "snaps"
  head = {"w": jnp.ones((3,))}
  for step, tree in ((0, params), (1, moved)):
    ckpt_lib.save_snapshot(root, step, tree, CFG, value_head=head, snapshot_format="delta")
  assert (root / "1" / "delta").is_dir() and not (root / "1" / "params").is_dir()
  for target in (None, shardings):
    sd.clear_caches()
    loaded = ckpt_lib.load_params(root / "1", shardings=target)
    _assert_bit_identical(loaded, moved)
    if target is not None:
      for x, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)):
        assert x.sharding == s
  np.testing.assert_array_equal(np.asarray(ckpt_lib.load_value_head(root / "1")["w"]), np.ones(3))


def test_rewriting_a_step_keeps_every_snapshot_consistent(tmp_path):
  rng = np.random.default_rng(3)
  trees = _trajectory(rng, 4)
  root = tmp_path / "snaps"
  for step, tree in enumerate(trees):
    ckpt_lib.save_snapshot(root, step, tree, CFG, snapshot_format="delta")

  def check(expected):
    for step, tree in enumerate(expected):
      sd.clear_caches()
      _assert_bit_identical(ckpt_lib.load_params(root / str(step)), jax.tree.map(jnp.asarray, tree))

  # A resumed run redoes step 2 bit-identically (CPU): step 3 stays a delta on it.
  sd.clear_caches()   # as a fresh process would
  ckpt_lib.save_snapshot(root, 2, trees[2], CFG, snapshot_format="delta")
  assert sd.summary(root / "3")["format"] == "delta"
  check(trees)
  # Step 1 redone with other values (non-reproducible hardware): step 2, based on it, is first
  # rewritten as a full snapshot of its own values; step 3 still decodes from step 2.
  other = _step(rng, trees[1], 1e-3)
  ckpt_lib.save_snapshot(root, 1, other, CFG, snapshot_format="delta")
  assert [sd.summary(root / str(s))["format"] for s in range(4)] == ["full", "delta", "full",
                                                                      "delta"]
  check([trees[0], other, trees[2], trees[3]])
  # The full format rewriting a base does the same.
  ckpt_lib.save_snapshot(root, 0, _step(rng, trees[0], 1e-3), CFG)
  assert sd.summary(root / "1")["format"] == "full"
  _assert_bit_identical(ckpt_lib.load_params(root / "1"), jax.tree.map(jnp.asarray, other))
  # A base replaced behind save_snapshot's back is an error naming the delta, never wrong values.
  shutil.rmtree(root / "2")
  shutil.copytree(root / "1", root / "2")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"3.*(rewritten|fingerprint)"):
    ckpt_lib.load_params(root / "3")
  shutil.rmtree(root / "2")
  with pytest.raises(ckpt_lib.CheckpointError, match="based on step 2, which is missing"):
    ckpt_lib.load_params(root / "3")


# -- a loop run -----------------------------------------------------------------------------------
class _Kill(Exception):
  pass


def _smoke(overrides):
  cd = config_lib.load_config(str(ROOT / "configs" / "opd.py") + ":smoke", overrides)
  return config_lib.from_config_dict(cd)


def _diagnose(snaps, out):
  cfg = report.DiagnoseConfig(
      endpoint=endpoint.EndpointConfig(k=8, mask_rank=3, alpha=0.4, progress=False),
      trajectory=trajectory.TrajectoryConfig(hill_k=4, sim_k=4, oversample=4, progress=False),
      figures=False)
  res = report.diagnose(snaps[0], snaps[4], snapshots=[snaps[s] for s in (1, 2, 3)], out_dir=out,
                        cfg=cfg)
  return {k: res[k] for k in ("endpoint", "trajectory")}


def _same_numbers(a, b, where=""):
  if isinstance(a, dict):
    assert set(a) == set(b), where
    for k in a:
      _same_numbers(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _same_numbers(x, y, f"{where}[{i}]")
  elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
  elif isinstance(a, float) and math.isnan(a):
    assert isinstance(b, float) and math.isnan(b), where
  else:
    assert a == b, (where, a, b)


@pytest.mark.slow
def test_loop_delta_snapshots_diagnose_like_full_ones_also_after_a_crash(tmp_path, monkeypatch):
  overrides = ["loop.steps=4", "loop.snapshot_steps=(0,1,2,3,4)", "loop.checkpoint_every=2"]
  full = loop.run(_smoke(overrides), tmp_path / "full")
  delta_cfg = _smoke(overrides + ["loop.snapshot_format=delta"])
  # The delta run dies right after writing snapshot 4 (before checkpoint 4) and is resumed from
  # checkpoint 2: it redoes and rewrites snapshots 3 and 4 (4 is a delta on 3).
  real = ckpt_lib.save_snapshot

  def save_then_die(directory, step, *a, **kw):
    out = real(directory, step, *a, **kw)
    if step == 4:
      raise _Kill()
    return out

  monkeypatch.setattr(ckpt_lib, "save_snapshot", save_then_die)
  with pytest.raises(_Kill):
    loop.run(delta_cfg, tmp_path / "delta")
  monkeypatch.setattr(ckpt_lib, "save_snapshot", real)
  sd.clear_caches()
  delta = loop.run(delta_cfg, tmp_path / "delta", resume=True)
  assert delta["resumed_from"] == 2 and delta["step"] == 4
  assert sorted(delta["snapshots"]) == sorted(full["snapshots"]) == [0, 1, 2, 3, 4]
  fmt = {s: sd.summary(p)["format"] for s, p in delta["snapshots"].items()}
  assert fmt == {0: "full", 1: "delta", 2: "delta", 3: "delta", 4: "delta"}
  for s in range(5):
    sd.clear_caches()
    _assert_bit_identical(ckpt_lib.load_params(delta["snapshots"][s]),
                          ckpt_lib.load_params(full["snapshots"][s]))
  # Sizes: the deltas are smaller than the full snapshots they replace.
  def size(p):
    return sum(f.stat().st_size for f in pathlib.Path(p).rglob("*") if f.is_file())
  assert sum(size(delta["snapshots"][s]) for s in range(1, 5)) < sum(
      size(full["snapshots"][s]) for s in range(1, 5))
  sd.clear_caches()
  a = _diagnose({s: str(p) for s, p in full["snapshots"].items()}, tmp_path / "diag_full")
  b = _diagnose({s: str(p) for s, p in delta["snapshots"].items()}, tmp_path / "diag_delta")
  _same_numbers(a, b)
  assert a["trajectory"]["steps"] == [1.0, 2.0, 3.0, 4.0]
