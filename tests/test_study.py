"""Study: phase framework (fake phases), verdicts/check/report on synthetic results, smoke study."""

import json
import math
import pathlib

import numpy as np
import pytest

from opd_jax.study import paper, phases, reporting, verdicts


# -- phase framework --------------------------------------------------------------------------------
def _fake_dag(calls, config=None):
  """a -> b -> d, a -> c -> d; each phase writes a file and reads its deps' files."""
  config = config or {}

  def make(name):
    def fn(ctx):
      calls.append(name)
      text = name + "(" + ",".join((ctx.dep_dir(d) / "out.txt").read_text()
                                   for d in sorted(deps[name])) + ")"
      (ctx.out_dir / "out.txt").write_text(text)
      return {"text": text, "resuming": ctx.resuming}
    return fn

  deps = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
  return [phases.Phase(n, make(n), deps[n], config.get(n, {"v": 1})) for n in "dcba"]


def test_phases_run_in_dependency_order_and_resume_skips(tmp_path):
  calls = []
  rec = phases.run_phases(_fake_dag(calls), tmp_path, log=lambda s: None)
  assert calls.index("a") < calls.index("b") < calls.index("d")
  assert calls.index("c") < calls.index("d") and sorted(calls) == list("abcd")
  assert rec["d"]["summary"]["text"] == "d(b(a()),c(a()))"
  assert all(r["status"] == "ran" for r in rec.values())
  calls.clear()
  rec = phases.run_phases(_fake_dag(calls), tmp_path, log=lambda s: None)
  assert calls == [] and all(r["status"] == "skipped" for r in rec.values())
  assert phases.status(_fake_dag([]), tmp_path) == dict.fromkeys("abcd", "complete")


def test_deleting_a_phase_redoes_it_and_dependents_only(tmp_path):
  calls = []
  phases.run_phases(_fake_dag(calls), tmp_path, log=lambda s: None)
  import shutil
  shutil.rmtree(tmp_path / "b")
  assert phases.status(_fake_dag([]), tmp_path) == {"a": "complete", "b": "missing",
                                                    "c": "complete", "d": "stale"}
  calls.clear()
  phases.run_phases(_fake_dag(calls), tmp_path, log=lambda s: None)
  assert calls == ["b", "d"]


def test_redo_and_config_change(tmp_path):
  calls = []
  phases.run_phases(_fake_dag(calls), tmp_path, log=lambda s: None)
  calls.clear()
  phases.run_phases(_fake_dag(calls), tmp_path, redo=["c"], log=lambda s: None)
  assert calls == ["c", "d"]
  calls.clear()
  phases.run_phases(_fake_dag(calls, {"a": {"v": 2}}), tmp_path, log=lambda s: None)
  assert sorted(calls) == list("abcd")
  calls.clear()
  phases.run_phases(_fake_dag(calls, {"a": {"v": 2}, "b": {"v": 7}}), tmp_path, log=lambda s: None)
  assert calls == ["b", "d"]
  with pytest.raises(ValueError, match="unknown phase.*'zz'.*valid phases"):
    phases.run_phases(_fake_dag([]), tmp_path, redo=["zz"], log=lambda s: None)


def test_interrupted_phase_resumes_in_place_and_marker_is_atomic(tmp_path):
  calls = []
  state = {"fail": True}

  def flaky(ctx):
    calls.append(ctx.resuming)
    (ctx.out_dir / "partial.txt").write_text("x")
    if state["fail"]:
      raise RuntimeError("killed")
    assert (ctx.out_dir / "partial.txt").exists()
    return {"ok": 1}

  dag = [phases.Phase("a", lambda ctx: {"a": 1}), phases.Phase("b", flaky, ("a",), {"k": 1})]
  with pytest.raises(RuntimeError):
    phases.run_phases(dag, tmp_path, log=lambda s: None)
  assert not (tmp_path / "b" / phases.MARKER).exists()
  assert (tmp_path / "b" / phases.STARTED).exists()
  state["fail"] = False
  rec = phases.run_phases(dag, tmp_path, log=lambda s: None)
  assert calls == [False, True] and rec["a"]["status"] == "skipped"
  assert not list(tmp_path.glob("*/.*.tmp"))
  # A different config wipes the partial directory instead of resuming.
  (tmp_path / "b" / "stale.txt").write_text("old")
  phases.run_phases([dag[0], phases.Phase("b", flaky, ("a",), {"k": 2})], tmp_path,
                    log=lambda s: None)
  assert calls[-1] is False and not (tmp_path / "b" / "stale.txt").exists()


def test_phase_graph_validation():
  f = lambda ctx: None  # noqa: E731
  with pytest.raises(ValueError, match="cycle"):
    phases.topological_order([phases.Phase("a", f, ("b",)), phases.Phase("b", f, ("a",))])
  with pytest.raises(ValueError, match="unknown phase 'q'"):
    phases.topological_order([phases.Phase("a", f, ("q",))])
  with pytest.raises(ValueError, match="duplicate"):
    phases.topological_order([phases.Phase("a", f), phases.Phase("a", f)])
  assert phases.fingerprint({"a": (1, 2)}) == phases.fingerprint({"a": [1, 2]})
  assert phases.fingerprint({"a": 1}) != phases.fingerprint({"a": 2})


# -- verdicts, check and report on synthetic results -----------------------------------------------
def _traj(rng, sr, steps=(2, 4, 6, 8, 10), frob_scale=1.0):
  n = len(steps)
  return {"steps": list(steps), "progress": [s / steps[-1] for s in steps],
          "stable_rank": list(sr),
          "frobenius": list(frob_scale * np.cumsum(rng.uniform(0.5, 1.0, n))),
          "hill": list(rng.uniform(1, 3, n)), "sim_k": list(np.linspace(rng.uniform(0.2, 0.9), 1, n))}


def _endpoint(rng, sparsity, angle, nss, principal, lowmag):
  names = [f"layers.{i}.{t}" for i in range(2) for t in "qkvo"]
  return {"origin": "x -> y", "sparsity": sparsity,
          "sparsity_per_type": {t: float(np.clip(sparsity + rng.normal(0, .02), 0, 1))
                                for t in ["q", "k", "v", "o", "gate", "up", "down", "embed"]},
          "density": 1 - sparsity, "max_angle_deg": angle, "max_angle_mean_deg": angle / 2,
          "rep_matrix": "layers.1.q", "angle_curve_deg": list(np.sort(rng.uniform(0, angle, 16))),
          "max_angle_per_matrix": {n: float(rng.uniform(0.1, 1) * angle) for n in names},
          "nss": nss, "nss_per_matrix": {n: float(rng.uniform(0.5, 1.5) * nss) for n in names},
          "principal_overlap": principal, "low_mag_overlap": lowmag, "baseline": 0.5}


def synthetic_results(seed=0, paper_like=True):
  rng = np.random.default_rng(seed)
  acc = lambda a: {"acc": a, "stderr": 0.01, "n": 200, "k": 4}  # noqa: E731
  r = {"preset": "synthetic", "thresholds": {"teacher_min": 0.9, "base_min": 0.1, "base_max": 0.7},
       "settings": {"opd": {"lr": 1e-4, "steps": 10}, "teacher": {"model": {"d_model": 128}}},
       "accuracy": {"teacher": acc(0.95), "base": acc(0.3), "anchor": acc(0.5), "opd": acc(0.6),
                    "rlvr": acc(0.58), "sft": acc(0.52), "opd_rank16": acc(0.6),
                    "sft_rank16": acc(0.40)}}
  r["endpoint"] = {"sft": _endpoint(rng, 0.08, 12.0, 1e-3, 0.6, 0.32),
                   "opd": _endpoint(rng, 0.52, 1.0, 1e-4, 0.45, 0.54),
                   "rlvr": _endpoint(rng, 0.77, 0.4, 1e-5, 0.40, 0.73)}
  r["trajectory"] = {"sft": _traj(rng, [3, 4, 5, 6, 7]), "opd": _traj(rng, [4, 4.2, 4.1, 4.3, 4.2]),
                     "rlvr": _traj(rng, [8, 7, 6, 5, 4])}
  ctrl = {"ctrl_topkl_25": [4.1, 4.3, 4.2, 4.4, 4.3], "ctrl_random_50": [3.9, 4.0, 4.2, 4.1, 4.0],
          "ctrl_offpolicy": [4.0, 4.1, 4.3, 4.2, 4.1], "mix_0.75": [4.2, 4.2, 4.0, 4.3, 4.3],
          "mix_0.01": [8, 7.2, 6.1, 5, 4.2]}
  for run, sr in ctrl.items():
    r["trajectory"][run] = _traj(rng, sr, frob_scale=1.5 if run == "ctrl_offpolicy" else 1.0)
    r["accuracy"][run] = acc(float(rng.uniform(0.5, 0.6)))
  r["trajectory"]["ctrl_offpolicy"]["frobenius"][-1] = 2 * r["trajectory"]["opd"]["frobenius"][-1]
  r["rank16"] = {"opd": {"plain_run": "opd", "projected_run": "opd_rank16", "resume_step": 2,
                         "k": 16, "where": "gradient"},
                 "sft": {"plain_run": "sft", "projected_run": "sft_rank16", "resume_step": 2,
                         "k": 16, "where": "gradient"}}
  r["controls"] = {"sparsify": ["ctrl_topkl_25", "ctrl_random_50"], "offpolicy": ["ctrl_offpolicy"],
                   "mixing": {"mix_0.75": 0.75, "mix_0.01": 0.01}}
  r["phases"] = {"task": {"wall_s": 1.0, "status": "ran"}, "teacher": {"wall_s": 60.0,
                                                                        "status": "ran"}}
  if not paper_like:  # flip the orderings
    for m, s in (("sft", 0.8), ("opd", 0.5), ("rlvr", 0.1)):
      r["endpoint"][m]["sparsity"] = s
    r["accuracy"]["sft_rank16"] = acc(0.52)
    r["trajectory"]["opd"]["stable_rank"] = [1, 3, 9, 27, 81]
  return r


def test_verdicts_computed_from_data():
  good = {v["id"]: v for v in verdicts.compute_verdicts(synthetic_results())}
  assert set(good) == set(paper.CLAIM_IDS)
  holds = {k for k, v in good.items() if v["verdict"] == verdicts.HOLDS}
  assert holds == set(paper.CLAIM_IDS), {k: v["ours"] for k, v in good.items() if k not in holds}
  bad = {v["id"]: v for v in verdicts.compute_verdicts(synthetic_results(paper_like=False))}
  for cid in ("sparsity_order", "rank16_sft_loses", "stable_rank_shapes", "sparsify_unchanged",
              "offpolicy_matches", "sft_sparsity_band"):
    assert bad[cid]["verdict"] == verdicts.FAILS, (cid, bad[cid])
  assert "SFT 80.0%" in bad["sparsity_order"]["ours"]
  r = synthetic_results()
  del r["controls"]["mixing"]
  missing = {v["id"]: v["verdict"] for v in verdicts.compute_verdicts(r)}
  assert missing["mixing_opd_dominant"] == verdicts.MISSING
  assert missing["sparsity_order"] == verdicts.HOLDS


def test_controls_switched_off_leave_their_claims_missing_and_the_report_renders(tmp_path):
  r = synthetic_results()
  r["controls"] = {"sparsify": [], "offpolicy": [], "mixing": {}}   # every control off
  for run in ("ctrl_offpolicy", "mix_0.75"):
    r["trajectory"].pop(run, None)
  got = {v["id"]: v["verdict"] for v in verdicts.compute_verdicts(r)}
  for cid in ("offpolicy_matches", "offpolicy_norm", "mixing_opd_dominant", "sparsify_unchanged"):
    assert got[cid] == verdicts.MISSING, cid
  assert got["sparsity_order"] == verdicts.HOLDS
  reporting.render(r, tmp_path)
  assert "missing: controls/offpolicy" in (tmp_path / "report.md").read_text()


def test_trajectory_distance_matches_reference():
  r = synthetic_results()
  a = np.asarray(r["trajectory"]["ctrl_topkl_25"]["stable_rank"])
  b = np.asarray(r["trajectory"]["opd"]["stable_rank"])
  assert verdicts.trajectory_distance(r, "ctrl_topkl_25", "opd") == pytest.approx(
      np.mean(np.abs(np.log(a / b))), rel=1e-9)
  # Different lengths: interpolated at the shorter trajectory's progress points.
  r["trajectory"]["short"] = {"progress": [0.5, 1.0], "stable_rank": [2.0, 3.0]}
  r["trajectory"]["long"] = {"progress": [0.25, 0.5, 0.75, 1.0], "stable_rank": [1., 2., 4., 6.]}
  want = np.mean(np.abs(np.log(np.array([2.0, 3.0]) / np.array([2.0, 6.0]))))
  assert verdicts.trajectory_distance(r, "long", "short") == pytest.approx(want)


@pytest.mark.parametrize("field,value,name", [
    (("accuracy", "teacher", "acc"), 0.85, "teacher_min"),
    (("accuracy", "base", "acc"), 0.05, "base_range"),
    (("accuracy", "base", "acc"), 0.75, "base_range"),
    (("accuracy", "opd", "acc"), 0.5, "opd_above_anchor"),
    (("accuracy", "rlvr", "acc"), 0.45, "rlvr_above_anchor"),
])
def test_check_names_the_failed_threshold(field, value, name):
  r = synthetic_results()
  assert verdicts.check(r) == []
  d = r
  for k in field[:-1]:
    d = d[k]
  d[field[-1]] = value
  fails = verdicts.check(r)
  assert len(fails) == 1 and fails[0].startswith(name), fails


def test_report_renders_every_section_and_figure(tmp_path):
  out = reporting.render(synthetic_results(), tmp_path)
  md = (tmp_path / "report.md").read_text()
  for _, title in reporting.SECTIONS:
    assert f"## {title}" in md
  for f in reporting.REQUIRED_FIGURES:
    png = tmp_path / f"{f}.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG", f
    assert f"({f}.png)" in md
  saved = json.loads((tmp_path / "results.json").read_text())
  assert len(saved["verdicts"]) == len(paper.CLAIMS)
  assert saved["failed_thresholds"] == [] and out["figures"]
  for v in saved["verdicts"]:
    assert v["ours"] in md or v["ours"].replace("|", "\\|") in md
  assert "51.6%" in md and "Run summary" in md and "`0.0001`" in md


# -- study config and composition (no training) ------------------------------------------------------
def _load(preset, overrides=()):
  from opd_jax.study import config as study_config
  from opd_jax.train import config as train_config
  return study_config.from_config_dict(train_config.load_config(f"configs/study.py:{preset}",
                                                                overrides))


@pytest.mark.parametrize("preset", ["smoke", "tiny", "small", "qwen3_8b"])
def test_presets_compose_every_run(preset):
  from opd_jax.study import runs
  study = _load(preset)
  dag = runs.build_phases(study)
  names = [p.name for p in dag]
  assert names[0] == "task" and names[-2:] == ["diagnostics", "report"]
  assert {"teacher", "base", "anchor", "opd", "rlvr", "sft", "opd_rank16", "sft_rank16",
          "ctrl_offpolicy"} <= set(names)
  assert any(n.startswith("ctrl_topkl_") for n in names) and any(n.startswith("mix_") for n in names)
  phases.topological_order(dag)  # a valid DAG


def test_composed_controls_differ_from_opd_only_where_they_should():
  from opd_jax.study import runs
  study = _load("tiny")
  specs = {s.name: s for s in runs.run_specs(study)}
  cfg = {n: runs.compose_run(study, s, runs._symbolic) for n, s in specs.items()}
  opd = cfg["opd"]
  assert opd.method == "opd" and opd.student.path == "@anchor:final"
  assert opd.teacher.path == "@teacher:final" and opd.loop.eval_every == 0
  steps = opd.loop.steps
  assert opd.loop.snapshot_steps == tuple(round(i * steps / 5) for i in range(1, 6))
  off = cfg["ctrl_offpolicy"]
  assert off.rollout.policy == "teacher" and off.pg.pg.eps_low == off.pg.pg.eps_high == 1.0
  assert off.replace(rollout=opd.rollout, pg=opd.pg) == opd
  mix = cfg["mix_0.05"]
  assert mix.method == "mixed" and mix.rollout.mix_alpha == 0.05
  assert mix.grpo.group_size == opd.rollout.group_size
  top = cfg["ctrl_topkl_25"]
  assert top.rollout.token_transforms == (("top_kl_retention", {"rho": 0.25}),)
  rnd = cfg["ctrl_random_50"]
  assert rnd.rollout.token_transforms == (("random_retention", {"rho": 0.5, "seed": 0}),)
  r16 = cfg["opd_rank16"]
  first = opd.loop.snapshot_steps[0]
  assert r16.student.path == "@opd:first" and r16.loop.steps == steps - first
  assert (r16.subspace.origin, r16.subspace.at, r16.subspace.k) == ("@anchor:final", "@opd:first",
                                                                    16)
  assert r16.optim.transforms[-1].name == "subspace_projection"
  assert r16.optim.transforms[-1].position == "pre"
  sft = cfg["sft"]
  assert sft.method == "sft" and sft.optim.schedule == "cosine"
  assert sft.optim.lr == pytest.approx(10 * opd.optim.lr) or study.preset != "tiny"
  assert cfg["rlvr"].optim.eps == 1e-15 and cfg["rlvr"].optim.b2 == 0.98


def test_study_config_errors_name_the_key():
  from opd_jax.train.config import ConfigError
  with pytest.raises(ConfigError, match="opd.optim.lrr"):
    _load("smoke", ["opd.optim.lrr=1.0"])
  with pytest.raises(ConfigError, match="unknown config key 'config.controls.mixing_alpha'"):
    from opd_jax.study import config as study_config
    from opd_jax.train import config as train_config
    cd = train_config.load_config("configs/study.py:smoke").to_dict()
    cd["controls"]["mixing_alpha"] = (0.5,)
    study_config.from_config_dict(cd)
  with pytest.raises(ConfigError, match="controls.sparsify"):
    _load("smoke", ["controls.sparsify=(('topk', 0.5),)"])


# -- the smoke study end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
  from opd_jax import study
  from opd_jax.train import config as train_config
  workdir = tmp_path_factory.mktemp("study_smoke")
  cd = train_config.load_config("configs/study.py:smoke")
  out = study.run(cd, workdir, log=lambda s: None)
  return workdir, cd, out


def test_smoke_study_report_structure(smoke_study):
  workdir, _, out = smoke_study
  assert out["ok"] and set(out["phases"].values()) == {"ran"}
  rep = workdir / "report"
  md = (rep / "report.md").read_text()
  for _, title in reporting.SECTIONS:
    assert f"## {title}" in md, title
  for f in reporting.REQUIRED_FIGURES:
    assert (rep / f"{f}.png").read_bytes()[:4] == b"\x89PNG" and f"({f}.png)" in md, f
  results = json.loads((rep / "results.json").read_text())
  assert set(results["endpoint"]) == {"sft", "opd", "rlvr"}
  for m, e in results["endpoint"].items():
    assert 0 <= e["sparsity"] <= 1 and set(e["sparsity_per_type"]) >= {"q", "k", "v", "o"}, m
    assert e["max_angle_deg"] is not None and len(e["angle_curve_deg"]) > 0
  trajs = results["trajectory"]
  assert {"opd", "rlvr", "sft", "ctrl_topkl_50", "ctrl_offpolicy", "mix_0.75", "mix_0.05"} <= set(
      trajs)
  for run, t in trajs.items():
    assert len(t["stable_rank"]) == len(t["steps"]) == 2 and t["progress"][-1] == 1.0, run
  assert set(results["accuracy"]) >= {"teacher", "base", "anchor", "opd", "rlvr", "sft",
                                      "opd_rank16", "sft_rank16"}
  for run, a in results["accuracy"].items():
    # the standard error of avg@k over distinct prompts: at most the binomial bound
    assert 0 <= a["stderr"] <= math.sqrt(a["acc"] * (1 - a["acc"]) / (a["n"] - 1)) + 1e-6, run
  # Every verdict is computed (none missing at smoke scale), and recomputing gives the same.
  assert {v["verdict"] for v in results["verdicts"]} <= {verdicts.HOLDS, verdicts.FAILS}
  assert [v["verdict"] for v in verdicts.compute_verdicts(results)] == [
      v["verdict"] for v in results["verdicts"]]
  assert results["failed_thresholds"] == verdicts.check(results)
  assert set(results["phases"]) >= {"task", "teacher", "diagnostics"}
  assert all(p["wall_s"] > 0 for p in results["phases"].values())


def test_smoke_study_resumes_instantly_and_check_exit_code(smoke_study, capsys):
  import time
  from opd_jax import cli, study
  workdir, cd, _ = smoke_study
  t0 = time.perf_counter()
  out = study.run(cd, workdir, log=lambda s: None)
  assert set(out["phases"].values()) == {"skipped"} and time.perf_counter() - t0 < 20
  # --check exits non-zero and names the failed threshold (smoke's teacher is not trained).
  code = cli.main(["study", "--config", "configs/study.py:smoke", "--workdir", str(workdir),
                   "--check"])
  err = capsys.readouterr().err
  assert code == 1 and "teacher_min" in err
  # Re-rendering from the workdir alone reproduces the report.
  (workdir / "report" / "report.md").unlink()
  path = study.render_report(workdir)
  assert path.exists() and "## Controls" in path.read_text()
