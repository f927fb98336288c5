"""train/plan.py: every phase of one iteration compiled from abstract shapes on the 8 fake devices
of conftest.py, per-device memory per component, and the `opd-jax plan` command."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from opd_jax import cli
from opd_jax.models import attention
from opd_jax.models import sharding
from opd_jax.train import config as config_lib
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import plan as plan_lib
from opd_jax.train import run_plan

ROOT = pathlib.Path(__file__).resolve().parent.parent
SFT_SMOKE = str(ROOT / "configs" / "sft.py") + ":smoke"
MESH = (2, 4, 1)  # data=2 x fsdp=4: the batch is split 8 ways, parameters 4 ways

RESIDENT = ("student_params", "optimizer_state", "state_extras")


def resolve(name, overrides=(), preset="smoke"):
  cd = config_lib.load_config(str(ROOT / "configs" / f"{name}.py") + f":{preset}", overrides)
  return run_plan.resolve(config_lib.from_config_dict(cd), shapes_only=True)


def plan(rp, mesh=MESH):
  # As a multi-process CPU run compiles the programs: `_check_totals` audits their collectives.
  with sharding.ordered_collectives():
    return plan_lib.plan_run(rp, 8, mesh, print_fn=None)


@pytest.fixture(scope="module")
def opd():
  rp = resolve("opd")
  return rp, plan(rp)


def _shard_bytes(tree) -> int:
  """Bytes device 0 holds of a tree of real arrays (an independent count of the plan's)."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


# SFT: `test_cli_plan_prints_the_breakdown_and_json`.
@pytest.mark.parametrize("name,preset,resident,phases", [
    ("rlvr", "smoke", RESIDENT, ("sampler", "train_step")),
    # The direct route: the teacher's distributions are computed inside the step.
    ("opd", "distill_smoke", RESIDENT + ("teacher_params",), ("sampler", "train_step")),
])
def test_breakdown_has_every_component_of_the_recipe(name, preset, resident, phases):
  out = plan(resolve(name, preset=preset))
  assert out["method"] == ("distill" if preset.startswith("distill") else name)
  assert tuple(out["resident"]) == resident and tuple(out["phases"]) == phases
  _check_totals(out)


def test_opd_breakdown_and_printout(opd, capsys):
  rp, out = opd
  assert tuple(out["resident"]) == RESIDENT + ("teacher_params",)
  assert tuple(out["phases"]) == ("sampler", "teacher_scoring", "train_step")
  assert out["method"] == "opd" and out["rows"] == rp.rows == 64
  assert out["mesh_shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
  _check_totals(out)
  print(plan_lib.format_plan(out))
  text = capsys.readouterr().out
  for word in ("student params", "optimizer state", "teacher params", "sampler (student)",
               "of which KV cache", "teacher scoring (teacher)", "train step", "total = resident",
               "largest phase"):
    assert word in text, word


def _check_totals(out):
  assert out["resident_bytes"] == sum(out["resident"].values())
  for name, ph in out["phases"].items():
    assert ph["transient_bytes"] > 0, name
    # Every weight a phase reads is among its XLA arguments.
    assert ph["argument_bytes"] >= ph["resident_args_bytes"] > 0, name
    # No loop with collectives races another collective (multi-process CPU would hang).
    assert ph["unordered_collectives"] == 0 or not out["collectives_ordered"], name
  peak = max(ph["transient_bytes"] for ph in out["phases"].values())
  assert out["phases"][out["peak_phase"]]["transient_bytes"] == peak
  assert out["total_bytes"] == out["resident_bytes"] + peak
  assert out["components"] == {**out["resident"],
                               **{k: v["transient_bytes"] for k, v in out["phases"].items()}}


def test_resident_weights_equal_the_bytes_of_real_sharded_arrays(opd):
  rp, out = opd
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=MESH), jax.devices()[:8])
  _, params = mesh_lib.init_sharded_params(rp.student, mesh)
  _, teacher = mesh_lib.init_sharded_params(rp.teacher, mesh)
  assert out["resident"]["student_params"] == _shard_bytes(params)
  assert out["resident"]["teacher_params"] == _shard_bytes(teacher)
  # float32 weights split 4 ways over fsdp (norms replicated: a little more than a quarter).
  n = rp.student.num_params
  assert n * 4 / 4 <= out["resident"]["student_params"] < n * 4 / 2
  # Adam: two float32 moments per parameter, sharded like the parameters, plus its step count.
  assert 2 * out["resident"]["student_params"] <= out["resident"]["optimizer_state"] <= (
      2 * out["resident"]["student_params"] + 64)


def test_sampler_holds_at_least_its_kv_cache(opd):
  rp, out = opd
  m = rp.student
  s = rp.sampler
  # The decode cache: prompt + max_new - 1 slots rounded up to whole decode blocks (64 slots);
  # rows: the batch (or the 'continuous' decode slots: half of it, at least min_bucket, a
  # multiple of the batch devices), plus the distinct prompts' prefill cache when shared.
  cache_len = -(-(rp.prompt_buckets[-1] + rp.max_new_tokens - 1) // 64) * 64
  batch_devices = MESH[0] * MESH[1]
  prompts = rp.rows // s.group_size
  if s.mode == "continuous":
    decode_rows = min(rp.rows, -(-max(rp.rows // 2, s.min_bucket) // batch_devices) * batch_devices)
    parts = (s.slots or decode_rows, prompts)
  else:
    parts = (rp.rows, prompts) if s.group_size > 1 else (rp.rows,)
  analytic = sum(m.n_layers * 2 * -(-r // batch_devices) * cache_len * m.n_kv_heads * m.head_dim
                 * np.dtype(m.dtype).itemsize for r in parts)
  sampler = out["phases"]["sampler"]
  assert sampler["kv_cache_bytes"] == analytic
  assert sampler["temp_bytes"] >= analytic and sampler["transient_bytes"] >= analytic


def test_attention_score_blocks_follow_the_blocked_attention(opd):
  rp, out = opd
  m = rp.student
  per_block = lambda q, k: rp.rows * m.n_heads * q * k * 4 // (MESH[0] * MESH[1])  # noqa: E731
  t = rp.seq_len
  q = attention.flash_block(t, m.attention_block)
  assert out["phases"]["train_step"]["attention_scores_bytes"] == per_block(q, q)
  p_len = rp.prompt_buckets[-1]
  cache_len = -(-(p_len + rp.max_new_tokens - 1) // 64) * 64   # whole decode blocks
  prefill = plan_lib.attention_score_shape(m, p_len, p_len, cache_len=cache_len)
  assert prefill[0] == p_len and p_len <= prefill[1] <= cache_len
  assert out["phases"]["sampler"]["attention_scores_bytes"] == per_block(*prefill)
  # Long training sequences: one block x block pair, not T x T; short ones: the one-shot scores.
  cfg = m.replace(attention_block=512, cache_block=256)
  assert plan_lib.attention_score_shape(cfg, 4096, 4096) == (512, 512)
  assert plan_lib.attention_score_shape(cfg, 256, 256) == (256, 256)
  assert plan_lib.attention_score_shape(cfg, 600, 600) == (304, 304)  # 2 even blocks
  assert plan_lib.attention_score_shape(cfg.replace(attention_block=0), 4096, 4096) == (4096,
                                                                                        4096)
  # Through a cache: the bucket that covers the last query (5000 slots: 20 blocks of 256 -> 10
  # buckets of 512), never the whole cache unless the queries reach its end.
  assert plan_lib.attention_score_shape(cfg, 1, 5000, cache_len=5000, q_start=300) == (1, 512)
  assert plan_lib.attention_score_shape(cfg, 64, 5000, cache_len=5000, q_start=4936) == (64,
                                                                                         5000)
  assert plan_lib.attention_score_shape(cfg.replace(cache_block=0), 1, 5000, cache_len=5000,
                                        q_start=300) == (1, 5000)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(2, 2, 2)), jax.devices()[:8])
  rules = mesh_lib.MeshConfig().rules
  # batch over data x fsdp (4 ways), heads over tensor (2 ways).
  assert plan_lib.attention_score_bytes(cfg, 64, 512, 512, mesh, rules) == (
      64 * cfg.n_heads * 512 * 512 * 4 // 8)


def test_every_rollout_phase_when_the_config_asks_for_it():
  # Student re-scoring, KL_t for the baseline-corrected estimator, KL-to-reference scoring.
  out = plan(resolve("opd", ("rollout.recompute_old_logp=True", "pg.kl_coef=0.1",
                             "credit.kind=baseline_corrected")))
  assert tuple(out["resident"]) == RESIDENT + ("teacher_params", "reference_params")
  assert tuple(out["phases"]) == ("sampler", "student_scoring", "teacher_scoring", "kl",
                                  "reference_scoring", "train_step")
  assert out["resident"]["reference_params"] == out["resident"]["student_params"]
  _check_totals(out)


def test_several_teachers_each_resident_and_scored_in_turn():
  # Two routed teachers (prompts by task family), KL_t on: every teacher has its own resident
  # params and its own scoring and KL phases; the bound is the largest of those phases.
  out = plan(resolve("opd", ("credit.kind=baseline_corrected",), preset="two_teacher_smoke"))
  assert tuple(out["resident"]) == RESIDENT + ("teacher_params/chain", "teacher_params/sum")
  assert tuple(out["phases"]) == ("sampler", "teacher_scoring/chain", "kl/chain",
                                  "teacher_scoring/sum", "kl/sum", "train_step")
  assert set(out["teachers"]) == {"chain", "sum"}
  scoring = [k for k in out["phases"] if k.startswith(("teacher_scoring/", "kl/"))]
  assert out["teacher_scoring_bound_bytes"] == max(out["phases"][k]["transient_bytes"]
                                                   for k in scoring)
  assert out["teacher_num_params"] == sum(t["num_params"] for t in out["teachers"].values())
  text = plan_lib.format_plan(out)
  assert "teacher params (chain)" in text and "teacher scoring bound" in text
  _check_totals(out)


def test_learned_value_head_and_token_state_are_planned():
  out = plan(resolve("opd", ("credit.kind=gae", "credit.value=learned",
                             "rollout.token_transforms=(('top_kl_retention', {'rho': 0.5}),)")))
  assert tuple(out["phases"]) == ("sampler", "teacher_scoring", "value_head", "train_step")
  # step + rng (12 bytes) + the replicated value head with its Adam moments + the token state.
  assert out["resident"]["state_extras"] > 12
  _check_totals(out)


def test_plan_needs_the_devices_it_names(opd):
  rp, _ = opd
  with pytest.raises(RuntimeError, match="xla_force_host_platform_device_count=64"):
    plan_lib.plan_run(rp, 64, (1, 64, 1), print_fn=None)


@pytest.mark.parametrize("name", ["opd", "sft"])
def test_adapter_runs_plan_the_adapters_the_frozen_base_and_the_merged_policy(name):
  """With adapters the state's params and optimizer are the adapters' (bytes of the real
  `lora.init` arrays), the base is frozen beside them, and the rollout reads the merged policy
  (the full parameters)."""
  from opd_jax.models import lora
  from opd_jax.models import transformer
  rp = resolve(name, ["lora.rank=4", "lora.alpha=8.0"])
  out = plan_lib.plan_run(rp, 1, (1, 1, 1), print_fn=None)
  res = out["resident"]
  params = transformer.init(rp.student, 0)[1]
  adapters, base = lora.init(params, rp.cfg.lora)
  nbytes = lambda t: sum(np.asarray(x).nbytes for x in jax.tree.leaves(t))  # noqa: E731
  assert res["student_params"] == nbytes(adapters) < nbytes(params) / 4
  assert res["frozen_base"] == nbytes(base) == 4 * rp.student.num_params
  # Adam: two float32 moments per adapter parameter, plus its step count.
  assert 2 * res["student_params"] <= res["optimizer_state"] <= 2 * res["student_params"] + 64
  if name == "opd":
    assert res["merged_policy"] == nbytes(params)
    assert {"sampler", "teacher_scoring", "train_step"} <= set(out["phases"])
    assert out["phases"]["sampler"]["resident_args_bytes"] == res["merged_policy"]
  else:  # no rollout: nothing reads a merged copy
    assert "merged_policy" not in res and set(out["phases"]) == {"train_step"}
  assert out["phases"]["train_step"]["resident_args_bytes"] >= res["frozen_base"]


# -- the command ----------------------------------------------------------------------------------
def test_cli_plan_prints_the_breakdown_and_json(capsys):
  code = cli.main(["plan", "--config", SFT_SMOKE, "--devices", "8", "--mesh", "2,2,2", "--json"])
  assert code == 0
  out = capsys.readouterr().out
  assert "per-device memory" in out and "8 devices (data=2 x fsdp=2 x tensor=2)" in out
  assert "train step" in out and "total = resident" in out
  result = json.loads(out[out.index("\n{") + 1:])
  assert result["n_devices"] == 8 and result["method"] == "sft"
  assert list(result["phases"]) == ["train_step"]  # SFT plans only the step
  assert set(result["resident"]) == set(RESIDENT)  # (JSON keys are sorted)
  _check_totals(result)
  step = result["phases"]["train_step"]
  assert step["argument_bytes"] > 0 and result["total_bytes"] > result["resident_bytes"] > 0
  # The smoke student's float32 parameters and Adam moments are spread over the devices: far
  # below three replicated copies.
  assert result["num_params"] * 4 * 3 > result["resident_bytes"]


@pytest.mark.parametrize("args,want", [
    (["--devices", "8", "--mesh", "1,a,1"], "argument --mesh: expected comma-separated sizes"),
    (["--devices", "8", "--mesh", "1,0,8"], "argument --mesh: sizes must be >= 1"),
    (["--devices", "0"], "argument --devices: must be >= 1, got 0")])
def test_cli_plan_refuses_bad_devices_and_mesh_in_one_line(args, want, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["plan", "--config", SFT_SMOKE] + args)
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2 and want in last and "Traceback" not in last, last


def test_cli_plan_reexecutes_itself_with_fake_devices_when_too_few_exist(monkeypatch):
  # 8 devices exist here; asking for 16 must re-run the same command in a fresh interpreter with
  # the fake-device flag set before jax is imported (the real path is exercised by hand / on CI
  # machines without the test's XLA_FLAGS: it costs a cold compile in a new process).
  calls = []

  def fake_run(argv, env, check):
    calls.append((argv, env))
    return subprocess.CompletedProcess(argv, 0)

  monkeypatch.setattr(cli.subprocess, "run", fake_run)
  monkeypatch.delenv("OPD_JAX_PLAN_REEXEC", raising=False)
  args = ["plan", "--config", SFT_SMOKE, "--devices", "16", "--config.loop.batch_size=32"]
  assert cli.main(args) == 0
  (argv, env), = calls
  assert argv == [sys.executable, "-m", "opd_jax.cli"] + args
  assert "--xla_force_host_platform_device_count=16" in env["XLA_FLAGS"]
  assert env["JAX_PLATFORMS"] == "cpu" and env["OPD_JAX_PLAN_REEXEC"] == "1"
  # Inside the re-executed process, still too few devices is an error (no endless loop).
  monkeypatch.setenv("OPD_JAX_PLAN_REEXEC", "1")
  with pytest.raises(SystemExit, match="asked for 16 devices but only 8 exist"):
    cli.main(args)


@pytest.mark.parametrize("overrides", [[], ["lora.rank=4", "lora.alpha=8.0"]], ids=["full", "lora"])
def test_live_geometry_monitor_is_planned(overrides):
  """With `geometry.every` the monitor's origin (the initial student's full weights) and bases
  are resident and the monitor is a phase; without it neither appears."""
  from opd_jax.geometry import live
  from opd_jax.models import transformer
  rp = resolve("opd", overrides + ["geometry.every=5"])
  out = plan_lib.plan_run(rp, 1, (1, 1, 1), print_fn=None)
  res = out["resident"]
  params = transformer.init(rp.student, 0)[1]
  bases = live.init_bases(params, rp.cfg.geometry)
  nbytes = lambda t: sum(np.asarray(x).nbytes for x in jax.tree.leaves(t))  # noqa: E731
  assert res["geometry_origin"] == nbytes(params) and res["geometry_bases"] == nbytes(bases)
  ph = out["phases"]["live_geometry"]
  assert ph["resident_args_bytes"] == nbytes(params) * 2 + nbytes(bases)
  assert ph["transient_bytes"] >= 0 and "live geometry monitor" in plan_lib.format_plan(out)
  plain = plan_lib.plan_run(resolve("opd", overrides), 1, (1, 1, 1), print_fn=None)
  assert "live_geometry" not in plain["phases"] and "geometry_origin" not in plain["resident"]
