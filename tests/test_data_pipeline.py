"""grain pipelines: padding, groups, shuffling, process shards, bounded shapes, exact resume."""

import dataclasses
import json

import numpy as np
import pytest

from opd_jax.data import pipeline as P
from opd_jax.data import tasks
from opd_jax.data.tokenizer import build_task_tokenizer, decode_response

PAD = 0


def _random_prompts(n, lo=1, hi=30, seed=0):
  rng = np.random.default_rng(seed)
  ids = [rng.integers(1, 100, size=int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]
  answers = [f"ans{i}" for i in range(n)]
  return ids, answers


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].shape == y[k].shape and np.array_equal(x[k], y[k]), k


def test_rollout_batch_layout_against_the_raw_prompts():
  ids, answers = _random_prompts(23)
  cfg = P.PipelineConfig(global_batch_size=6, bucket_lengths=(8, 16, 32), group_size=3, seed=5)
  pl = P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD, shard_index=1, shard_count=2)
  for b in _take(pl.iterator(), 12):
    B, L = b["prompt_tokens_BxP"].shape
    assert B == 3 * 3 and b["prompt_tokens_BxP"].dtype == np.int32
    assert b["prompt_mask_BxP"].dtype == bool and b["valid_B"].all()
    idx = b["example_idx_B"]
    # Each prompt is repeated group_size times consecutively; group ids are its slot in the global
    # batch (this shard holds slots 3, 4, 5).
    assert np.array_equal(b["group_id_B"], np.repeat([3, 4, 5], 3))
    assert np.array_equal(idx, np.repeat(idx[::3], 3))
    for r in range(B):
      p = ids[idx[r]]
      assert np.array_equal(b["prompt_tokens_BxP"][r, L - len(p):], p)  # left-padded
      assert (b["prompt_tokens_BxP"][r, :L - len(p)] == PAD).all()
      assert np.array_equal(b["prompt_mask_BxP"][r], np.arange(L) >= L - len(p))
      assert b["answer_B"][r] == answers[idx[r]]


def test_rollout_batch_answers_cost_their_own_length():
  ids, answers = _random_prompts(8)
  answers = list(answers)
  answers[3] = "x" * 2_000_000   # a code task's test spec: megabytes
  cfg = P.PipelineConfig(global_batch_size=8, bucket_lengths=(32,), group_size=8, seed=0)
  b = next(iter(P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD).iterator()))
  assert sorted(b["answer_B"].tolist()) == sorted(a for a in answers for _ in range(8))
  # The 64 rows share their 8 strings; a fixed-width array would hold 64 x 2M characters (512 MB).
  assert b["answer_B"].nbytes < 1_000_000 and len({id(s) for s in b["answer_B"]}) <= 8


def test_sft_batches_with_task_tokenizer_are_right_padded_with_response_loss_mask():
  tok = build_task_tokenizer()
  ex = tasks.generate(tasks.preset("default"), "train", 40, seed=0)
  cfg = P.PipelineConfig(global_batch_size=8, bucket_lengths=(24, 32, 48), num_epochs=1)
  pl = P.sft_pipeline(ex, tok, cfg, shard_index=0, shard_count=1)
  seen = 0
  for b in pl.iterator():
    for r in range(b["tokens_BxT"].shape[0]):
      e = ex[b["example_idx_B"][r]]
      n = int(b["mask_BxT"][r].sum())
      assert b["mask_BxT"][r, :n].all() and (b["tokens_BxT"][r, n:] == tok.pad_token_id).all()
      resp = b["tokens_BxT"][r][b["loss_mask_BxT"][r]]
      assert resp[-1] == tok.eos_token_id
      assert decode_response(tok, resp) == e.solution
      prompt_part = b["tokens_BxT"][r, :n][~b["loss_mask_BxT"][r, :n]]
      assert tok.decode(prompt_part) == f"<bos><|user|>{e.prompt}<|assistant|>"
      seen += 1
  assert seen == 40
  with pytest.raises(ValueError, match="no solution"):
    P.sft_pipeline([tasks.Example("1+1=", "", "2")], tok, cfg, shard_index=0, shard_count=1)


def test_two_shards_are_disjoint_cover_the_data_and_form_the_global_batch():
  ids, answers = _random_prompts(37)
  cfg = P.PipelineConfig(global_batch_size=8, bucket_lengths=(16, 32), num_epochs=1, seed=3)
  whole = list(P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD, shard_index=0,
                                           shard_count=1).iterator())
  shards = [list(P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD, shard_index=p,
                                             shard_count=2).iterator()) for p in range(2)]
  assert len(whole) == len(shards[0]) == len(shards[1]) == 5  # ceil(37 / 8)
  covered = []
  for p, batches in enumerate(shards):
    mine = [int(i) for b in batches for i, v in zip(b["example_idx_B"], b["valid_B"]) if v]
    covered.append(set(mine))
    assert len(mine) == len(set(mine))
  assert covered[0].isdisjoint(covered[1])
  assert covered[0] | covered[1] == set(range(37))
  for g, s0, s1 in zip(whole, *shards):
    for k in g:
      assert np.array_equal(g[k], np.concatenate([s0[k], s1[k]])), k
  last = whole[-1]["valid_B"]
  assert last.sum() == 37 - 4 * 8 and not last[-1]  # fillers trail and are flagged


def test_shuffle_is_a_deterministic_permutation_per_epoch():
  ids, answers = _random_prompts(24)

  def order(seed, shuffle=True):
    cfg = P.PipelineConfig(global_batch_size=4, bucket_lengths=(32,), seed=seed, shuffle=shuffle,
                           num_epochs=2)
    bs = list(P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD, shard_index=0,
                                          shard_count=1).iterator())
    return np.concatenate([b["example_idx_B"] for b in bs])

  o = order(7)
  assert len(o) == 48
  assert sorted(o[:24]) == list(range(24)) and sorted(o[24:]) == list(range(24))
  assert not np.array_equal(o[:24], o[24:])  # reshuffled each epoch
  assert np.array_equal(o, order(7))
  assert not np.array_equal(o, order(8))
  assert np.array_equal(order(7, shuffle=False), np.tile(np.arange(24), 2))


@pytest.mark.parametrize("kind", ["rollout", "sft"])
def test_distinct_padded_shapes_are_bounded_by_the_buckets(kind):
  ids, answers = _random_prompts(200, lo=1, hi=60, seed=1)
  buckets = (16, 32, 48, 64)
  cfg = P.PipelineConfig(global_batch_size=4, bucket_lengths=buckets, group_size=2 if kind ==
                         "rollout" else 1)
  if kind == "rollout":
    pl = P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD, shard_index=0, shard_count=1)
    key, rows = "prompt_tokens_BxP", 8
  else:
    masks = [[i >= len(s) // 2 for i in range(len(s))] for s in ids]
    pl = P.sft_pipeline_from_ids(ids, masks, cfg, pad_id=PAD, shard_index=0, shard_count=1)
    key, rows = "tokens_BxT", 4
  shapes = set()
  for b in _take(pl.iterator(), 150):  # 3 epochs, crossing epoch boundaries
    shapes.add(b[key].shape)
    longest = int(b[key.replace("tokens", "mask")].sum(1).max())
    assert b[key].shape[1] == min(x for x in buckets if x >= longest)  # smallest bucket that fits
  assert shapes <= {(rows, x) for x in buckets}
  assert len(shapes) >= 2  # the test exercises more than one bucket


def test_bucket_is_chosen_from_the_global_batch_so_processes_agree():
  # One very long prompt: whichever shard holds it, both shards of that step use the same length.
  ids, answers = _random_prompts(16, lo=1, hi=4)
  ids[5] = list(range(1, 41))
  cfg = P.PipelineConfig(global_batch_size=8, bucket_lengths=(8, 64), num_epochs=1, seed=1)
  shards = [list(P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD, shard_index=p,
                                             shard_count=2).iterator()) for p in range(2)]
  for b0, b1 in zip(*shards):
    assert b0["prompt_tokens_BxP"].shape == b1["prompt_tokens_BxP"].shape
  assert sorted(b["prompt_tokens_BxP"].shape[1] for b in shards[0]) == [8, 64]


def test_too_long_example_is_an_error_naming_its_index():
  ids, answers = _random_prompts(10, lo=1, hi=8)
  ids[7] = list(range(1, 20))
  cfg = P.PipelineConfig(global_batch_size=2, bucket_lengths=(8, 16))
  with pytest.raises(ValueError, match=r"example 7 has 19 tokens, more than the largest bucket "
                                       r"\(16\); 1 examples are too long \(indices \[7\]\)"):
    P.rollout_pipeline_from_ids(ids, answers, cfg, pad_id=PAD, shard_index=0, shard_count=1)


def test_untokenizable_example_is_an_error_naming_its_index():
  tok = build_task_tokenizer()
  ex = [tasks.Example(prompt=f"what is {i}?", solution=f"{i}", answer=f"{i}") for i in range(4)]
  cfg = P.PipelineConfig(global_batch_size=2, bucket_lengths=(32,))
  bad = list(ex)
  bad[2] = tasks.Example(prompt="caf\u00e9?", solution="1", answer="1")
  with pytest.raises(ValueError, match=r"^rollout pipeline: example 2: prompt contains text the "
                                       r"tokenizer cannot encode: character 'é'"):
    P.rollout_pipeline(bad, tok, cfg, shard_index=0, shard_count=1)
  bad[2] = tasks.Example(prompt="fine", solution="ends <eos>", answer="1")
  with pytest.raises(ValueError, match=r"^sft pipeline: example 2: response contains text the "
                                       r"tokenizer cannot encode: '<eos>' at offset 5"):
    P.sft_pipeline(bad, tok, cfg, shard_index=0, shard_count=1)
  assert P.rollout_pipeline(ex, tok, cfg, shard_index=0, shard_count=1).num_examples == 4


@pytest.mark.parametrize("kind", ["rollout", "sft"])
def test_restored_iterator_continues_exactly(kind):
  ids, answers = _random_prompts(30, seed=2)
  masks = [[i % 2 == 0 for i in range(len(s))] for s in ids]
  cfg = P.PipelineConfig(global_batch_size=4, bucket_lengths=(16, 32), seed=9,
                         group_size=2 if kind == "rollout" else 1)

  def build(shard_index=0, shard_count=1, c=cfg):
    if kind == "rollout":
      return P.rollout_pipeline_from_ids(ids, answers, c, pad_id=PAD, shard_index=shard_index,
                                         shard_count=shard_count)
    return P.sft_pipeline_from_ids(ids, masks, c, pad_id=PAD, shard_index=shard_index,
                                   shard_count=shard_count)

  it = build().iterator()
  _take(it, 11)  # crosses the first epoch boundary (30 / 4 = 7.5 steps per epoch)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 9)
  resumed = build().iterator()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 9), expected)
  assert resumed.epoch == pytest.approx(20 * 4 / 30)
  # Resuming on two processes continues the same global sequence.
  halves = []
  for p in range(2):
    r = build(p, 2).iterator()
    r.set_state(state)
    halves.append(_take(r, 9))
  for g, h0, h1 in zip(expected, *halves):
    for k in g:
      if k != "group_id_B":
        assert np.array_equal(g[k], np.concatenate([h0[k], h1[k]])), k
  # A state from a differently configured pipeline is rejected.
  other = build(c=P.PipelineConfig(global_batch_size=4, bucket_lengths=(16, 32), seed=10,
                                   group_size=cfg.group_size)).iterator()
  with pytest.raises(ValueError, match="seed: \\(9, 10\\)"):
    other.set_state(state)


def test_finite_pipeline_stops_and_infinite_one_does_not():
  ids, answers = _random_prompts(10)
  fin = P.rollout_pipeline_from_ids(ids, answers, P.PipelineConfig(4, (32,), num_epochs=2),
                                    pad_id=PAD, shard_index=0, shard_count=1)
  assert fin.num_steps == 5 and len(list(fin.iterator())) == 5
  inf = P.rollout_pipeline_from_ids(ids, answers, P.PipelineConfig(4, (32,)), pad_id=PAD,
                                    shard_index=0, shard_count=1)
  assert inf.num_steps is None
  counts = np.bincount(np.concatenate([b["example_idx_B"] for b in _take(inf.iterator(), 25)]),
                       minlength=10)
  assert (counts == 10).all()  # 100 draws over 10 epochs


def test_infinite_pipeline_with_global_batch_one():
  # grain's len() of an infinite stream cut into batches of 1 overflows an index-sized int; the
  # iterator must not ask it (an OPD run with one prompt x G samples per step).
  ids, answers = _random_prompts(3)
  inf = P.rollout_pipeline_from_ids(ids, answers, P.PipelineConfig(1, (32,), group_size=8),
                                    pad_id=PAD, shard_index=0, shard_count=1)
  it = inf.iterator()
  rows = [next(it)["example_idx_B"] for _ in range(6)]
  assert all(len(r) == 8 and (r == r[0]).all() for r in rows)
  assert np.bincount([r[0] for r in rows], minlength=3).tolist() == [2, 2, 2]


def test_default_shard_is_the_jax_process_and_config_errors():
  ids, answers = _random_prompts(8)
  pl = P.rollout_pipeline_from_ids(ids, answers, P.PipelineConfig(4, (32,)), pad_id=PAD)
  assert (pl.shard_index, pl.shard_count) == (0, 1)
  with pytest.raises(ValueError, match="not divisible by the number of processes"):
    P.rollout_pipeline_from_ids(ids, answers, P.PipelineConfig(3, (32,)), pad_id=PAD,
                                shard_index=0, shard_count=2)
  with pytest.raises(ValueError, match="bucket_lengths"):
    P.PipelineConfig(4, (32, 16))
  with pytest.raises(ValueError, match="num_epochs"):
    P.PipelineConfig(4, (32,), num_epochs=0)
  with pytest.raises(ValueError, match="both shard_index and shard_count"):
    P.rollout_pipeline_from_ids(ids, answers, P.PipelineConfig(4, (32,)), pad_id=PAD,
                                shard_index=0)


# -- packing --------------------------------------------------------------------------------------
def _packed_rows(batch):
  """Example indices per row (in order) read back from example_idx_BxT / segment_ids_BxT."""
  rows = []
  for r in range(batch["tokens_BxT"].shape[0]):
    seg, idx = batch["segment_ids_BxT"][r], batch["example_idx_BxT"][r]
    rows.append([int(idx[seg == k][0]) for k in range(1, int(seg.max()) + 1)])
  return rows


def _first_fit_reference(stream, lengths, rows, capacity, steps):
  """The documented rule, written plainly: each example to the first row with room; the first
  that fits no row opens the next step."""
  out, pos = [], 0
  for _ in range(steps):
    room, packed = [capacity] * rows, [[] for _ in range(rows)]
    while pos < len(stream):
      ex = stream[pos]
      r = next((r for r in range(rows) if room[r] >= lengths[ex]), None)
      if r is None:
        break
      packed[r].append(ex)
      room[r] -= lengths[ex]
      pos += 1
    out.append(packed)
  return out


def test_packed_sft_batches_follow_first_fit_in_stream_order():
  ids, _ = _random_prompts(29, lo=2, hi=20, seed=4)
  rng = np.random.default_rng(1)
  masks = [rng.random(len(s)) < 0.5 for s in ids]
  cfg = P.PipelineConfig(global_batch_size=3, bucket_lengths=(16, 24, 40), seed=3, pack=True,
                         num_epochs=2)
  pl = P.sft_pipeline_from_ids(ids, masks, cfg, pad_id=PAD, shard_index=0, shard_count=1)
  batches = list(pl.iterator())
  # The stream: the unpacked pipeline's order (global batch 1 = one stream position per step).
  one = P.sft_pipeline_from_ids(ids, masks, P.PipelineConfig(1, (40,), seed=3, num_epochs=2),
                                pad_id=PAD, shard_index=0, shard_count=1)
  stream = [int(b["example_idx_B"][0]) for b in one.iterator()]
  lengths = [len(s) for s in ids]
  want = _first_fit_reference(stream, lengths, 3, 40, len(batches))
  assert [_packed_rows(b) for b in batches] == want
  assert sum(len(r) for rows in want for r in rows) == 2 * 29  # every example once per epoch
  for b, rows in zip(batches, want):
    fill = max(sum(lengths[i] for i in r) for r in rows)
    assert b["tokens_BxT"].shape[1] == min(x for x in cfg.bucket_lengths if x >= fill)
    assert np.array_equal(b["valid_B"], [bool(r) for r in rows])
    for r, members in enumerate(rows):
      o = 0
      for k, i in enumerate(members, start=1):
        n = lengths[i]
        assert np.array_equal(b["tokens_BxT"][r, o:o + n], ids[i])
        assert np.array_equal(b["loss_mask_BxT"][r, o:o + n], masks[i])
        assert (b["segment_ids_BxT"][r, o:o + n] == k).all() and b["mask_BxT"][r, o:o + n].all()
        o += n
      assert (b["segment_ids_BxT"][r, o:] == 0).all() and (b["tokens_BxT"][r, o:] == PAD).all()
      assert not b["mask_BxT"][r, o:].any() and not b["loss_mask_BxT"][r, o:].any()
      assert (b["example_idx_BxT"][r, o:] == -1).all()
  assert pl.num_steps == len(batches) < 2 * 29 / 3  # packing takes fewer steps than rows


def test_packed_pipeline_resumes_exactly_and_does_not_depend_on_process_count():
  ids, _ = _random_prompts(31, lo=2, hi=24, seed=6)
  masks = [[i % 3 == 0 for i in range(len(s))] for s in ids]
  cfg = P.PipelineConfig(global_batch_size=4, bucket_lengths=(24, 48), seed=2, pack=True)

  def build(shard_index=0, shard_count=1):
    return P.sft_pipeline_from_ids(ids, masks, cfg, pad_id=PAD, shard_index=shard_index,
                                   shard_count=shard_count)

  it = build().iterator()
  _take(it, 7)  # crosses the first epoch boundary
  state = json.loads(json.dumps(it.get_state()))
  assert state["fingerprint"]["pack"] is True
  drawn = it.epoch * 31
  expected = _take(it, 6)
  resumed = build().iterator()
  resumed.set_state(state)  # packs steps < 7 again, from nothing
  assert resumed.epoch * 31 == pytest.approx(drawn)
  _assert_batches_equal(_take(resumed, 6), expected)
  # Two processes: their rows concatenate to the one-process global batch, step for step.
  halves = []
  for p in range(2):
    r = build(p, 2).iterator()
    r.set_state(state)
    halves.append(_take(r, 6))
  for g, h0, h1 in zip(expected, *halves):
    for k in g:
      assert np.array_equal(g[k], np.concatenate([h0[k], h1[k]])), k
  # An unpacked pipeline's state does not resume a packed one.
  plain = P.sft_pipeline_from_ids(ids, masks, dataclasses.replace(cfg, pack=False), pad_id=PAD,
                                  shard_index=0, shard_count=1).iterator()
  with pytest.raises(ValueError, match="pack: \\(True, False\\)"):
    plain.set_state(state)
  with pytest.raises(ValueError, match="packs SFT examples only"):
    P.rollout_pipeline_from_ids(ids, [str(i) for i in range(31)], cfg, pad_id=PAD,
                                shard_index=0, shard_count=1)
