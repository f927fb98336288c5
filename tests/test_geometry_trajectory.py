"""geometry/trajectory.py against the float64 numpy reference (tests/geometry_reference.py)."""

import math
from collections.abc import Sequence

import numpy as np
import pytest

import geometry_reference as ref
from opd_jax.geometry import matrices, trajectory

HILL_K, SIM_K = 8, 4
CFG = trajectory.TrajectoryConfig(hill_k=HILL_K, sim_k=SIM_K, oversample=4, tol=1e-12,
                                  progress=False)


def _base(rng, d=24, layers=2):
  n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  return {"embed": {"embedding": n(50, d)},
          "layers": {"attn": {"q_proj": {"kernel": n(layers, d, d)},
                              "k_proj": {"kernel": n(layers, d, 12)},
                              "v_proj": {"kernel": n(layers, d, 12)},
                              "o_proj": {"kernel": n(layers, d, d)}},
                     "mlp": {"up_proj": {"kernel": n(layers, d, d)}}}}


def _snapshots(rng, p0, n_snap=3):
  """W_t = W_0 + t * (decaying rank-6 direction that drifts with t) + noise; v of layer 0 stays
  at W_0 in the first snapshot (a zero update)."""
  snaps = []
  for t in range(1, n_snap + 1):
    snap = {"embed": p0["embed"], "layers": {"attn": {}, "mlp": p0["layers"]["mlp"]}}
    for name, mod in p0["layers"]["attn"].items():
      w = mod["kernel"]
      lead, (m, n) = w.shape[:1], w.shape[1:]
      a = rng.standard_normal(lead + (m, 6)) * 0.6 ** np.arange(6)
      b = rng.standard_normal(lead + (6, n))
      drift = 1e-2 * t * (a @ b) + 1e-2 * rng.standard_normal(w.shape) * t ** 2 * 0.05
      new = (w + drift).astype(np.float32)
      if name == "v_proj" and t == 1:
        new[0] = w[0]
      snap["layers"]["attn"][name] = {"kernel": new}
    snaps.append(snap)
  return snaps


class Lazy(Sequence):
  """Snapshots built on access, recording the order they are read in."""

  def __init__(self, items):
    self.items, self.reads = items, []

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    self.reads.append(i)
    return self.items[i]


def test_trajectory_matches_reference_and_streams_snapshots():
  rng = np.random.default_rng(0)
  p0 = _base(rng)
  snaps = _snapshots(rng, p0)
  lazy = Lazy(snaps)
  got = trajectory.trajectory_metrics(p0, lazy, steps=[10, 20, 40], cfg=CFG)
  assert lazy.reads == [0, 1, 2]  # each snapshot resolved once, in order
  assert got["progress"] == [0.25, 0.5, 1.0]
  names = [m.name for m in matrices.named_matrices(p0, types=("q", "k", "v", "o"))]
  assert list(got["matrices"]) == names
  for m0 in matrices.named_matrices(p0, types=("q", "k", "v", "o")):
    ws = [next(m for m in matrices.named_matrices(s, types=(m0.module_type,))
               if m.name == m0.name).array for s in snaps]
    g = got["matrices"][m0.name]
    want = ref.trajectory_metrics(m0.array, ws, hill_k=HILL_K, sim_k=SIM_K)
    for metric in trajectory.METRICS:
      for t in range(3):
        w, v = want[metric][t], g[metric][t]
        if math.isnan(w):
          assert math.isnan(v), (m0.name, metric, t)
          continue
        np.testing.assert_allclose(v, w, rtol=1e-6, atol=1e-12, err_msg=f"{m0.name} {metric} {t}")
    # q / o are large enough for the randomized path; k / v (24 x 12) use the exact one.
    assert all(g["randomized"]) == (m0.module_type in ("q", "o")), m0.name
  v0 = got["matrices"]["layers.0.attn.v_proj"]
  assert v0["frobenius"][0] == 0.0 and math.isnan(v0["stable_rank"][0])
  assert math.isnan(v0["sim_prev"][1]) and not math.isnan(v0["sim_end"][1])
  for metric in trajectory.METRICS:
    for t in range(3):
      vals = [got["matrices"][n][metric][t] for n in names]
      np.testing.assert_allclose(got["overall"][metric][t], ref.nanmean(vals), rtol=1e-12)
      qs = [got["matrices"][n][metric][t] for n in names if ".q_proj" in n]
      np.testing.assert_allclose(got["by_type"]["q"][metric][t], ref.nanmean(qs), rtol=1e-12)


def test_norms_only_mode_uses_power_iteration():
  rng = np.random.default_rng(1)
  p0 = _base(rng, layers=1)
  snaps = _snapshots(rng, p0, n_snap=2)
  cfg = trajectory.TrajectoryConfig(subspace_metrics=False, progress=False)
  got = trajectory.trajectory_metrics(p0, snaps, cfg=cfg, modules=("q", "o"))
  assert set(got["overall"]) == {"stable_rank", "frobenius"}
  for name in ("layers.0.attn.q_proj", "layers.0.attn.o_proj"):
    leaf = name.split(".")[3]
    w0 = p0["layers"]["attn"][leaf]["kernel"][0]
    want = ref.trajectory_metrics(w0, [s["layers"]["attn"][leaf]["kernel"][0] for s in snaps],
                                  hill_k=HILL_K, sim_k=SIM_K)
    np.testing.assert_allclose(got["matrices"][name]["stable_rank"], want["stable_rank"],
                               rtol=1e-6)
    np.testing.assert_allclose(got["matrices"][name]["frobenius"], want["frobenius"],
                               rtol=1e-12)


def test_bad_arguments():
  rng = np.random.default_rng(2)
  p0 = _base(rng, layers=1)
  snaps = _snapshots(rng, p0, n_snap=1)
  with pytest.raises(ValueError, match="steps"):
    trajectory.trajectory_metrics(p0, snaps, steps=[1, 2], cfg=CFG)
  with pytest.raises(ValueError, match="unknown"):
    trajectory.trajectory_metrics(p0, snaps, cfg=CFG, modules=("q", "attention"))
  with pytest.raises(ValueError, match="no snapshots"):
    trajectory.trajectory_metrics(p0, [], cfg=CFG)
  bad = {"layers": {"attn": {"q_proj": {"kernel": p0["layers"]["attn"]["q_proj"]["kernel"]}}}}
  with pytest.raises(ValueError, match="k_proj"):
    trajectory.trajectory_metrics(p0, [bad], cfg=CFG)
