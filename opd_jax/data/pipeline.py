"""Input pipelines (grain `MapDataset`, no worker processes): rollout prompts and SFT examples.

Order. Examples are tokenised once, up front (so an over-long example fails at construction,
naming its index). A single GLOBAL index stream, `range(N).shuffle(seed)` reshuffled every epoch
(grain mixes the epoch into the seed), is cut into global batches of `global_batch_size` examples:
global step s holds stream positions [s * GB, (s + 1) * GB). Process p of P takes the p-th
contiguous slice of GB / P examples. Hence the shards of one step are disjoint and together are the
global batch, and the global sequence of batches does not depend on the number of processes.

Epochs. `num_epochs=None` streams forever (batches run across epoch boundaries). A finite
`num_epochs` (e.g. 1 for an eval pass) pads the stream to a whole number of global batches with
filler rows (`valid_B` False; a copy of the step's first example, so the arrays stay well-formed; in
SFT batches their loss mask is all False). Every process then runs the same number of steps.

Shapes. Every batch has a fixed number of rows; its length is the smallest of `bucket_lengths` that
fits the longest sequence in the GLOBAL batch (all processes pick the same bucket). So a pipeline
emits at most len(bucket_lengths) distinct shapes, and a jitted step compiles at most that many
times. Nothing is ever truncated.

Batches (dicts of numpy arrays):
  rollout: prompt_tokens_BxP int32 (LEFT-padded), prompt_mask_BxP bool, group_id_B int32,
           answer_B str, example_idx_B int32, valid_B bool; B = (GB / P) * group_size, each prompt
           repeated group_size times in consecutive rows; group_id = the prompt's slot in the
           global batch (unique within a global step, identical across its G copies).
  sft:     tokens_BxT int32, mask_BxT bool, loss_mask_BxT bool (response + EOS only), all
           RIGHT-padded; example_idx_B int32, valid_B bool; B = GB / P.

Packing (SFT, `PipelineConfig(pack=True)`). Several examples share a row. The global stream (the
same shuffled, epoch-repeated index stream as above) is packed greedily in stream order: each
example goes into the FIRST of the step's `global_batch_size` rows whose remaining room (the largest
bucket minus the tokens already in it) fits it; the first example that fits no row closes the step
and opens the next one. So global step s holds a contiguous run of stream positions, every row
holds at most the largest bucket's tokens, and the packing depends on the stream and the lengths
only, never on the number of processes: process p takes the p-th contiguous slice of GB / P rows
of the step. The step's length is the smallest bucket fitting its fullest row. The plan is computed
lazily in step order and memoised (a resume at step s packs steps < s once). A finite stream's last
step may leave rows empty (`valid_B` False, all masks False). Packed batches:
  sft packed: tokens_BxT int32, mask_BxT bool, loss_mask_BxT bool (each example's own loss mask),
           segment_ids_BxT int32 (0 = padding, k = the k-th example of the row, 1-based, in
           stream order), example_idx_BxT int32 (the example index of each token, -1 on padding),
           valid_B bool (the row holds an example); examples are left-aligned back to back, the
           padding trails. Feed segment_ids_BxT to the model: attention stays within an example
           and its positions restart at 0.

Resume. `BatchIterator.get_state()` is a small JSON-serialisable dict (the next global step and a
fingerprint of the data and order-affecting config); `set_state` on an iterator of an identically
built pipeline continues with exactly the batches the original would have produced (also on another
number of processes, since the global order does not depend on it). A fingerprint mismatch raises.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Callable, Sequence

import grain
import numpy as np

from opd_jax.data.tasks import Example
from opd_jax.data.tokenizer import encode_example, encode_prompt, encode_prompts

Batch = dict[str, np.ndarray]


class ExampleTooLongError(ValueError):
  """An example longer than the largest bucket (nothing is truncated). `detail` says which; a
  caller that sets the buckets from its own config names its field instead of
  `PipelineConfig.bucket_lengths`."""

  def __init__(self, detail: str):
    super().__init__(f"{detail}. Raise PipelineConfig.bucket_lengths or filter the data (nothing "
                     "is truncated).")
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Batching, order and padding of a pipeline.

  global_batch_size: prompts (rollout) or sequences (SFT) per global step, over all processes.
  bucket_lengths: allowed padded lengths (prompt length for rollouts, full sequence for SFT).
  group_size: rollout only: rows per prompt (GRPO's G); the emitted batch has GB / P * G rows.
  seed: shuffle seed (0 <= seed < 2**32). shuffle: False keeps file / generation order.
  num_epochs: None = infinite stream; otherwise that many passes, padded to whole batches.
  pack: SFT only: pack several examples per row (module docstring); global_batch_size then
    counts packed rows.
  """

  global_batch_size: int
  bucket_lengths: tuple[int, ...] = (64,)
  group_size: int = 1
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  pack: bool = False

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"PipelineConfig.{field}={getattr(self, field)!r}: {why}")

    if self.global_batch_size < 1:
      bad("global_batch_size", "must be >= 1")
    b = self.bucket_lengths
    if not b or any(not isinstance(x, int) or x < 1 for x in b) or list(b) != sorted(set(b)):
      bad("bucket_lengths", "must be a non-empty, strictly increasing tuple of positive ints")
    if self.group_size < 1:
      bad("group_size", "must be >= 1")
    if not 0 <= self.seed < 2**32:
      bad("seed", "must be in [0, 2**32)")
    if self.num_epochs is not None and self.num_epochs < 1:
      bad("num_epochs", "must be None (infinite) or >= 1")


class BatchIterator:
  """Iterator over a pipeline's batches for this process, with exact save/restore."""

  def __init__(self, pipeline: "Pipeline"):
    self._pipeline = pipeline
    self.step = 0

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    # An infinite stream's len() is sys.maxsize-sized and overflows at global batch 1: ask
    # num_steps (None = infinite) instead.
    total = self._pipeline.num_steps
    if total is not None and self.step >= total:
      raise StopIteration
    batch = self._pipeline.batches[self.step]
    self.step += 1
    return batch

  @property
  def epoch(self) -> float:
    """Epochs consumed so far (global examples drawn / dataset size)."""
    return self._pipeline.examples_before(self.step) / self._pipeline.num_examples

  def get_state(self) -> dict[str, Any]:
    return {"step": self.step, "fingerprint": dict(self._pipeline.fingerprint)}

  def set_state(self, state: dict[str, Any]) -> None:
    want, got = self._pipeline.fingerprint, state.get("fingerprint", {})
    diff = {k: (got.get(k), want.get(k)) for k in set(want) | set(got) if got.get(k) != want.get(k)}
    if diff:
      raise ValueError("BatchIterator.set_state: the saved state belongs to a different pipeline; "
                       "differences (saved, current): " +
                       ", ".join(f"{k}: {v}" for k, v in sorted(diff.items())))
    step = state["step"]
    if not isinstance(step, int) or step < 0:
      raise ValueError(f"BatchIterator.set_state: bad step {step!r}")
    self.step = step


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """The local batches of one process (`batches[step]`) plus what is needed to resume them."""

  batches: grain.MapDataset
  config: PipelineConfig
  num_examples: int
  shard_index: int
  shard_count: int
  fingerprint: dict[str, Any]
  packer: "_Packer | None" = None

  @property
  def num_steps(self) -> int | None:
    """Global steps in the pipeline (None if infinite)."""
    return None if self.config.num_epochs is None else len(self.batches)

  def examples_before(self, step: int) -> int:
    """Global stream positions (examples, fillers excluded when packing) before `step`."""
    if self.packer is not None:
      return self.packer.start(step)
    return step * self.config.global_batch_size

  def iterator(self) -> BatchIterator:
    return BatchIterator(self)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if (shard_index is None) != (shard_count is None):
    raise ValueError("pass both shard_index and shard_count, or neither (then JAX processes)")
  if shard_index is None:
    import jax
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  return shard_index, shard_count


def _bucket(length: int, buckets: tuple[int, ...]) -> int:
  return buckets[int(np.searchsorted(buckets, length))]


def _stream(n: int, cfg: PipelineConfig) -> grain.MapDataset:
  """The global stream of example indices: shuffled per epoch (if asked), repeated."""
  order = grain.MapDataset.range(n)
  if cfg.shuffle:
    order = order.shuffle(seed=cfg.seed)
  return order.repeat(cfg.num_epochs)


# Steps of an infinite packed pipeline: any index is a valid step (len() must stay an ssize_t).
_INFINITE_STEPS = 2**62


class _Packer:
  """Greedy first-fit packing of the global stream into steps of `rows` rows of `capacity`
  tokens (module docstring). `start(s)` is the stream position of step s's first example; steps
  are packed in order and their starts memoised, so any step is reachable at the cost of packing
  the earlier ones once."""

  def __init__(self, stream: grain.MapDataset, total: int | None, lengths: np.ndarray, rows: int,
               capacity: int):
    self._stream, self._total, self._lengths = stream, total, lengths
    self._rows, self._capacity = rows, capacity
    self._starts = [0]
    self._last: tuple[int, list[list[int]]] | None = None

  def _pack(self, pos: int) -> tuple[list[list[int]], int]:
    room = np.full(self._rows, self._capacity, np.int64)
    rows: list[list[int]] = [[] for _ in range(self._rows)]
    while self._total is None or pos < self._total:
      ex = int(self._stream[pos])
      fits = np.flatnonzero(room >= self._lengths[ex])
      if not len(fits):
        break
      r = int(fits[0])
      rows[r].append(ex)
      room[r] -= self._lengths[ex]
      pos += 1
    return rows, pos

  def _extend(self, step: int) -> None:
    while len(self._starts) <= step:
      s = len(self._starts) - 1
      rows, nxt = self._pack(self._starts[s])
      self._last = (s, rows)
      self._starts.append(nxt)

  def start(self, step: int) -> int:
    self._extend(step)
    return self._starts[step]

  def rows(self, step: int) -> list[list[int]]:
    """Example indices of each of the step's global rows, in stream order."""
    self._extend(step)
    if self._last is not None and self._last[0] == step:
      return self._last[1]
    rows, nxt = self._pack(self._starts[step])
    if step + 1 == len(self._starts):
      self._starts.append(nxt)
    self._last = (step, rows)
    return rows

  def num_steps(self) -> int:
    """Steps of a finite stream (packs it all once)."""
    while self._starts[-1] < self._total:
      self._extend(len(self._starts))
    return len(self._starts) - 1


def _global_indices(n: int, cfg: PipelineConfig) -> grain.MapDataset:
  """Global batches of example indices (-1 = filler), as a MapDataset of int64 [GB] arrays."""
  order = _stream(n, cfg)
  if cfg.num_epochs is not None:
    total = len(order)
    padded = -(-total // cfg.global_batch_size) * cfg.global_batch_size
    stream = order
    order = grain.MapDataset.range(padded).map(lambda i: stream[i] if i < total else -1)
  return order.batch(cfg.global_batch_size)


def _build(seqs: Sequence[np.ndarray], cfg: PipelineConfig, what: str,
           collate: Callable[..., Batch], shard_index, shard_count, extra_hash: bytes) -> Pipeline:
  if not seqs:
    raise ValueError(f"{what} pipeline: no examples")
  p, n_proc = _shard(shard_index, shard_count)
  gb = cfg.global_batch_size
  if gb % n_proc:
    raise ValueError(f"PipelineConfig.global_batch_size={gb} is not divisible by the number of "
                     f"processes ({n_proc})")
  lengths = np.asarray([len(s) for s in seqs], np.int64)
  longest = int(lengths.argmax())
  if lengths[longest] > cfg.bucket_lengths[-1]:
    over = np.flatnonzero(lengths > cfg.bucket_lengths[-1])
    raise ExampleTooLongError(
        f"{what} pipeline: example {longest} has {lengths[longest]} tokens, more than the largest "
        f"bucket ({cfg.bucket_lengths[-1]}); {len(over)} examples are too long (indices "
        f"{over[:10].tolist()}{'...' if len(over) > 10 else ''})")
  if lengths.min() < 1:
    raise ValueError(f"{what} pipeline: example {int(lengths.argmin())} is empty")
  h = hashlib.blake2b(digest_size=16)
  for s in seqs:
    h.update(np.asarray(s, np.int32).tobytes() + b"\xff\xff\xff\xff")
  h.update(extra_hash)
  fingerprint = {"kind": what, "num_examples": len(seqs), "data_hash": h.hexdigest(),
                 **{k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(cfg).items()}}
  local = gb // n_proc
  if cfg.pack:
    stream = _stream(len(seqs), cfg)
    total = None if cfg.num_epochs is None else len(stream)
    packer = _Packer(stream, total, lengths, gb, cfg.bucket_lengths[-1])
    steps = packer.num_steps() if cfg.num_epochs is not None else _INFINITE_STEPS
    batches = grain.MapDataset.range(steps).map(
        lambda s: collate(packer.rows(s), lo=p * local, hi=(p + 1) * local, lengths=lengths))
    return Pipeline(batches=batches, config=cfg, num_examples=len(seqs), shard_index=p,
                    shard_count=n_proc, fingerprint=fingerprint, packer=packer)
  batches = _global_indices(len(seqs), cfg).map(
      functools.partial(collate, lo=p * local, hi=(p + 1) * local, lengths=lengths))
  return Pipeline(batches=batches, config=cfg, num_examples=len(seqs), shard_index=p,
                  shard_count=n_proc, fingerprint=fingerprint)


def _local_rows(global_idx: np.ndarray, lo: int, hi: int, lengths: np.ndarray,
                buckets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int]:
  """(example indices of this shard with fillers replaced, valid mask, bucket length)."""
  filler = int(global_idx[0])  # padding only ever trails, so the first entry is real
  valid = global_idx >= 0
  idx = np.where(valid, global_idx, filler)
  length = _bucket(int(lengths[idx].max()), buckets)
  return idx[lo:hi], valid[lo:hi], length


def _collate_rollout(global_idx, *, lo, hi, lengths, prompts, answers, cfg: PipelineConfig,
                     pad_id: int) -> Batch:
  idx, valid, plen = _local_rows(global_idx, lo, hi, lengths, cfg.bucket_lengths)
  tokens = np.full((len(idx), plen), pad_id, np.int32)
  mask = np.zeros((len(idx), plen), bool)
  for r, i in enumerate(idx):
    ids = prompts[i]
    tokens[r, plen - len(ids):] = ids
    mask[r, plen - len(ids):] = True
  g = cfg.group_size
  return {
      "prompt_tokens_BxP": np.repeat(tokens, g, axis=0),
      "prompt_mask_BxP": np.repeat(mask, g, axis=0),
      "group_id_B": np.repeat(np.arange(lo, hi, dtype=np.int32), g),
      # Python strings: a fixed-width numpy string array is as wide as its longest answer (a code
      # task's tests can be megabytes) times G rows.
      "answer_B": np.array([answers[i] for i in idx for _ in range(g)], dtype=object),
      "example_idx_B": np.repeat(idx.astype(np.int32), g),
      "valid_B": np.repeat(valid, g),
  }


def _collate_sft(global_idx, *, lo, hi, lengths, seqs, loss_masks, cfg: PipelineConfig,
                 pad_id: int) -> Batch:
  idx, valid, tlen = _local_rows(global_idx, lo, hi, lengths, cfg.bucket_lengths)
  tokens = np.full((len(idx), tlen), pad_id, np.int32)
  mask = np.zeros((len(idx), tlen), bool)
  loss_mask = np.zeros((len(idx), tlen), bool)
  for r, i in enumerate(idx):
    n = len(seqs[i])
    tokens[r, :n] = seqs[i]
    mask[r, :n] = True
    loss_mask[r, :n] = loss_masks[i] & valid[r]
  return {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask,
          "example_idx_B": idx.astype(np.int32), "valid_B": valid}


def _collate_sft_packed(rows_global: list[list[int]], *, lo, hi, lengths, seqs, loss_masks,
                        cfg: PipelineConfig, pad_id: int) -> Batch:
  fill = max(int(sum(lengths[i] for i in r)) for r in rows_global)
  tlen = _bucket(max(fill, 1), cfg.bucket_lengths)
  rows = rows_global[lo:hi]
  b = len(rows)
  tokens = np.full((b, tlen), pad_id, np.int32)
  mask = np.zeros((b, tlen), bool)
  loss_mask = np.zeros((b, tlen), bool)
  segment_ids = np.zeros((b, tlen), np.int32)
  example_idx = np.full((b, tlen), -1, np.int32)
  for r, members in enumerate(rows):
    o = 0
    for k, i in enumerate(members):
      n = len(seqs[i])
      tokens[r, o:o + n] = seqs[i]
      mask[r, o:o + n] = True
      loss_mask[r, o:o + n] = loss_masks[i]
      segment_ids[r, o:o + n] = k + 1
      example_idx[r, o:o + n] = i
      o += n
  return {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask,
          "segment_ids_BxT": segment_ids, "example_idx_BxT": example_idx,
          "valid_B": np.asarray([bool(m) for m in rows], bool)}


def rollout_pipeline_from_ids(prompt_ids: Sequence[Sequence[int]], answers: Sequence[str],
                              cfg: PipelineConfig, *, pad_id: int, shard_index: int | None = None,
                              shard_count: int | None = None) -> Pipeline:
  """Rollout pipeline over already-tokenised prompts (chat template applied)."""
  if cfg.pack:
    raise ValueError("rollout pipeline: PipelineConfig.pack=True packs SFT examples only")
  if len(prompt_ids) != len(answers):
    raise ValueError(f"rollout pipeline: {len(prompt_ids)} prompts but {len(answers)} answers")
  prompts = [np.asarray(p, np.int32) for p in prompt_ids]
  answers = [str(a) for a in answers]
  collate = functools.partial(_collate_rollout, prompts=prompts, answers=answers, cfg=cfg,
                              pad_id=pad_id)
  extra = "\x00".join(answers).encode() + str(pad_id).encode()
  return _build(prompts, cfg, "rollout", collate, shard_index, shard_count, extra)


def sft_pipeline_from_ids(seqs: Sequence[Sequence[int]], loss_masks: Sequence[Sequence[bool]],
                          cfg: PipelineConfig, *, pad_id: int, shard_index: int | None = None,
                          shard_count: int | None = None) -> Pipeline:
  """SFT pipeline over already-tokenised sequences and their loss masks."""
  if len(seqs) != len(loss_masks):
    raise ValueError(f"sft pipeline: {len(seqs)} sequences but {len(loss_masks)} loss masks")
  arrs = [np.asarray(s, np.int32) for s in seqs]
  masks = [np.asarray(m, bool) for m in loss_masks]
  for i, (s, m) in enumerate(zip(arrs, masks)):
    if s.shape != m.shape:
      raise ValueError(f"sft pipeline: example {i} has {len(s)} tokens but a loss mask of "
                       f"length {len(m)}")
  collate = functools.partial(_collate_sft_packed if cfg.pack else _collate_sft, seqs=arrs,
                              loss_masks=masks, cfg=cfg, pad_id=pad_id)
  extra = b"".join(m.tobytes() for m in masks) + str(pad_id).encode()
  return _build(arrs, cfg, "sft", collate, shard_index, shard_count, extra)


def rollout_pipeline(examples: Sequence[Example], tokenizer, cfg: PipelineConfig, *,
                     shard_index: int | None = None, shard_count: int | None = None) -> Pipeline:
  """Rollout prompts: each example's chat-formatted prompt, left-padded, group_size times."""
  try:
    ids = encode_prompts(tokenizer, [e.prompt for e in examples])
  except ValueError:  # name the example
    for i, e in enumerate(examples):
      try:
        encode_prompt(tokenizer, e.prompt)
      except ValueError as err:
        raise ValueError(f"rollout pipeline: example {i}: {err}") from None
    raise
  return rollout_pipeline_from_ids(ids, [e.answer for e in examples], cfg,
                                   pad_id=tokenizer.pad_token_id, shard_index=shard_index,
                                   shard_count=shard_count)


def sft_pipeline(examples: Sequence[Example], tokenizer, cfg: PipelineConfig, *,
                 shard_index: int | None = None, shard_count: int | None = None) -> Pipeline:
  """SFT demonstrations: chat prompt + solution + EOS, loss on the solution and EOS."""
  if cfg.group_size != 1:
    raise ValueError(f"sft pipeline: PipelineConfig.group_size={cfg.group_size} must be 1")
  for i, e in enumerate(examples):
    if not e.solution:
      raise ValueError(f"sft pipeline: example {i} has no solution (prompt {e.prompt[:60]!r})")
  pairs = []
  for i, e in enumerate(examples):
    try:
      pairs.append(encode_example(tokenizer, e.prompt, e.solution))
    except ValueError as err:
      raise ValueError(f"sft pipeline: example {i}: {err}") from None
  return sft_pipeline_from_ids([p[0] for p in pairs], [p[1] for p in pairs], cfg,
                               pad_id=tokenizer.pad_token_id, shard_index=shard_index,
                               shard_count=shard_count)
