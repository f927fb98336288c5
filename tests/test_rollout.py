"""Rollouts: generation + scoring against the sampler / scorer / a float64 reference, and the
advantage plumbing (OPD, RLVR, mixed, token transforms) against numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.data import tokenizer as tokenizer_lib
from opd_jax.data import verifiers
from opd_jax.models import config as model_config
from opd_jax.models import sampler as sampler_lib
from opd_jax.models import scoring
from opd_jax.models import transformer
from opd_jax.objectives.log_ratio import CreditConfig
from opd_jax.train import rollout

CFG = model_config.tiny(vocab_size=128)
B, P, N = 4, 8, 6
SAMPLER = sampler_lib.SamplerConfig(max_new_tokens=N, temperature=1.0, eos_id=1, pad_id=0)


@pytest.fixture(scope="module")
def models():
  sgd, sp = transformer.init(CFG, 0)
  tgd, tp = transformer.init(CFG, 1)
  # A more peaked teacher: scale its output matrix so the two distributions differ clearly.
  tp = dict(tp)
  tp["embed"] = {"embedding": tp["embed"]["embedding"] * 8.0}
  return sgd, sp, tgd, tp


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  toks = rng.integers(7, 100, size=(B, P)).astype(np.int32)
  mask = np.ones((B, P), bool)
  for b, pad in enumerate([0, 2, 3, 5]):
    mask[b, :pad] = False
    toks[b, :pad] = 0
  return jnp.asarray(toks), jnp.asarray(mask)


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _aligned_logp64(graphdef, params, tokens, mask):
  """float64 log-softmax of the distributions predicting each token (position t from t - 1)."""
  logits = np.asarray(transformer.forward(graphdef, params, tokens, mask))
  lp = _log_softmax64(logits)
  out = np.zeros_like(lp)
  out[:, 1:] = lp[:, :-1]
  return out


def test_generate_on_policy_matches_sampler_scorer_and_float64_kl(models, prompts):
  sgd, sp, tgd, tp = models
  knobs = rollout.RolloutKnobs(sampler=SAMPLER,
                               credit=CreditConfig(kind="baseline_corrected"))
  rng = jax.random.key(7)
  ro = rollout.generate(sgd, sp, tgd, tp, *prompts, rng, knobs)
  ref = sampler_lib.sample(sgd, sp, *prompts, rng, SAMPLER)
  np.testing.assert_array_equal(ro.tokens_BxT, ref.tokens_BxT)
  np.testing.assert_array_equal(ro.loss_mask_BxT, ref.loss_mask_BxT)
  np.testing.assert_array_equal(ro.old_logp_BxT, ref.logp_BxT)
  lm = np.asarray(ro.loss_mask_BxT)
  tokens, mask = np.asarray(ro.tokens_BxT), np.asarray(ro.mask_BxT)

  lp_s = _aligned_logp64(sgd, sp, tokens, mask)
  lp_t = _aligned_logp64(tgd, tp, tokens, mask)
  want_t = np.take_along_axis(lp_t, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.where(lm, ro.teacher_logp_BxT, 0), np.where(lm, want_t, 0),
                             atol=2e-5)
  want_s = np.take_along_axis(lp_s, tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.where(lm, ro.old_logp_BxT, 0), np.where(lm, want_s, 0), atol=2e-5)
  want_kl = np.where(lm, (np.exp(lp_s) * (lp_s - lp_t)).sum(-1), 0.0)
  assert want_kl[lm].mean() > 0.1  # the teacher really differs
  np.testing.assert_allclose(ro.kl_BxT, want_kl, atol=2e-5, rtol=1e-4)


def test_generate_shares_the_prefill_of_each_group(models, prompts, monkeypatch):
  """With group_size G the rollout samples with the shared-prefill sampler (each prompt's G rows
  repeat it): the unshared sampler's tokens on the same key."""
  sgd, sp, tgd, tp = models
  g = 2
  rows = np.repeat(np.arange(B // g), g)
  toks, mask = (jnp.asarray(np.asarray(a)[rows]) for a in prompts)
  assert rollout.grouped_sampler(SAMPLER, 1) is SAMPLER
  seen = []
  real_sample = sampler_lib.sample
  monkeypatch.setattr(sampler_lib, "sample",
                      lambda *a: seen.append(a[-1]) or real_sample(*a))
  rng = jax.random.key(3)
  ro = rollout.generate(sgd, sp, tgd, tp, toks, mask, rng,
                        rollout.RolloutKnobs(sampler=SAMPLER, group_size=g))
  assert [c.group_size for c in seen] == [g]
  ref = real_sample(sgd, sp, toks, mask, rng, SAMPLER)
  np.testing.assert_array_equal(ro.tokens_BxT, ref.tokens_BxT)
  np.testing.assert_array_equal(ro.loss_mask_BxT, ref.loss_mask_BxT)
  np.testing.assert_allclose(ro.old_logp_BxT, ref.logp_BxT, atol=1e-5)


def test_generate_off_policy_samples_with_the_teacher_and_scores_with_the_student(models, prompts):
  sgd, sp, tgd, tp = models
  knobs = rollout.RolloutKnobs(policy="teacher", sampler=SAMPLER)
  rng = jax.random.key(3)
  ro = rollout.generate(sgd, sp, tgd, tp, *prompts, rng, knobs)
  ref = sampler_lib.sample(tgd, tp, *prompts, rng, SAMPLER)
  np.testing.assert_array_equal(ro.tokens_BxT, ref.tokens_BxT)
  np.testing.assert_array_equal(ro.teacher_logp_BxT, ref.logp_BxT)
  student = scoring.token_logprobs(sgd, sp, ro.tokens_BxT, ro.mask_BxT)
  lm = np.asarray(ro.loss_mask_BxT)
  np.testing.assert_allclose(np.where(lm, ro.old_logp_BxT, 0), np.where(lm, student, 0),
                             atol=1e-6)
  assert ro.kl_BxT is None


# -- advantages -------------------------------------------------------------------------------
def _fake_rollout(rng, b=8, t=10, p=3):
  """A Rollout of random numbers with response masks of varied lengths (prompt of p tokens)."""
  lengths = rng.integers(1, t - p + 1, size=b)
  lengths[0] = t - p  # one full-length response
  loss_mask = np.zeros((b, t), bool)
  for i, n in enumerate(lengths):
    loss_mask[i, p:p + n] = True
  mask = loss_mask.copy()
  mask[:, :p] = True
  f = lambda: np.where(loss_mask, rng.normal(size=(b, t)), 0.0).astype(np.float32)  # noqa: E731
  tokens = rng.integers(7, 100, (b, t))
  for i in range(0, b, 2):  # every other response ends with EOS (id 1)
    tokens[i, p + lengths[i] - 1] = 1
  ro = rollout.Rollout(tokens_BxT=jnp.asarray(tokens, jnp.int32),
                       mask_BxT=jnp.asarray(mask), loss_mask_BxT=jnp.asarray(loss_mask),
                       lengths_B=jnp.asarray(lengths, jnp.int32), old_logp_BxT=jnp.asarray(f()),
                       teacher_logp_BxT=jnp.asarray(f()), kl_BxT=None)
  return ro, loss_mask


_REWARDS = {"opd": dict(teacher_reward=True), "rlvr": dict(teacher_reward=False,
                                                          verifier_reward=True),
            "mixed": dict(teacher_reward=True, verifier_reward=True)}


def _knobs(method, **kw):
  return rollout.RolloutKnobs(sampler=SAMPLER, **_REWARDS[method], **kw)


def test_opd_advantages_are_the_teacher_minus_student_log_ratio(tmp_path):
  rng = np.random.default_rng(1)
  ro, lm = _fake_rollout(rng)
  valid = np.ones(8, bool)
  valid[5] = False
  batch, _, metrics = rollout.advantages(ro, jnp.asarray(valid), None, None, _knobs("opd"))
  keep = lm & valid[:, None]
  reward = np.where(keep, np.asarray(ro.teacher_logp_BxT, np.float64) - ro.old_logp_BxT, 0)
  np.testing.assert_allclose(batch["adv_BxT"], reward, atol=1e-6)
  np.testing.assert_array_equal(batch["loss_mask_BxT"], keep)
  np.testing.assert_array_equal(batch["old_logp_BxT"], ro.old_logp_BxT)
  np.testing.assert_allclose(metrics["opd/teacher_gap"], -reward[keep].mean(), rtol=1e-5)
  last = np.asarray(ro.tokens_BxT)[np.arange(8), 3 + np.asarray(ro.lengths_B) - 1]
  # over the real rows only (row 5 is filler)
  np.testing.assert_allclose(metrics["rollout/eos_frac"], np.mean((last == SAMPLER.eos_id)[valid]))
  np.testing.assert_allclose(metrics["rollout/response_len"],
                             np.asarray(ro.lengths_B)[valid].mean(), rtol=1e-6)

  # Return-to-go credit: reversed cumulative sums over each response.
  batch, _, _ = rollout.advantages(ro, jnp.asarray(valid), None, None,
                                   _knobs("opd", credit=CreditConfig(kind="return_to_go")))
  rtg = np.flip(np.cumsum(np.flip(reward, 1), 1), 1) * keep
  np.testing.assert_allclose(batch["adv_BxT"], rtg, atol=1e-5)


def test_token_transforms_see_the_log_ratio_as_signal_and_the_loss_mask():
  rng = np.random.default_rng(2)
  ro, lm = _fake_rollout(rng)
  valid = np.ones(8, bool)
  tx = rollout.make_token_transform([("top_kl_retention", {"rho": 0.5})])
  state = tx.init(jnp.zeros((1, 1)))
  batch, state, metrics = rollout.advantages(ro, jnp.asarray(valid), None, state, _knobs("opd"),
                                             tx)
  reward = np.where(lm, np.asarray(ro.teacher_logp_BxT, np.float64) - ro.old_logp_BxT, 0)
  r = -reward  # the log-ratio r_t = log pS - log pT: keep where the student is most over-confident
  want = np.zeros_like(reward)
  kept = 0
  for i in range(8):
    idx = np.flatnonzero(lm[i])
    k = math.ceil(0.5 * len(idx))
    top = idx[np.argsort(-r[i, idx], kind="stable")[:k]]
    want[i, top] = reward[i, top] * len(idx) / k
    kept += k
  np.testing.assert_allclose(batch["adv_BxT"], want, atol=1e-5)
  np.testing.assert_allclose(metrics["tokens/kept_frac"], kept / lm.sum(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["baseline_corrected", "return_to_go"])
def test_token_transforms_sparsify_what_the_credit_estimator_returns(kind):
  # A return or a baseline spreads the signal over the response: the transform acts after the
  # estimator, so exactly the kept tokens carry one, rescaled by T / k.
  rng = np.random.default_rng(4)
  ro, lm = _fake_rollout(rng)
  ro = ro._replace(kl_BxT=jnp.asarray(np.where(lm, rng.random(lm.shape), 0), jnp.float32))
  valid = jnp.ones(8, bool)
  knobs = _knobs("opd", credit=CreditConfig(kind=kind))
  dense, _, _ = rollout.advantages(ro, valid, None, None, knobs)
  tx = rollout.make_token_transform([("top_kl_retention", {"rho": 0.25})])
  batch, _, metrics = rollout.advantages(ro, valid, None, tx.init(jnp.zeros((1, 1))), knobs, tx)
  reward = np.where(lm, np.asarray(ro.teacher_logp_BxT, np.float64) - ro.old_logp_BxT, 0)
  want = np.zeros_like(reward)
  for i in range(8):
    idx = np.flatnonzero(lm[i])
    k = math.ceil(0.25 * len(idx))
    top = idx[np.argsort(reward[i, idx], kind="stable")[:k]]   # the largest r_t = -reward
    want[i, top] = np.asarray(dense["adv_BxT"])[i, top] * len(idx) / k
  np.testing.assert_allclose(batch["adv_BxT"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["tokens/kept_frac"],
                             (np.asarray(batch["adv_BxT"]) != 0).sum() / lm.sum(), rtol=1e-6)


def test_rlvr_advantages_match_a_grpo_reference_and_skip_zero_variance_groups():
  rng = np.random.default_rng(3)
  ro, lm = _fake_rollout(rng)
  g = 4
  scores = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)  # group 2 has no variance
  batch, _, metrics = rollout.advantages(ro, jnp.ones(8, bool), jnp.asarray(scores), None,
                                         _knobs("rlvr", group_size=g))
  want = np.zeros(8)
  grp = scores[:4].astype(np.float64)
  want[:4] = (grp - grp.mean()) / (grp.std(ddof=1) + 1e-6)
  keep_rows = np.array([True] * 4 + [False] * 4)
  np.testing.assert_allclose(batch["adv_BxT"], np.where(lm, want[:, None], 0) * keep_rows[:, None],
                             atol=1e-5)
  np.testing.assert_array_equal(batch["loss_mask_BxT"], lm & keep_rows[:, None])
  assert float(metrics["rlvr/filtered_groups"]) == 1.0
  np.testing.assert_allclose(metrics["rlvr/reward_mean"], scores.mean())


def test_mixed_advantages_weight_opd_and_rlvr():
  rng = np.random.default_rng(4)
  ro, lm = _fake_rollout(rng)
  scores = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)
  knobs = _knobs("mixed", group_size=4, mix_alpha=0.25)
  batch, _, _ = rollout.advantages(ro, jnp.ones(8, bool), jnp.asarray(scores), None, knobs)
  opd = np.where(lm, np.asarray(ro.teacher_logp_BxT, np.float64) - ro.old_logp_BxT, 0)
  grp = scores[:4].astype(np.float64)
  seq = np.zeros(8)
  seq[:4] = (grp - grp.mean()) / (grp.std(ddof=1) + 1e-6)
  want = 0.25 * opd + 0.75 * np.where(lm, seq[:, None], 0)
  np.testing.assert_allclose(batch["adv_BxT"], want, atol=1e-5)
  np.testing.assert_array_equal(batch["loss_mask_BxT"], lm)  # OPD still teaches every row


def test_unknown_token_transform_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown token transform 'sparsify'.*random_retention"):
    rollout.make_token_transform([("sparsify", {})])
  with pytest.raises(ValueError, match=r"top_kl_retention.*rho"):
    rollout.make_token_transform([("top_kl_retention", {"rhoo": 0.5})])


def test_rlvr_and_mixed_need_verifier_rewards():
  rng = np.random.default_rng(5)
  ro, _ = _fake_rollout(rng)
  with pytest.raises(ValueError, match="seq_rewards_B"):
    rollout.advantages(ro, jnp.ones(8, bool), None, None, _knobs("rlvr", group_size=4))


# -- host side --------------------------------------------------------------------------------
def test_verify_decodes_the_responses_and_scores_them():
  tok = tokenizer_lib.build_task_tokenizer()
  responses = ["3 3 =3", "1 =2", "no answer", "4 0 =0"]
  answers = ["3", "1", "5", "0"]
  rows = [tokenizer_lib.encode_prompt(tok, "1+2%5:") + tokenizer_lib.encode_response(tok, r)
          for r in responses]
  t = max(map(len, rows)) + 2
  tokens = np.zeros((4, t), np.int32)
  loss_mask = np.zeros((4, t), bool)
  p = len(tokenizer_lib.encode_prompt(tok, "1+2%5:"))
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    loss_mask[i, p:len(row)] = True
  ro = rollout.Rollout(jnp.asarray(tokens), jnp.asarray(tokens > 0), jnp.asarray(loss_mask),
                       None, None, None, None)
  got, reason_ids = rollout.verify(tok, verifiers.exact_match, ro, answers)
  want = [verifiers.exact_match(r, a) for r, a in zip(responses, answers)]
  np.testing.assert_array_equal(got, np.asarray([w.score for w in want], np.float32))
  assert list(got) == [1.0, 0.0, 0.0, 1.0]
  reasons = verifiers.reasons_of(verifiers.exact_match)
  assert [reasons[i] for i in reason_ids] == [w.reason for w in want] == [
      "correct", "wrong", "unparsable", "correct"]


def test_evaluate_computes_avg_at_k_and_pass_at_k(models, prompts):
  sgd, sp, _, _ = models
  tok = tokenizer_lib.build_task_tokenizer()
  k = 2
  toks, mask = np.asarray(prompts[0]), np.asarray(prompts[1])
  # Two eval batches of B rows = B / k prompts x k samples (the sampler shapes of the other tests);
  # the last prompt of the second batch is a filler row.
  batches = []
  for i in range(2):
    rows = np.repeat(np.arange(i * B // k, (i + 1) * B // k), k)
    valid = np.ones(B, bool)
    if i == 1:
      valid[-k:] = False
    batches.append({"prompt_tokens_BxP": toks[rows], "prompt_mask_BxP": mask[rows],
                    "valid_B": valid, "answer_B": np.asarray(["x"] * B)})

  def verifier(response, answer):  # deterministic and non-trivial on random text
    return verifiers.Reward(float(len(response) % 2 == 0), "parity")

  rng = jax.random.key(11)
  got = rollout.evaluate(sgd, sp, batches, tok, verifier, SAMPLER, rng, k,
                         lambda b: {n: jnp.asarray(v) for n, v in b.items()})
  scores, lengths = [], []
  for i, batch in enumerate(batches):
    out = sampler_lib.sample(sgd, sp, jnp.asarray(batch["prompt_tokens_BxP"]),
                             jnp.asarray(batch["prompt_mask_BxP"]), jax.random.fold_in(rng, i),
                             SAMPLER)
    texts = rollout.decode_responses(tok, np.asarray(out.tokens_BxT),
                                     np.asarray(out.loss_mask_BxT))
    valid = batch["valid_B"].reshape(-1, k)[:, 0]
    scores.append(np.asarray([verifier(t, "x").score for t in texts]).reshape(-1, k)[valid])
    lengths.append(np.asarray(out.loss_mask_BxT).sum(1).reshape(-1, k)[valid])
  scores, lengths = np.concatenate(scores), np.concatenate(lengths)
  assert got["eval/prompts"] == 3
  assert 0 < scores.mean() < 1
  np.testing.assert_allclose(got["eval/accuracy"], scores.mean())
  np.testing.assert_allclose(got["eval/pass_at_k"], (scores.max(1) > 0).mean())
  np.testing.assert_allclose(got["eval/response_len"], lengths.mean())
  # avg@k / pass@k with standard errors over the 3 valid prompts (float64 reference).
  per = scores.mean(1)
  passed = (scores >= 1).any(1).astype(np.float64)  # pass@k with k = n samples: any correct
  np.testing.assert_allclose([got["eval/avg@2"], got["eval/avg@2_se"], got["eval/pass@2"],
                              got["eval/pass@2_se"]],
                             [per.mean(), per.std(ddof=1) / np.sqrt(3), passed.mean(),
                              passed.std(ddof=1) / np.sqrt(3)], rtol=1e-12, atol=1e-12)


def test_run_plan_samplers_share_prefill_per_group_and_read_the_mode():
  from opd_jax.train import config as config_lib
  from opd_jax.train import run_plan
  cfg = config_lib.from_config_dict(config_lib.load_config(
      "configs/opd.py", ["rollout.group_size=4", "sampler.mode=static", "loop.eval_greedy=False",
                         "loop.eval_k=2"]))
  plan = run_plan.resolve(cfg)
  assert (plan.sampler.group_size, plan.sampler.mode) == (4, "static")
  assert plan.eval_sampler.group_size == plan.eval_k == 2
  assert run_plan.resolve(config_lib.from_config_dict(config_lib.load_config(
      "configs/opd.py"))).sampler.mode == "compact"
  with pytest.raises(config_lib.ConfigError, match="mode"):
    config_lib.from_config_dict(config_lib.load_config("configs/opd.py", ["sampler.mode=fast"]))
