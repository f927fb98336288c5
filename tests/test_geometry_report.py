"""geometry/report.py: diagnose end to end (in memory and from our checkpoint paths), figures."""

import argparse
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.geometry import endpoint, report, trajectory
from test_geometry_endpoint import ALPHA, K, R, _pair

FIGURES = {"max_angle_per_matrix.png", "nss_per_matrix.png", "angles_representative.png",
           "mask_overlap.png", "trajectory.png"}
CFG = report.DiagnoseConfig(
    endpoint=endpoint.EndpointConfig(k=K, mask_rank=R, alpha=ALPHA, progress=False),
    trajectory=trajectory.TrajectoryConfig(hill_k=8, sim_k=4, oversample=4, progress=False))


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
  p0, p1 = _pair()
  mid = {k: v for k, v in p1.items()}
  mid["layers"] = {"attn": {n: {kk: (vv + p0["layers"]["attn"][n][kk]) / 2 for kk, vv in m.items()}
                            for n, m in p1["layers"]["attn"].items()},
                   **{k: v for k, v in p1["layers"].items() if k != "attn"}}
  out = tmp_path_factory.mktemp("diag")
  return p0, p1, out, report.diagnose(p0, p1, snapshots=[mid], out_dir=out, cfg=CFG)


def test_diagnose_writes_metrics_summary_and_figures(in_memory):
  p0, p1, out, res = in_memory
  assert {f.name for f in out.iterdir()} == FIGURES | {"metrics.json", "summary.md"}
  assert all((out / f).stat().st_size > 5000 for f in FIGURES)
  direct = endpoint.endpoint_metrics(p0, p1, CFG.endpoint)
  assert res["endpoint"]["matrices"] == direct["matrices"]
  assert res["overall"] == direct["overall"]
  traj = res["trajectory"]
  assert traj["steps"] == [1, 2] and traj["modules"] == ["q", "k", "v", "o"]  # tuned appended
  np.testing.assert_allclose(traj["overall"]["sim_end"][-1], 1.0, rtol=1e-9)
  # The midpoint moved exactly half-way: its Frobenius norm is half the end's (per matrix).
  q = traj["matrices"]["layers.0.attn.q_proj"]["frobenius"]
  np.testing.assert_allclose(q[0], q[1] / 2, rtol=1e-5)
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["endpoint"]["matrices"]["layers.0.attn.v_proj"]["overlap_low"] is None  # NaN
  assert saved["trajectory"]["overall"]["sim_prev"][0] is None
  assert math.isclose(saved["endpoint"]["overall"]["sparsity"], direct["overall"]["sparsity"])
  summary = (out / "summary.md").read_text()
  for row in ("| overall |", "| q |", "| down |", "| embed |", "| lm_head |", "| norm |",
              "## Trajectory", "![trajectory](trajectory.png)"):
    assert row in summary, row
  assert f"{direct['overall']['sparsity']:.4f}" in summary


def test_diagnose_from_our_checkpoint_paths_via_cli_args(tmp_path):
  from opd_jax.train import checkpoint

  p0, p1 = _pair()
  to_jax = lambda tree: {k: to_jax(v) if isinstance(v, dict) else jnp.asarray(v)  # noqa: E731
                         for k, v in tree.items()}
  root = tmp_path / "snapshots"
  paths = [checkpoint.save_snapshot(root, step, to_jax(p))
           for step, p in ((0, p0), (10, p0), (30, p1))]
  parser = argparse.ArgumentParser()
  report.add_diagnose_args(parser)
  args = parser.parse_args(["--base", str(paths[0]), "--tuned", str(paths[2]), "--snapshots",
                            str(paths[1]), "--out", str(tmp_path / "out"), "--k", str(K),
                            "--alpha", str(ALPHA), "--mask-rank", str(R)])
  res = report.run_diagnose(args)
  direct = endpoint.endpoint_metrics(p0, p1, CFG.endpoint)
  for name, d in direct["matrices"].items():
    assert res["endpoint"]["matrices"][name] == d, name
  traj = res["trajectory"]
  assert traj["steps"] == [10.0, 30.0]   # from the snapshot directory names; tuned appended
  assert traj["matrices"]["layers.1.attn.q_proj"]["frobenius"][0] == 0.0
  assert res["base"] == str(paths[0])


def test_multi_method_plots_and_colours(in_memory, tmp_path):
  _, _, _, res = in_memory
  colors = report.method_colors(["RLVR", "my-method", "OPD", "other"])
  assert colors["OPD"] == report.method_colors(["OPD"])["OPD"] == "#d62728"
  assert len(set(colors.values())) == 4
  assert report.method_colors(["x", "y"]) == report.method_colors(["x", "y"])
  runs = {"OPD": res["endpoint"], "SFT": res["endpoint"]}
  files = [report.plot_angle_curves(runs, tmp_path / "a.png"),
           report.plot_mask_overlaps(runs, tmp_path / "m.png"),
           report.plot_per_matrix(runs, "nss", tmp_path / "n.png", log=True),
           report.plot_trajectories({"OPD": res["trajectory"], "SFT": res["trajectory"]},
                                    tmp_path / "t.png", module_type="q")]
  for f in files:
    with open(f, "rb") as fh:
      assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
