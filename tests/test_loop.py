"""End-to-end runs of the loop on the smoke presets (tiny models, CPU).

The runs are shared through module-scoped fixtures: the SFT smoke run is the OPD teacher and the
RLVR warm start, and the resume test reuses the compiled programs of the OPD run.
"""

import pathlib

import jax
import numpy as np
import pytest

from opd_jax import errors
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import run_plan

ROOT = pathlib.Path(__file__).resolve().parent.parent


def smoke(name, overrides=(), preset="smoke"):
  cd = config_lib.load_config(str(ROOT / "configs" / f"{name}.py") + f":{preset}", overrides)
  return config_lib.from_config_dict(cd)


def rows_of(summary):
  rows = metrics_lib.read_jsonl(pathlib.Path(summary["workdir"]) / "metrics.jsonl")
  return [r for r in rows if "train/loss" in r]


def series(summary, key):
  return np.asarray([r[key] for r in rows_of(summary)])


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sft_smoke")
  return loop.run(smoke("sft", ["loop.eval_every=30"]), workdir)


@pytest.fixture(scope="module")
def opd_run(tmp_path_factory, sft_run):
  workdir = tmp_path_factory.mktemp("opd_smoke")
  cfg = smoke("opd", ["teacher.source=checkpoint",
                      f"teacher.path={sft_run['checkpoint_dir']}"])
  return loop.run(cfg, workdir)


def test_sft_smoke_lowers_the_nll(sft_run):
  nll = series(sft_run, "sft/nll")
  assert sft_run["step"] == 30 and len(nll) == 30
  assert nll[-5:].mean() < 0.5 * nll[:5].mean(), nll
  # Eval at the start and the end, with the verifier; the trained model gets some right.
  evals = {e["step"]: e for e in sft_run["eval"]}
  assert set(evals) == {0, 30}
  assert evals[30]["eval/prompts"] == 32
  assert evals[30]["eval/accuracy"] > evals[0]["eval/accuracy"]


def test_opd_smoke_moves_the_teacher_gap_toward_zero(opd_run):
  gap = series(opd_run, "opd/teacher_gap")
  assert len(gap) == 20
  assert gap[:3].mean() > 1.0  # the random student is far from the SFT-trained teacher
  assert gap[-3:].mean() < 0.6 * gap[:3].mean(), gap
  # On-policy with one update per batch: the ratio starts at 1, nothing is clipped.
  assert np.allclose(series(opd_run, "pg/ratio_mean"), 1.0, atol=1e-4)
  assert np.all(series(opd_run, "pg/clip_frac") == 0.0)


def test_rlvr_smoke_raises_the_reward(tmp_path, sft_run):
  cfg = smoke("rlvr", ["student.source=checkpoint", f"student.path={sft_run['checkpoint_dir']}"])
  summary = loop.run(cfg, tmp_path)
  reward = series(summary, "rlvr/reward_mean")
  assert len(reward) == 30
  assert 0.0 < reward[:10].mean() < 0.9  # the warm start makes groups informative
  assert reward[-10:].mean() > reward[:10].mean() + 0.05, reward


def test_resume_is_bit_identical_including_data_order_and_rng(tmp_path, sft_run, opd_run):
  # Exercises every source of randomness and state: sampling, a random token transform with its
  # own state, the optimizer state and the data iterator (the pg_step compiled by the OPD run is
  # reused; its minibatch shuffles are covered by the train-step tests).
  overrides = ["teacher.source=checkpoint", f"teacher.path={sft_run['checkpoint_dir']}",
               "loop.steps=5", "loop.checkpoint_every=2", "loop.snapshot_steps=(0,)",
               "rollout.token_transforms=(('random_retention', {'rho': 0.5, 'seed': 3}),)"]
  cfg = smoke("opd", overrides)
  straight = loop.run(cfg, tmp_path / "straight")
  first = loop.run(cfg, tmp_path / "split", stop_after=3)
  assert first["step"] == 3
  resumed = loop.run(cfg, tmp_path / "split", resume=True)
  assert resumed["resumed_from"] == 3 and resumed["step"] == 5

  a = ckpt_lib.load_params(straight["checkpoint_dir"])
  b = ckpt_lib.load_params(resumed["checkpoint_dir"])
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The params moved (a trivially equal pair would prove nothing).
  init = ckpt_lib.load_params(straight["snapshots"][0])
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(leaves_a, jax.tree.leaves(init)))
  # Same per-step metrics: same prompts, same samples, same kept tokens.
  ra, rb = rows_of(straight), rows_of(resumed)
  assert [r["step"] for r in rb] == [1, 2, 3, 4, 5]
  for x, y in zip(ra, rb):
    for key in ("opd/teacher_gap", "train/loss", "tokens/kept_frac", "rollout/response_len"):
      assert x[key] == y[key], (x["step"], key)


def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, sft_run):
  # Step 4 is both the poisoned step and a checkpoint step: it must not be saved.
  cfg = smoke("sft", ["loop.steps=6", "loop.checkpoint_every=2", "loop.debug_nan_at_step=4"])
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 4\b") as err:
    loop.run(cfg, tmp_path)
  assert err.value.step == 4 and err.value.last_checkpoint == 2
  ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
  try:
    assert ckpt.latest_step() == 2
  finally:
    ckpt.close()
  params = ckpt_lib.load_params(tmp_path / "checkpoints")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  logged = [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")]
  assert 4 not in logged
  # The previous checkpoint is restorable: resuming without the fault finishes the run (and a
  # used workdir is never silently restarted).
  fixed = smoke("sft", ["loop.steps=6", "loop.checkpoint_every=2"])
  with pytest.raises(errors.UserError, match="already holds checkpoints"):
    loop.run(fixed, tmp_path)
  done = loop.run(fixed, tmp_path, resume=True)
  assert done["resumed_from"] == 2 and done["step"] == 6
  assert done["metrics"]["train/loss_finite"] == 1.0


def test_subspace_option_keeps_the_update_in_the_captured_subspace(tmp_path, sft_run):
  # Bases V_k of W_30 - W_20 (the SFT smoke run's checkpoints); continuing from W_30 with the
  # update projected after the optimizer ('post'), every kernel's W_end - W_30 is in span(V_k).
  ckpts = pathlib.Path(sft_run["checkpoint_dir"])
  k = 4
  cfg = smoke("sft", ["student.source=checkpoint", f"student.path={ckpts / '30'}",
                      f"subspace.origin={ckpts / '20'}", f"subspace.at={ckpts / '30'}",
                      f"subspace.k={k}", "optim.transforms=(('subspace_projection', 'post', {}),)",
                      "loop.steps=3", "loop.snapshot_steps=(0,)"])
  summary = loop.run(cfg, tmp_path)
  w20, w30 = ckpt_lib.load_params(ckpts / "20"), ckpt_lib.load_params(ckpts / "30")
  start = ckpt_lib.load_params(summary["snapshots"][0])
  end = ckpt_lib.load_params(summary["checkpoint_dir"])
  moved = 0
  for path, _ in jax.tree_util.tree_leaves_with_path(end):
    name = jax.tree_util.keystr(path)
    if not name.endswith("['kernel']"):
      continue
    get = lambda tree: np.asarray(_at(tree, path), np.float64)  # noqa: E731
    d_run = get(end) - get(start)
    delta = get(w30) - get(w20)
    for layer in range(delta.shape[0]):  # stacked [L, in, out]
      u, _, _ = np.linalg.svd(delta[layer], full_matrices=False)
      v = u[:, :k]  # input side of a Flax (in, out) kernel = left singular vectors
      resid = d_run[layer] - v @ (v.T @ d_run[layer])
      norm = np.linalg.norm(d_run[layer])
      assert norm > 0, name
      assert np.linalg.norm(resid) <= 1e-4 * norm, (name, layer)
      moved += 1
  assert moved >= 7 * 2  # q, k, v, o, gate, up, down in both layers


def _leaves(path):
  return [np.asarray(x) for x in jax.tree.leaves(ckpt_lib.load_params(path))]


BRANCH_SOURCE = ["loop.steps=12", "loop.checkpoint_every=4", "loop.checkpoint_keep=5",
                 "loop.snapshot_steps=(0,)", "loop.eval_every=0"]


@pytest.fixture(scope="module")
def branch_source(tmp_path_factory, sft_run):
  """An SFT smoke run with checkpoints at 4, 8, 12 (after sft_run: its programs are reused)."""
  return loop.run(smoke("sft", BRANCH_SOURCE), tmp_path_factory.mktemp("branch_source"))


def test_a_branch_continues_its_source_exactly_and_under_a_projection(tmp_path, branch_source):
  """`loop.branch_from` (the paper's shared resume): from the source's step-8 checkpoint, a
  branch with the same config repeats steps 9-12 bit for bit (data position, RNG, Adam's moments
  and the cosine schedule all continue); a branch that adds the rank-k projection takes, at its
  first step, the projection of the plain continuation's first update."""
  ckpts = pathlib.Path(branch_source["checkpoint_dir"])
  # The source may still be training: its unfinished write is left alone.
  unfinished = ckpts / f"16{ckpt_lib._TMP_MARK}1234"
  unfinished.mkdir()
  same = loop.run(smoke("sft", BRANCH_SOURCE + [f"loop.branch_from={ckpts / '8'}"]),
                  tmp_path / "same")
  assert unfinished.is_dir()
  unfinished.rmdir()
  assert same["resumed_from"] == 8 and same["step"] == 12
  for x, y in zip(_leaves(same["checkpoint_dir"]), _leaves(ckpts / "12"), strict=True):
    np.testing.assert_array_equal(x, y)
  ra = {r["step"]: r for r in rows_of(branch_source)}
  rb = rows_of(same)
  assert [r["step"] for r in rb] == list(range(9, 13))
  for r in rb:
    for key in ("train/loss", "train/lr", "train/grad_norm"):
      assert r[key] == ra[r["step"]][key], (r["step"], key)

  # One step each, plain and projected: W_9 - W_8 of the projected branch = V V^T (plain's).
  k = 4
  plain = loop.run(smoke("sft", BRANCH_SOURCE + [f"loop.branch_from={ckpts / '8'}"]),
                   tmp_path / "plain9", stop_after=9)
  proj = loop.run(smoke("sft", BRANCH_SOURCE + [
      f"loop.branch_from={ckpts / '8'}", f"subspace.origin={ckpts / '4'}",
      f"subspace.at={ckpts / '8'}", f"subspace.k={k}",
      "optim.transforms=(('subspace_projection', 'post', {}),)"]), tmp_path / "proj9",
      stop_after=9)
  assert plain["step"] == proj["step"] == 9
  w4, w8 = ckpt_lib.load_params(ckpts / "4"), ckpt_lib.load_params(ckpts / "8")
  p9 = ckpt_lib.load_params(plain["checkpoint_dir"])
  q9 = ckpt_lib.load_params(proj["checkpoint_dir"])
  checked = 0
  for path, _ in jax.tree_util.tree_leaves_with_path(w8):
    name = jax.tree_util.keystr(path)
    get = lambda tree: np.asarray(_at(tree, path), np.float64)  # noqa: E731
    d_plain, d_proj = get(p9) - get(w8), get(q9) - get(w8)
    if not name.endswith("['kernel']"):
      np.testing.assert_array_equal(d_proj, d_plain, err_msg=name)  # not projected
      continue
    delta = get(w8) - get(w4)
    for layer in range(delta.shape[0]):
      u = np.linalg.svd(delta[layer], full_matrices=False)[0][:, :k]
      want = u @ (u.T @ d_plain[layer])
      assert np.linalg.norm(want) > 0, name
      # float32 weights: the update is added to W_8 and rounded, so compare at its scale.
      np.testing.assert_allclose(d_proj[layer], want, rtol=0,
                                 atol=1e-3 * np.abs(d_plain[layer]).max(), err_msg=name)
      checked += 1
  assert checked >= 7 * 2


def test_a_branch_refuses_other_changes_and_snapshots_naming_them(tmp_path, branch_source):
  ckpts = pathlib.Path(branch_source["checkpoint_dir"])
  with pytest.raises(errors.ResumeConfigError,
                     match=r"loop\.branch_from=.*differs .* in optim\.lr: 0\.\d+ -> 0\.5"):
    loop.run(smoke("sft", BRANCH_SOURCE + ["optim.lr=0.5", f"loop.branch_from={ckpts / '8'}"]),
             tmp_path / "a")
  with pytest.raises(errors.UserError, match="is a parameter snapshot, not a checkpoint"):
    loop.run(smoke("sft", BRANCH_SOURCE + [f"loop.branch_from={branch_source['snapshots'][0]}"]),
             tmp_path / "b")
  with pytest.raises(errors.UserError, match="no checkpoint at"):
    loop.run(smoke("sft", [f"loop.branch_from={tmp_path / 'missing'}"]), tmp_path / "c")


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_distill_route_lowers_the_divergence(tmp_path, sft_run):
  cfg = smoke("opd", ["teacher.source=checkpoint", f"teacher.path={sft_run['checkpoint_dir']}",
                      "loop.steps=6"], preset="distill_smoke")
  summary = loop.run(cfg, tmp_path)
  kl = series(summary, "distill/reverse_kl")
  assert len(kl) == 6 and kl[0] > 1.0
  assert kl[-1] < 0.85 * kl[0], kl
  assert "rollout/response_len" in rows_of(summary)[0]


def test_load_model_sources_agree(tmp_path, sft_run):
  from opd_jax.models import hf
  from opd_jax.train.config import ModelSpec
  mesh = loop.mesh_lib.make_mesh(loop.mesh_lib.MeshConfig())
  rules = loop.sharding.DEFAULT_RULES
  params, meta_cfg = ckpt_lib.load_params_and_config(sft_run["checkpoint_dir"])
  base = smoke("sft").student.model
  assert meta_cfg == base
  # Our checkpoint (architecture from its meta), numerics from the spec.
  spec = ModelSpec(source="checkpoint", path=sft_run["checkpoint_dir"],
                   model=base.replace(dtype="bfloat16", n_layers=9))
  cfg, _, got = run_plan.load_model(spec, mesh, rules)
  assert cfg == base.replace(dtype="bfloat16")  # n_layers from the checkpoint, dtype from spec
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A Hugging Face directory written by hf.save.
  hf.save(tmp_path / "hf", base, params)
  cfg, _, got = run_plan.load_model(ModelSpec(source="hf", path=str(tmp_path / "hf"), model=base),
                                mesh, rules)
  assert cfg == base
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # In-memory params must match the spec's architecture; the error names the tensor.
  bad = jax.tree.map(lambda x: x, params)
  bad["final_norm"]["scale"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"\['final_norm'\]\['scale'\]: shape \(3,\) != "
                                       r"expected \(64,\)"):
    run_plan.load_model(ModelSpec(model=base), mesh, rules, params=bad)


def test_resuming_a_finished_run_is_a_no_op_that_lists_its_snapshots(tmp_path, sft_run):
  cfg = smoke("sft", ["loop.steps=2", "loop.snapshot_steps=(0, 2)"])
  first = loop.run(cfg, tmp_path, resume=True)  # nothing to resume: a fresh start
  assert first["resumed_from"] is None and sorted(first["snapshots"]) == [0, 2]
  again = loop.run(cfg, tmp_path, resume=True)
  assert again["resumed_from"] == 2 and again["step"] == 2
  assert again["snapshots"] == first["snapshots"]
  assert [r["step"] for r in rows_of(again)] == [1, 2]


def test_several_named_eval_sets_log_avg_pass_and_standard_errors_per_set(tmp_path):
  """Two prompt-set files as data.eval_sets beside the generated eval split: every eval logs each
  set under eval/<name>/ (avg@k, pass@k and their SEs over the distinct problems: set 'rep'
  repeats each problem 3 times and is deduplicated), and the unnamed split keeps its names."""
  import json

  from opd_jax.data import tasks
  base = smoke("sft")
  problems = tasks.generate(base.data.task, "eval", 6, seed=123)

  def write(name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": e.prompt}],
                                        "reward_model": {"ground_truth": e.answer}}) + "\n"
                            for e in rows))
    return str(path)

  sets = (("plain", write("plain", problems[:4]), ""),
          ("rep", write("rep", [e for e in problems[3:] for _ in range(3)]), "dapo_math_17k"))
  cfg = smoke("sft", ["loop.steps=2", "loop.eval_every=2", "loop.checkpoint_every=0",
                      "data.eval_examples=4", "loop.eval_greedy=false", "loop.eval_k=2",
                      f"data.eval_sets={sets!r}"])
  summary = loop.run(cfg, tmp_path / "run")
  assert [e["step"] for e in summary["eval"]] == [0, 2]
  rows = metrics_lib.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  logged = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in logged] == [0, 2]
  for r in logged:
    assert r["eval/prompts"] == 4 and "eval/avg@2_se" in r
    for name, distinct in (("plain", 4), ("rep", 3)):
      p = f"eval/{name}/"
      assert r[p + "prompts"] == distinct
      assert r[p + "avg@2"] == pytest.approx(r[p + "accuracy"], abs=1e-12)
      for key in ("avg@2", "pass@2"):
        assert 0.0 <= r[p + key] <= 1.0 and r[p + key + "_se"] >= 0.0
      assert r[p + "pass@2"] <= r[p + "pass_at_k"] + 1e-12
  data = next(r for r in rows if "data/eval/rep/dedup/duplicates" in r)
  assert data["data/eval/rep/dedup/duplicates"] == 6 and data["data/eval/plain/kept"] == 4
  assert summary["data"]["eval/rep"]["kept"] == 3


def test_live_geometry_is_logged_every_n_steps_and_matches_the_saved_weights(tmp_path):
  """`geometry.every=2` on 8 devices (the model sharded over fsdp): density / ||dW||_F / stable
  rank of the update since the initial student at steps 2 and 4 (Sim_K from the second point
  on), checked against the snapshot and checkpoint on disk; a resumed run measures from the same
  origin."""
  import geometry_reference as ref
  from opd_jax.geometry import matrices
  over = ["geometry.every=2", "loop.steps=4", "loop.checkpoint_every=2", "loop.snapshot_steps=(0,)",
          "loop.transfer_guard=disallow", "mesh.shape=(1,-1,1)"]
  summary = loop.run(smoke("sft", over), tmp_path)
  rows = {r["step"]: r for r in rows_of(summary)}
  assert "geometry/density" not in rows[1] and "geometry/density" in rows[2]
  assert "geometry/sim_k/q" not in rows[2] and 0 < rows[4]["geometry/sim_k/q"] <= 1 + 1e-5
  w0 = ckpt_lib.load_params(summary["snapshots"][0])
  w4 = ckpt_lib.load_params(pathlib.Path(summary["checkpoint_dir"]) / "4")
  changed = total = 0
  frob = {}
  for m0, m4 in zip(matrices.named_matrices(w0, include_1d=True),
                    matrices.named_matrices(w4, include_1d=True)):
    c = ref.relative_changed(np.asarray(m0.array), np.asarray(m4.array))
    changed, total = changed + int(c.sum()), total + c.size
    if m0.module_type in matrices.ATTENTION_TYPES:
      d = np.asarray(m4.array, np.float64) - np.asarray(m0.array, np.float64)
      s = np.linalg.svd(d, compute_uv=False)
      frob.setdefault(m0.module_type, []).append((np.sqrt((s ** 2).sum()), (s ** 2).sum() / s[0] ** 2))
  np.testing.assert_allclose(rows[4]["geometry/density"], changed / total, rtol=1e-6)
  for t, vals in frob.items():
    np.testing.assert_allclose(rows[4][f"geometry/frobenius/{t}"], np.mean([f for f, _ in vals]),
                               rtol=1e-4)
    # randomized (the largest Ritz value of the subspace iteration); converged on these updates
    np.testing.assert_allclose(rows[4][f"geometry/stable_rank/{t}"], np.mean([r for _, r in vals]),
                               rtol=1e-2)
  resumed = loop.run(smoke("sft", over[:1] + ["loop.steps=6"] + over[2:]), tmp_path, resume=True)
  rows = {r["step"]: r for r in rows_of(resumed)}
  assert "geometry/density" in rows[6] and "geometry/sim_k/q" not in rows[6]
  assert rows[6]["geometry/frobenius/q"] > rows[4]["geometry/frobenius/q"] * 0.5


def test_live_geometry_of_an_opd_run_is_in_jsonl_and_tensorboard(tmp_path):
  """An OPD run with the monitor on writes its points to metrics.jsonl and to TensorBoard, the
  same values under the same tags and steps."""
  from test_metrics import _read_tfrecords
  over = ["geometry.every=2", "loop.steps=4", "loop.tensorboard=true", "loop.checkpoint_every=0",
          "loop.snapshot_steps=()", "loop.transfer_guard=disallow"]
  summary = loop.run(smoke("opd", over), tmp_path)
  jsonl = {(r["step"], k): v for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
           for k, v in r.items() if k.startswith("geometry/")}
  assert {s for s, _ in jsonl} == {2, 4} and (4, "geometry/sim_k/q") in jsonl
  assert {k for _, k in jsonl} >= {"geometry/density", "geometry/density/q",
                                   "geometry/frobenius/q", "geometry/stable_rank/o"}
  files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(files) == 1 and summary["step"] == 4
  tb = {(e.step, v.tag): v.simple_value for e in _read_tfrecords(files[0])
        for v in e.summary.value if v.tag.startswith("geometry/")}
  assert set(tb) == set(jsonl)
  for key, value in jsonl.items():
    assert tb[key] == pytest.approx(value, rel=1e-6), key


def test_opd_on_deepcoder_rows_with_a_livecodebench_eval_set(tmp_path):
  """The code domain from files: DeepCoder-layout training rows and a LiveCodeBench eval set
  (the fixtures, one malformed row each: skipped and counted), the sandboxed code verifier."""
  fx = ROOT / "tests" / "fixtures"
  cfg = smoke("opd", ["data.source=file", "data.layout=deepcoder",
                      f"data.path={fx / 'deepcoder_sample.jsonl'}", "data.on_error=skip",
                      f"data.eval_sets=(('lcb', '{fx / 'livecodebench_sample.parquet'}', "
                      "'livecodebench'),)", "sampler.max_new_tokens=8", "loop.steps=1",
                      "loop.eval_every=1", "loop.batch_size=2", "data.train_examples=0",
                      "data.eval_examples=0", "data.prompt_buckets=(1024,)",
                      "loop.snapshot_steps=()"], preset="code_smoke")
  summary = loop.run(cfg, tmp_path)
  assert summary["data"]["train"]["skipped"] == {"bad_tests": 1}
  assert summary["data"]["eval/lcb"]["skipped"] == {"bad_tests": 1}
  final = summary["eval"][-1]
  assert final["eval/lcb/prompts"] == 3 and 0 <= final["eval/lcb/avg@1"] <= 1


def test_eval_batches_round_up_to_whole_prompts_per_process_and_batch_shard(monkeypatch):
  from opd_jax.train import mesh as mesh_lib
  cfg = smoke("opd", ["loop.eval_greedy=false", "loop.eval_k=2", "mesh.shape=(1,-1,1)"])
  plan = run_plan.resolve(cfg, shapes_only=True)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert mesh_lib.batch_shards(mesh, cfg.mesh.rules) == jax.device_count() == 8
  prompts = lambda n: run_plan.eval_batch_prompts(  # noqa: E731
      cfg.loop.eval_batch_size, n, plan.eval_k, mesh, cfg.mesh.rules)
  # 5 prompts x 2 samples = 10 rows do not split over 8 shards: 8 prompts (3 padding) do.
  assert prompts(5) == 8 and prompts(1000) == cfg.loop.eval_batch_size
  # Several processes: whole prompts per process and per shard (a process's shards need not be
  # adjacent in the global batch).
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  assert prompts(5) == 24
