"""Every recipe, and every option of the PG route, runs two loop steps with the step loop under
`jax.transfer_guard("disallow")` (loop.transfer_guard): no hidden host <-> device copy. Each case
also checks that its option shows up in the metrics it is meant to drive."""

import dataclasses
import pathlib

import numpy as np
import pytest

from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import recipes
from opd_jax.train import run_plan

ROOT = pathlib.Path(__file__).resolve().parent.parent
TWO_STEPS = ["loop.steps=2", "loop.batch_size=4", "loop.checkpoint_every=0",
             "loop.transfer_guard=disallow"]

CASES = {
    # name: (config file:preset, overrides, metrics that must be present)
    "sft": ("sft.py:smoke", ["loop.eval_every=2", "data.eval_examples=8"],
            ["train/loss", "eval/accuracy", "eval/verifier/wrong"]),
    "opd": ("opd.py:smoke", [], ["opd/teacher_gap", "rollout/adv_mean"]),
    "rlvr_kl_k3": ("rlvr.py:smoke", ["pg.kl_coef=0.1"],
                   ["rlvr/reward_mean", "pg/kl_ref", "verifier/correct", "verifier/unparsable"]),
    "mixed": ("opd.py:smoke", ["method=mixed", "rollout.mix_alpha=0.25"],
              ["rlvr/reward_mean", "opd/teacher_gap"]),
    "distill": ("opd.py:distill_smoke", [], ["distill/reverse_kl", "rollout/response_len"]),
    "sparsified_gae_neg_kl": ("opd.py:smoke", [
        'rollout.token_transforms=(("top_kl_retention", {"rho": 0.5}),)', "credit.kind=gae",
        "credit.lam=0.9", "credit.gamma=0.99"], ["tokens/kept_frac", "opd/reverse_kl"]),
    "gae_learned_value": ("opd.py:smoke", ["credit.kind=gae", "credit.value=learned",
                                           "pg.value_coef=1.0", "pg.value_lr=0.01"],
                          ["value/loss", "value/mse", "value/old_mean"]),
    "offpolicy_cr_opd": ("opd.py:smoke", ["rollout.policy=teacher", "pg.pg.eps_low=1.0",
                                          "pg.pg.eps_high=1.0", "pg.cr.coef=1.0",
                                          "pg.cr.student_top_k=8"],
                         ["opd/teacher_gap", "cr/loss", "cr/active_frac", "time/student_score_s"]),
    "moe_teacher": ("opd.py:moe_teacher_smoke", [], ["opd/teacher_gap", "time/teacher_score_s"]),
    "code_rlvr": ("rlvr.py:code_smoke", ["loop.eval_every=2", "data.eval_examples=4"],
                  ["verifier/compile_error", "verifier/pass", "eval/verifier/compile_error"]),
    "kl_k1_ppo_epochs": ("opd.py:smoke", ["pg.kl_coef=0.05", "pg.kl_kind=k1", "pg.epochs=2",
                                          "pg.minibatches=2", "pg.micro_batches=2",
                                          "rollout.recompute_old_logp=true"],
                         ["pg/kl_ref", "train/updates"]),
}


def _config(name):
  spec, overrides, _ = CASES[name]
  cd = config_lib.load_config(str(ROOT / "configs" / spec), TWO_STEPS + overrides)
  return config_lib.from_config_dict(cd)


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_runs_two_steps_with_no_hidden_transfer(name, tmp_path):
  cfg = _config(name)
  summary = loop.run(cfg, tmp_path)
  assert summary["step"] == 2
  rows = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  keys = set().union(*rows)
  for key in CASES[name][2]:
    assert key in keys, (key, sorted(keys))
  train = [r for r in rows if "train/loss" in r]
  assert len(train) == 2 and all(np.isfinite(r["train/loss"]) for r in train)
  # Where the time went: the split adds up to the step's wall time; throughput and MFU.
  for r in train:
    parts = sum(v for k, v in r.items() if k.startswith("time/") and k != "time/step_s")
    assert parts == pytest.approx(r["time/step_s"], rel=1e-6)
    assert r["time/update_s"] > 0 and r["perf/mfu"] > 0 and r["perf/processed_tokens_per_s"] > 0
  if CASES[name][0] != "sft.py:smoke":
    assert train[-1]["time/sample_s"] > 0 and train[-1]["perf/generated_tokens_per_s"] > 0
  if name == "kl_k1_ppo_epochs":
    assert train[-1]["train/updates"] == 4
    assert train[-1]["pg/kl_ref"] != 0.0  # the policy moved away from the frozen reference
  if name == "rlvr_kl_k3":  # every rollout row has exactly one reason
    last = train[-1]
    assert sum(last[f"verifier/{r}"] for r in ("correct", "wrong", "unparsable")) == 32
  if name == "gae_learned_value":
    # The head starts at zero and learns: step 2's rollout values are no longer all zero.
    assert train[0]["value/old_mean"] == 0.0 and train[1]["value/old_mean"] != 0.0


def test_the_state_carries_what_the_recipe_evolves(tmp_path):
  """Token-transform state and the value head are TrainState fields, saved by orbax and restored
  on resume (no side channel)."""
  cfg = _config("gae_learned_value")
  cfg = cfg.replace(
      rollout=dataclasses.replace(cfg.rollout, token_transforms=(
          ("random_retention", {"rho": 0.5, "seed": 3}),)),
      loop=dataclasses.replace(cfg.loop, checkpoint_every=1, snapshot_steps=(2,)))
  loop.run(cfg, tmp_path, stop_after=1)
  resumed = loop.run(cfg, tmp_path, resume=True)
  straight = loop.run(cfg, tmp_path / "straight")
  assert resumed["resumed_from"] == 1
  # The value head is exported apart from the policy; the policy snapshot is the model alone.
  head = ckpt_lib.load_value_head(resumed["snapshots"][2])
  assert set(head) == {"kernel", "bias"} and np.any(np.asarray(head["kernel"]) != 0)
  np.testing.assert_array_equal(head["kernel"], ckpt_lib.load_value_head(
      straight["snapshots"][2])["kernel"])
  assert "value" not in ckpt_lib.load_params(resumed["snapshots"][2])
  np.testing.assert_array_equal(resumed["metrics"]["value/loss"],
                                straight["metrics"]["value/loss"])
  np.testing.assert_array_equal(resumed["metrics"]["train/loss"],
                                straight["metrics"]["train/loss"])


def test_every_method_has_one_recipe_and_plans_its_batch():
  assert set(recipes.METHODS) == {"sft", "opd", "rlvr", "mixed", "distill"}
  for name in ("sft", "opd", "distill", "gae_learned_value", "rlvr_kl_k3"):
    plan = run_plan.resolve(_config(name), shapes_only=True)
    batch = plan.recipe.abstract_batch(plan)
    assert all(x.shape == (plan.rows, plan.seq_len) for x in batch.values())
    needs = plan.recipe.needs(plan.cfg)
    assert ("returns_BxT" in batch) == needs.value_head
    assert ("ref_logp_BxT" in batch) == needs.reference
    assert (plan.teacher is None) == (not needs.teacher)


def test_url_workdirs_stay_urls(monkeypatch):
  assert str(loop.workdir_path("gs://bucket/run")) == "gs://bucket/run"
  assert str(loop.workdir_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
  local = loop.workdir_path("relative/run")
  assert local.is_absolute() and str(local).endswith("relative/run")
  # The checkpoint manager receives the URL unchanged (recorded instead of touching a bucket).
  seen = []

  class Recorder:
    def __init__(self, directory, **kw):
      seen.append(str(directory))

  monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", Recorder)
  # Unfinished writes are removed before the manager opens: it lists the same URL.
  monkeypatch.setattr(ckpt_lib, "_remove_unfinished", lambda root: seen.append(f"clean {root}"))
  assert str(ckpt_lib.Checkpointer("gs://bucket/run/checkpoints").directory) == (
      "gs://bucket/run/checkpoints")
  assert seen == ["clean gs://bucket/run/checkpoints", "gs://bucket/run/checkpoints"]
