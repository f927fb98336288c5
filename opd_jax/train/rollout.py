"""Rollouts: sample -> score with the teacher -> rewards -> token transforms -> credit -> advantages.

One rollout batch becomes one `pg_step` batch (`tokens_BxT, mask_BxT, loss_mask_BxT, old_logp_BxT,
adv_BxT`) in two phases, each made of module-level jitted functions with static knobs (compiled once
per shape bucket; `generate` composes the sampler's and the scorer's own jitted functions, so every
method with the same sampler settings and shapes shares their compilations):

  `generate`   the behaviour policy samples (the student; the teacher for the off-policy control),
               then: old_logp = the student's log-probs of the sampled tokens at the sampling
               temperature (the sampler's own numbers when the student sampled, unless
               `recompute_old_logp`; the student re-scores the teacher's rollouts otherwise);
               teacher_logp = the teacher's log-probs at the same temperature (OPD / mixed; the
               sampler's numbers when the teacher sampled); kl_BxT = exact per-state
               KL(pS(.|s_t) || pT(.|s_t)) when the credit estimator needs it (baseline-corrected, GAE
               with the critic-free V = -KL_t), chunked over the sequence.
  `advantages` OPD: reward_t = teacher_logp - old_logp on loss-mask tokens -> token transforms (an
               optax chain over the per-token rewards with `signal=r_t` (= -reward_t, the log-ratio)
               and `mask=loss_mask` extra args; its state is carried by the loop) -> credit estimator.
               RLVR: verifier scores (host side, `verify`) -> GRPO advantages broadcast to tokens;
               rows of zero-variance groups leave the loss mask (the paper skips them). Mixed:
               `mix_advantages` of the two. Advantages are stop-gradient.

Between the phases, RLVR (and mixed) decode the responses on the host and score them with the
verifier (`verify`); OPD never leaves the device.

Temperature: old_logp and teacher_logp are both log-softmax(logits / T) at the sampling temperature
T (the paper samples at T = 1, where they are the models' own log-probs); `pg_step` evaluates
pi_theta at the same T, so the first update's ratio is exactly 1.

The direct route (`distill`) only needs `generate`'s tokens and masks: `distill_step` computes the
teacher's distributions itself.

`evaluate` measures accuracy with the verifier on an eval pipeline: avg@k over k samples per prompt
(greedy decoding: k = 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from opd_jax import trace_cache
from opd_jax.data import tokenizer as tokenizer_lib
from opd_jax.data import verifiers
from opd_jax.models import scoring
from opd_jax.models import sampler as sampler_lib
from opd_jax.models import sharding
from opd_jax.models import transformer
from opd_jax.objectives import distill
from opd_jax.objectives import log_ratio
from opd_jax.objectives import reduce
from opd_jax.objectives import rlvr
from opd_jax.optim import tokens as tokens_lib
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import teachers as teachers_lib

# -- token transforms: ONE table, name -> factory(**kwargs) ---------------------------------------
TOKEN_TRANSFORMS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "top_kl_retention": tokens_lib.top_kl_retention,
    "random_retention": tokens_lib.random_retention,
    "scale": optax.scale,
}


def make_token_transform(specs: Sequence[tuple[str, Mapping[str, Any]]]
                         ) -> optax.GradientTransformationExtraArgs:
  """The optax chain of token transforms `((name, kwargs), ...)` (identity when empty)."""
  parts = []
  for i, spec in enumerate(specs):
    name, kwargs = spec
    if name not in TOKEN_TRANSFORMS:
      raise ValueError(f"rollout.token_transforms[{i}]: unknown token transform {name!r}; valid "
                       f"names: {sorted(TOKEN_TRANSFORMS)}")
    try:
      parts.append(optax.with_extra_args_support(TOKEN_TRANSFORMS[name](**dict(kwargs))))
    except TypeError as e:
      raise ValueError(f"rollout.token_transforms[{i}] ({name!r}, {dict(kwargs)}): {e}") from e
  return optax.chain(*parts)


# -- knobs ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RolloutKnobs:
  """The static (hashable) settings of the jitted rollout phases (built by the recipe,
  `recipes.Recipe.rollout_knobs`).

  Attributes:
    teacher_reward: per-token OPD rewards log pT - log pS (opd, mixed).
    verifier_reward: verifier scores -> GRPO advantages (rlvr, mixed).
    policy: 'student' or 'teacher' (who samples).
    sampler: decoding settings (temperature = the scoring temperature of old/teacher log-probs).
    credit: credit estimator of the OPD part.
    group_size / normalize_std / grpo_eps / ddof: GRPO advantages.
    mix_alpha: weight of OPD when both rewards are used (None otherwise).
    chunk_size: positions per chunk for teacher scoring and KL_t.
    recompute_old_logp: re-score the student's own rollouts with the scoring route instead of
      taking the sampler's log-probs (same numbers up to float error in float32; in bf16 the
      decode path and the training forward differ, and the ratio should start at exactly 1).
    reference: score the rollout with the frozen initial student (ref_logp_BxT, KL-to-reference).
    value_head: evaluate the learned value head on the rollout (GAE-OPD with value='learned').
    score_student: old_logp is needed (PG); the direct route needs tokens and masks only.
    teacher_names: the names of several routed teachers (`train.teachers`; per-teacher metrics
      `teacher/<name>/*`), empty with one teacher.
    verifier_reasons: the verifier's fixed reason set (`verifiers.reasons_of`): per-reason counts
      of the step's rollouts are logged as `verifier/<reason>`.
  """

  teacher_reward: bool = True
  verifier_reward: bool = False
  policy: str = "student"
  sampler: sampler_lib.SamplerConfig | None = None
  credit: log_ratio.CreditConfig = log_ratio.CreditConfig()
  group_size: int = 1
  normalize_std: bool = True
  grpo_eps: float = 1e-6
  ddof: int = 1
  mix_alpha: float | None = None
  chunk_size: int = scoring.DEFAULT_CHUNK
  recompute_old_logp: bool = False
  reference: bool = False
  value_head: bool = False
  score_student: bool = True
  verifier_reasons: tuple[str, ...] = ()
  teacher_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.teacher_reward and self.verifier_reward and self.mix_alpha is None:
      raise ValueError("RolloutKnobs: teacher and verifier rewards together need mix_alpha")

  @property
  def uses_teacher_logp(self) -> bool:
    return self.teacher_reward

  @property
  def uses_verifier(self) -> bool:
    return self.verifier_reward

  @property
  def needs_kl(self) -> bool:
    c = self.credit
    return self.teacher_reward and (
        c.kind == "baseline_corrected" or (c.kind == "gae" and c.value == "neg_kl"))


class Rollout(NamedTuple):
  """Device outputs of `generate` (arrays [B, T] unless noted; None where unused)."""

  tokens_BxT: jax.Array
  mask_BxT: jax.Array
  loss_mask_BxT: jax.Array
  lengths_B: jax.Array
  old_logp_BxT: jax.Array | None
  teacher_logp_BxT: jax.Array | None = None
  kl_BxT: jax.Array | None = None
  ref_logp_BxT: jax.Array | None = None
  values_BxT: jax.Array | None = None
  teacher_id_B: jax.Array | None = None  # int32 [B]: each row's teacher (several teachers)


def _batch_constrain(x):
  return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def per_token_reverse_kl(student_graphdef, student_params, teacher_graphdef, teacher_params,
                         tokens_BxT, mask_BxT, loss_mask_BxT, *, temperature: float,
                         chunk_size: int) -> jax.Array:
  """KL_t = KL(pS(.|s_t) || pT(.|s_t)) at every loss-mask position (zero elsewhere), exact over the
  vocabulary, chunked over the sequence (never a [B, T, V] array). In a multi-process CPU run
  both models' weights are gathered whole up front, the teacher's after the student's pass, so
  that no gather races a layer scan (`transformer.gathered`, `train.collective_order`)."""
  student_params = transformer.gathered(student_graphdef, student_params)
  h_s = scoring.shifted_hidden(student_graphdef, student_params, tokens_BxT, mask_BxT)
  teacher_params = transformer.gathered(teacher_graphdef, teacher_params, after=h_s)
  h_t = scoring.shifted_hidden(teacher_graphdef, teacher_params, tokens_BxT, mask_BxT)
  kl_fn = lambda s, t: distill.reverse_kl(s, t, temperature)  # noqa: E731
  kl = distill.chunked_token_map(
      kl_fn, scoring.unembed_fn(student_graphdef, student_params), h_s,
      (scoring.unembed_fn(teacher_graphdef, teacher_params), h_t), loss_mask_BxT, chunk_size)
  return jax.lax.stop_gradient(kl)


@trace_cache.jit(static_argnums=(0, 2), static_argnames=("temperature", "chunk_size", "rules"))
def _reverse_kl(student_graphdef, student_params, teacher_graphdef, teacher_params, tokens_BxT,
                mask_BxT, loss_mask_BxT, *, temperature, chunk_size, rules):
  with sharding.axis_rules(rules):
    return per_token_reverse_kl(student_graphdef, student_params, teacher_graphdef,
                                teacher_params, tokens_BxT, mask_BxT, loss_mask_BxT,
                                temperature=temperature, chunk_size=chunk_size)


@trace_cache.jit(static_argnums=(0,), static_argnames=("rules",))
def _values(student_graphdef, student_params, value_params, tokens_BxT, mask_BxT, *, rules):
  with sharding.axis_rules(rules):
    h = scoring.shifted_hidden(student_graphdef, student_params, tokens_BxT, mask_BxT)
    return jax.lax.stop_gradient(log_ratio.value_head(value_params, h))


def generate(student_graphdef, student_params, teacher_graphdef, teacher_params, prompt_BxP,
             prompt_mask_BxP, rng, knobs: RolloutKnobs, *, reference_params=None,
             value_params=None, clock=None, teacher_id_B=None) -> Rollout:
  """Samples with the behaviour policy and scores the rollout (module docstring).

  Runs under the caller's mesh (`jax.set_mesh`) and axis rules (`sharding.axis_rules`); teacher
  arguments may be None when the rollout does not use a teacher. `reference_params` (the frozen
  initial student) give `ref_logp_BxT` when `knobs.reference`; `value_params` (the learned value
  head) give `values_BxT` when `knobs.value_head`. `clock` (`timing.PhaseClock`) is told when
  each phase is dispatched (it never blocks here). Several routed teachers (a tuple of graphdefs
  and of params, `train.teachers`) take `teacher_id_B` (int32 [B], each row's teacher): each
  scores the batch in turn and each row keeps its own teacher's numbers. The pieces are
  separately jitted module-level functions (`sampler.sample`, `scoring.token_logprobs`, the
  chunked KL), each compiled once per shape and shared by every recipe that uses the same
  sampler settings.
  """
  if knobs.sampler is None:
    raise ValueError("RolloutKnobs.sampler is required")
  by_teacher = knobs.policy == "teacher"
  if (by_teacher or knobs.uses_teacher_logp) and teacher_params is None:
    raise ValueError(f"rollout (teacher_reward={knobs.teacher_reward}, policy={knobs.policy!r}) "
                     "needs teacher params")
  if knobs.reference and reference_params is None:
    raise ValueError("rollout with knobs.reference needs reference_params")
  if knobs.value_head and value_params is None:
    raise ValueError("rollout with knobs.value_head needs value_params")
  gd, params = ((teacher_graphdef, teacher_params) if by_teacher else
                (student_graphdef, student_params))
  if clock is None:
    from opd_jax.train.timing import NullClock
    clock = NullClock()
  out = sampler_lib.sample(gd, params, prompt_BxP, prompt_mask_BxP, rng,
                           grouped_sampler(knobs.sampler, knobs.group_size))
  clock.device("sample", out)
  tokens, mask, loss_mask = out.tokens_BxT, out.mask_BxT, out.loss_mask_BxT
  temperature = knobs.sampler.temperature

  def score(graphdef, p):
    # token_logprobs is zero outside `mask`; the sampler's log-probs are zero outside the
    # response: both agree on the loss-mask positions, which are all that is used.
    return scoring.token_logprobs(graphdef, p, tokens, mask, temperature=temperature,
                                  chunk_size=knobs.chunk_size)

  old_logp = None
  if knobs.score_student:
    if by_teacher or knobs.recompute_old_logp:
      old_logp = score(student_graphdef, student_params)
      clock.device("student_score", old_logp)
    else:
      old_logp = out.logp_BxT
  teacher_logp = kl = ref_logp = values = None
  if knobs.uses_teacher_logp:
    teacher_logp = out.logp_BxT if by_teacher else teachers_lib.score_routed(
        score, teacher_graphdef, teacher_params, teacher_id_B)
    clock.device("teacher_score", teacher_logp)
  if knobs.needs_kl:
    kl = teachers_lib.score_routed(
        lambda gd, p: _reverse_kl(student_graphdef, student_params, gd, p, tokens, mask,
                                  loss_mask, temperature=temperature,
                                  chunk_size=knobs.chunk_size, rules=sharding.current_rules()),
        teacher_graphdef, teacher_params, teacher_id_B)
    clock.device("teacher_score", kl)
  if knobs.reference:
    ref_logp = score(student_graphdef, reference_params)
    clock.device("reference_score", ref_logp)
  if knobs.value_head:
    values = _values(student_graphdef, student_params, value_params, tokens, mask,
                     rules=sharding.current_rules())
    clock.device("value_head", values)
  return Rollout(tokens, mask, loss_mask, out.lengths_B, old_logp, teacher_logp, kl, ref_logp,
                 values, teacher_id_B)


@jax.jit
def rollout_rng(base_key: jax.Array, step) -> jax.Array:
  """The sampling key of train step `step`: distinct from the step's own key (used by pg_step to
  shuffle minibatches), reproducible on resume."""
  return jax.random.fold_in(jax.random.fold_in(base_key, step), 0x5A3F)


# -- advantages -----------------------------------------------------------------------------------
def _ends_with_eos(rollout: Rollout, eos_ids) -> jax.Array:
  """float32 [B]: 1 where the response's last token is an EOS (0: cut at the length budget)."""
  t = rollout.tokens_BxT.shape[1]
  last_B = t - 1 - jnp.argmax(jnp.flip(rollout.loss_mask_BxT, axis=1), axis=1)
  last_tok_B = jnp.take_along_axis(rollout.tokens_BxT, last_B[:, None], axis=1)[:, 0]
  has_B = jnp.any(rollout.loss_mask_BxT, axis=1)
  return (has_B & jnp.isin(last_tok_B, jnp.asarray(eos_ids, jnp.int32))).astype(jnp.float32)


@trace_cache.jit(static_argnames=("knobs", "token_tx", "rules"))
def _advantages(rollout: Rollout, valid_B, seq_rewards_B, reason_ids_B, token_state, *,
                knobs: RolloutKnobs, token_tx, rules):
  with sharding.axis_rules(rules):
    loss_mask = rollout.loss_mask_BxT & valid_B[:, None]
    metrics = {   # over the real rows (a partial last batch is padded with filler rows)
        "rollout/response_len": reduce.masked_mean(rollout.lengths_B.astype(jnp.float32),
                                                   valid_B),
        "rollout/eos_frac": reduce.masked_mean(_ends_with_eos(rollout, knobs.sampler.eos_ids),
                                               valid_B),
    }
    adv_opd = adv_rlvr = None
    if knobs.uses_teacher_logp:
      reward = log_ratio.rewards(rollout.old_logp_BxT, rollout.teacher_logp_BxT, loss_mask)
      metrics.update(log_ratio.opd_metrics(rollout.old_logp_BxT, rollout.teacher_logp_BxT,
                                           loss_mask, rollout.kl_BxT if knobs.needs_kl else None))
      if knobs.teacher_names:
        metrics.update(teachers_lib.metrics(
            knobs.teacher_names, rollout.teacher_id_B, valid_B, loss_mask, reward_BxT=reward,
            kl_BxT=rollout.kl_BxT if knobs.needs_kl else None))
      adv_opd = log_ratio.advantages(reward, loss_mask, knobs.credit, kl_BxT=rollout.kl_BxT,
                                     values_BxT=rollout.values_BxT)
      adv_opd_dense = adv_opd   # the value head's targets come from every token
      if token_tx is not None:
        # Sparsifies the advantages the credit estimator made (selected by r_t = -reward): kept
        # tokens are exactly the ones that carry a signal, whatever the estimator (a return or a
        # baseline would otherwise spread the signal back onto dropped tokens).
        adv_opd, token_state = token_tx.update(adv_opd, token_state, signal=-reward,
                                               mask=loss_mask)
        kept = optax.tree_utils.tree_get_all_with_path(token_state, "kept_frac")
        if len(kept) == 1:
          metrics["tokens/kept_frac"] = kept[0][1]
    if knobs.uses_verifier:
      adv_B, keep_B, m = rlvr.grpo_advantages(seq_rewards_B, knobs.group_size,
                                              knobs.normalize_std, knobs.grpo_eps,
                                              ddof=knobs.ddof, valid_B=valid_B)
      metrics.update(m)
      if reason_ids_B is not None:  # counted over every process's rows, in jit
        for i, reason in enumerate(knobs.verifier_reasons):
          metrics[f"verifier/{reason}"] = jnp.sum((reason_ids_B == i) & valid_B).astype(
              jnp.float32)
      adv_rlvr = rlvr.broadcast_to_tokens(adv_B, loss_mask)
      if not knobs.uses_teacher_logp:
        loss_mask = loss_mask & keep_B[:, None]  # zero-variance groups are skipped
    if adv_opd is not None and adv_rlvr is not None:
      adv = rlvr.mix_advantages(adv_opd, adv_rlvr, knobs.mix_alpha)
    else:
      adv = adv_opd if adv_opd is not None else adv_rlvr
    adv = jax.lax.stop_gradient(jnp.where(loss_mask, adv, 0.0))
    metrics["rollout/adv_mean"] = reduce.masked_mean(adv, loss_mask)
    metrics["rollout/tokens"] = jnp.sum(loss_mask).astype(jnp.float32)
    batch = {"tokens_BxT": rollout.tokens_BxT, "mask_BxT": rollout.mask_BxT,
             "loss_mask_BxT": loss_mask, "old_logp_BxT": rollout.old_logp_BxT, "adv_BxT": adv}
    if knobs.reference:
      batch["ref_logp_BxT"] = rollout.ref_logp_BxT
    if knobs.value_head:
      # GAE value targets (lambda-returns) A_OPD + V_old; the step regresses the head onto them.
      batch["returns_BxT"] = log_ratio.value_targets(adv_opd_dense, rollout.values_BxT,
                                                     loss_mask)
      metrics["value/old_mean"] = reduce.masked_mean(rollout.values_BxT, loss_mask)
    batch = jax.tree.map(_batch_constrain, batch)
    return batch, token_state, metrics


def advantages(rollout: Rollout, valid_B, seq_rewards_B, token_state, knobs: RolloutKnobs,
               token_tx: optax.GradientTransformationExtraArgs | None = None, *,
               reason_ids_B=None):
  """The `pg_step` batch, the new token-transform state and rollout metrics.

  Args:
    rollout: `generate`'s output.
    valid_B: bool [B], False on filler rows (they leave the loss mask).
    seq_rewards_B: float32 [B] verifier scores (rlvr / mixed; `verify`), else None.
    reason_ids_B: int32 [B] index of each row's verifier reason in `knobs.verifier_reasons`
      (optional; gives the `verifier/<reason>` counts).
    token_state: state of `token_tx` (None without transforms).
    knobs: the rollout knobs.
    token_tx: token transforms over the OPD rewards (`make_token_transform`), or None.
  """
  if knobs.uses_verifier and seq_rewards_B is None:
    raise ValueError("a rollout with verifier rewards needs seq_rewards_B")
  if not knobs.uses_verifier:
    seq_rewards_B = reason_ids_B = None
  return _advantages(rollout, valid_B, seq_rewards_B, reason_ids_B, token_state, knobs=knobs,
                     token_tx=token_tx, rules=sharding.current_rules())


@trace_cache.jit(static_argnames=("teacher_names",))
def distill_batch(rollout: Rollout, valid_B, teacher_names: tuple[str, ...] = ()
                  ) -> tuple[dict, dict]:
  """The `distill_step` batch of a rollout (filler rows leave the loss mask) and its metrics;
  with several teachers the batch carries `teacher_id_BxT` (each row's teacher, repeated along T
  so that it shards like the other fields) and the metrics count each teacher's rows and
  tokens."""
  batch = {"tokens_BxT": rollout.tokens_BxT, "mask_BxT": rollout.mask_BxT,
           "loss_mask_BxT": rollout.loss_mask_BxT & valid_B[:, None]}
  metrics = {"rollout/response_len": jnp.mean(rollout.lengths_B.astype(jnp.float32))}
  if teacher_names:
    batch["teacher_id_BxT"] = jnp.broadcast_to(rollout.teacher_id_B[:, None],
                                               rollout.tokens_BxT.shape)
    metrics.update(teachers_lib.metrics(teacher_names, rollout.teacher_id_B, valid_B,
                                        batch["loss_mask_BxT"]))
  return batch, metrics


# -- host side: decode + verify -------------------------------------------------------------------
def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order (all rows when the
  array is fully addressable)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  shards = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, s.data)
  return np.concatenate(jax.device_get([shards[k] for k in sorted(shards)]), axis=0)


def decode_responses(tokenizer, tokens_BxT: np.ndarray, loss_mask_BxT: np.ndarray) -> list[str]:
  """Response texts (the loss-mask tokens of each row, decoded up to EOS, specials dropped)."""
  return [tokenizer_lib.decode_response(tokenizer, row[m].tolist())
          for row, m in zip(tokens_BxT, loss_mask_BxT.astype(bool))]


def verify(tokenizer, verifier: verifiers.Verifier, rollout: Rollout, answers_B: Sequence[str]
           ) -> tuple[np.ndarray, np.ndarray]:
  """(float32 scores, int32 reason ids) [B_local] of this process's rows (host side; blocks on
  the rollout). Reason ids index `verifiers.reasons_of(verifier)` (-1: a reason outside it)."""
  texts = decode_responses(tokenizer, local_rows(rollout.tokens_BxT),
                           local_rows(rollout.loss_mask_BxT))
  res = verifiers.score_batch_with_reasons(verifier, texts, list(answers_B))
  index = {r: i for i, r in enumerate(verifiers.reasons_of(verifier))}
  return res.scores_B, np.asarray([index.get(r, -1) for r in res.reasons_B], np.int32)


def grouped_sampler(cfg: sampler_lib.SamplerConfig, group_size: int
                    ) -> sampler_lib.SamplerConfig:
  """The sampler settings for batches of `group_size` consecutive rows per prompt: each prompt
  is prefilled once and its cache shared by its samples (same tokens as unshared prefill)."""
  if group_size > 1 and cfg.group_size != group_size:
    return dataclasses.replace(cfg, group_size=group_size)
  return cfg


@jax.jit
def _fold_in(key, data):
  return jax.random.fold_in(key, data)


# -- eval -----------------------------------------------------------------------------------------
def evaluate(graphdef, params, batches, tokenizer, verifier: verifiers.Verifier,
             sampler_cfg: sampler_lib.SamplerConfig, rng: jax.Array, k: int,
             to_device: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]]
             ) -> dict[str, float]:
  """Verifier accuracy over an eval pipeline's batches (each prompt repeated k times in
  consecutive rows, `group_size=k`): `eval/accuracy` = avg@k (mean over prompts of the mean score
  of their k samples), `eval/pass_at_k` (any of the k samples scores > 0), `eval/response_len`,
  `eval/prompts`; and `eval/avg@k`, `eval/pass@k` (the unbiased estimator; a sample is correct
  iff it scores 1) with their standard errors over the distinct prompts `eval/avg@k_se`,
  `eval/pass@k_se` (`metrics.eval_summary`; k the number, e.g. `eval/avg@8`).
  Multi-process: every process scores its rows; the sums are combined across processes.
  """
  score_sum = pass_sum = len_sum = 0.0
  n_prompts = 0
  stats = np.zeros(metrics_lib.EVAL_STATS, np.float64)
  reasons = verifiers.reasons_of(verifier)
  reason_counts = np.zeros(len(reasons), np.float64)
  for i, batch in enumerate(batches):
    dev = to_device({"prompt_tokens_BxP": batch["prompt_tokens_BxP"],
                     "prompt_mask_BxP": batch["prompt_mask_BxP"]})
    key = _fold_in(rng, jax.device_put(np.uint32(i), rng.sharding))
    out = sampler_lib.sample(graphdef, params, dev["prompt_tokens_BxP"], dev["prompt_mask_BxP"],
                             key, grouped_sampler(sampler_cfg, k))
    tokens, loss_mask = local_rows(out.tokens_BxT), local_rows(out.loss_mask_BxT)
    texts = decode_responses(tokenizer, tokens, loss_mask)
    res = verifiers.score_batch_with_reasons(verifier, texts, list(batch["answer_B"]))
    scores = res.scores_B
    valid = np.asarray(batch["valid_B"], bool)
    counts = res.select(valid).counts()
    reason_counts += np.asarray([counts.get(r, 0) for r in reasons], np.float64)
    per_prompt = scores.reshape(-1, k)
    valid_p = valid.reshape(-1, k)[:, 0]
    score_sum += float(per_prompt.mean(axis=1)[valid_p].sum())
    pass_sum += float((per_prompt.max(axis=1) > 0)[valid_p].sum())
    len_sum += float(loss_mask.sum(axis=1).reshape(-1, k).mean(axis=1)[valid_p].sum())
    n_prompts += int(valid_p.sum())
    stats += metrics_lib.problem_stats(per_prompt[valid_p], k)
  totals = np.concatenate([np.asarray([score_sum, pass_sum, len_sum, n_prompts], np.float64),
                           stats, reason_counts])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    from opd_jax.train import mesh as mesh_lib
    mesh_lib.sync_processes("eval")  # peers may still be compiling the eval sampler
    with jax.transfer_guard("allow"):  # the documented all-gather of eval sums
      totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
  n = max(totals[3], 1.0)
  out = {"eval/accuracy": float(totals[0] / n), "eval/pass_at_k": float(totals[1] / n),
         "eval/response_len": float(totals[2] / n), "eval/prompts": float(totals[3])}
  out.update({f"eval/{name}": v for name, v in metrics_lib.eval_summary(
      totals[4:4 + metrics_lib.EVAL_STATS], k, k).items() if name != "problems"})
  out.update({f"eval/verifier/{r}": float(c)
              for r, c in zip(reasons, totals[4 + metrics_lib.EVAL_STATS:])})
  return out
