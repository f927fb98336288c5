"""Training metrics: computed in jit, fetched one step late, written to JSONL / TensorBoard.

Steps and rollouts return flat dicts of scalar device arrays with slash names (`train/loss`,
`opd/teacher_gap`, `rollout/response_len`, ...). Fetching them right after dispatch would block the
host until the step finishes and stall the pipeline, so the loop keeps the previous step's dict and
`jax.device_get`s it only after the next step has been dispatched (`LateFetcher`). The price: the
loop learns that step s had a non-finite loss while step s+1 is already running, so the loop must
check the *current* step's flag synchronously before it checkpoints (see `loop.py`).

Writers: `JsonlWriter` (one JSON object per line: {"step": s, "<name>": value, ...}),
`TensorBoardWriter` (tensorboardX scalars), `MetricsWriter` (both), and `Progress` (a tqdm bar with
rate and ETA, showing a few chosen metrics).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, Any]


def prefixed(prefix: str, metrics: Mapping[str, Any]) -> Metrics:
  """Adds `prefix/` to every name that has no slash yet (names with a slash are kept)."""
  return {(k if "/" in k else f"{prefix}/{k}"): v for k, v in metrics.items()}


def masked_mean(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Mean of x over mask (0 when the mask is empty); float32, for in-jit metrics."""
  m = mask_BxT.astype(jnp.float32)
  return jnp.sum(x_BxT.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def to_host(metrics: Mapping[str, Any]) -> dict[str, float]:
  """`jax.device_get` of a metrics dict, as plain Python floats (checks the names)."""
  out = {}
  for name, value in jax.device_get(dict(metrics)).items():
    arr = np.asarray(value)
    if arr.size != 1:
      raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    out[name] = float(arr.reshape(()))
  return out


class LateFetcher:
  """Holds one step's device metrics until the next step has been dispatched.

  Usage per step: `ready = fetcher.push(step, device_metrics)` right after dispatching `step`;
  it returns `(previous_step, host_metrics)` of the step before (or None the first time).
  `flush()` fetches what is still held (at the end, or when the loop must know now).
  """

  def __init__(self):
    self._pending: tuple[int, Metrics] | None = None

  def push(self, step: int, metrics: Metrics) -> tuple[int, dict[str, float]] | None:
    ready = self.flush()
    self._pending = (step, metrics)
    return ready

  def flush(self) -> tuple[int, dict[str, float]] | None:
    if self._pending is None:
      return None
    step, metrics = self._pending
    self._pending = None
    return step, to_host(metrics)

  @property
  def pending_step(self) -> int | None:
    return None if self._pending is None else self._pending[0]


def _json_value(v: float):
  return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf: write them as strings


# -- eval statistics over distinct problems ------------------------------------------------
# Sufficient statistics of one eval set, additive over batches and processes (all-gathered as one
# float64 vector): [problems, sum avg, sum avg^2, sum pass, sum pass^2].
EVAL_STATS = 5


def pass_at_k(n: int, c, k: int):
  """The unbiased pass@k estimator (Chen et al. 2021, Codex): 1 - C(n-c, k) / C(n, k), the
  probability that k of the n samples, drawn without replacement, include a correct one; `c` (a
  number or an array) correct samples out of n. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i),
  which is exact in float64 and never forms a large binomial."""
  if not 1 <= k <= n:
    raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
  c = np.asarray(c, np.int64)
  if np.any((c < 0) | (c > n)):
    raise ValueError(f"correct counts must lie in [0, {n}]")
  i = np.arange(1, n + 1, dtype=np.float64)
  # term i contributes (1 - k/i) when i > n - c; 1 otherwise.
  factors = np.where(i[None, :] > (n - c.reshape(-1))[:, None], 1.0 - k / i[None, :], 1.0)
  out = 1.0 - np.prod(factors, axis=1)
  return out.reshape(c.shape) if c.ndim else float(out[0])


def problem_stats(scores_PxN: np.ndarray, k: int) -> np.ndarray:
  """EVAL_STATS sufficient statistics of P problems with N samples each (scores in [0, 1]; a
  sample is correct iff its score >= 1): per problem avg = mean score over its N samples and
  pass = pass_at_k(N, correct, k)."""
  s = np.asarray(scores_PxN, np.float64)
  if s.ndim != 2:
    raise ValueError(f"scores must be [problems, samples], got shape {s.shape}")
  if s.shape[0] == 0:
    return np.zeros(EVAL_STATS, np.float64)
  avg = s.mean(axis=1)
  passed = pass_at_k(s.shape[1], (s >= 1.0).sum(axis=1), k)
  return np.asarray([s.shape[0], avg.sum(), (avg * avg).sum(), passed.sum(),
                     (passed * passed).sum()], np.float64)


def _mean_se(n: float, total: float, total_sq: float) -> tuple[float, float]:
  if n < 1:
    return 0.0, 0.0
  mean = total / n
  if n < 2:
    return mean, 0.0
  var = max(total_sq - n * mean * mean, 0.0) / (n - 1)  # sample variance over problems
  return mean, math.sqrt(var / n)


def eval_summary(stats: np.ndarray, n: int, k: int) -> dict[str, float]:
  """avg@n, pass@k and their standard errors over the distinct problems (sample standard
  deviation of the per-problem values / sqrt(problems); 0 with fewer than 2 problems), from
  summed `problem_stats`. Keys: 'avg@N', 'avg@N_se', 'pass@K', 'pass@K_se', 'problems'."""
  stats = np.asarray(stats, np.float64)
  avg, avg_se = _mean_se(stats[0], stats[1], stats[2])
  pas, pas_se = _mean_se(stats[0], stats[3], stats[4])
  return {f"avg@{n}": avg, f"avg@{n}_se": avg_se, f"pass@{k}": pas, f"pass@{k}_se": pas_se,
          "problems": float(stats[0])}


class JsonlWriter:
  """Appends {"step": s, ...metrics} lines to a file (resumed runs keep appending)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self.path = path
    self._f = open(path, "a", encoding="utf-8")

  def write(self, step: int, metrics: Mapping[str, float]):
    row = {"step": int(step)}
    row.update({k: _json_value(float(v)) for k, v in sorted(metrics.items())})
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()

  def close(self):
    self._f.close()


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics file written by `JsonlWriter` ('nan'/'inf' strings back to floats)."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
      rows.append({k: (float(v) if isinstance(v, str) and k != "step" else v)
                   for k, v in row.items()})
  return rows


class TensorBoardWriter:
  """tensorboardX scalars, one tag per metric name."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # imported lazily: only runs that log need it
    self._w = SummaryWriter(logdir=logdir)

  def write(self, step: int, metrics: Mapping[str, float]):
    for k, v in metrics.items():
      self._w.add_scalar(k, float(v), global_step=int(step))
    self._w.flush()

  def close(self):
    self._w.close()


class MetricsWriter:
  """JSONL (always) plus TensorBoard (optional); only process 0 writes."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, name: str = "metrics"):
    self._writers = []
    if jax.process_index() == 0:
      self._writers.append(JsonlWriter(os.path.join(workdir, f"{name}.jsonl")))
      if tensorboard:
        self._writers.append(TensorBoardWriter(os.path.join(workdir, "tb")))

  def write(self, step: int, metrics: Mapping[str, float]):
    for w in self._writers:
      w.write(step, metrics)

  def close(self):
    for w in self._writers:
      w.close()


class Progress:
  """A tqdm bar over training steps with rate and ETA, showing a few chosen metrics.

  Metrics are fetched one step late (no device sync in the step), so the bar labels them with the
  step they belong to (`at=N`) instead of passing step N-1's loss off as step N's; `show_metrics`
  puts the final step's metrics on the bar once they are fetched.
  """

  def __init__(self, total: int, initial: int = 0, *, show: tuple[str, ...] = ("train/loss",),
               enabled: bool = True, desc: str = "train"):
    from tqdm.auto import tqdm
    self._show = show
    self._initial, self._done, self._total = initial, 0, total
    self._t0 = time.perf_counter()
    self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                     disable=not enabled or jax.process_index() != 0)

  def show_metrics(self, metrics: Mapping[str, float] | None, step: int | None = None,
                   *, refresh: bool = False):
    """Shows the chosen metrics (those present), labelled with their step when given."""
    post = {k.split("/")[-1]: f"{metrics[k]:.4g}" for k in self._show if k in (metrics or {})}
    if post and step is not None:
      post = {"at": str(step), **post}
    if post:
      self._bar.set_postfix(post, refresh=refresh)

  def update(self, n: int = 1, metrics: Mapping[str, float] | None = None,
             step: int | None = None):
    """Advances the bar by n steps; `metrics` (of step `step`, if known) go on the bar."""
    self.show_metrics(metrics, step)
    self._bar.update(n)
    self._done += n

  @property
  def rate(self) -> float | None:
    """Steps per second over this bar's lifetime (None before the first update)."""
    if not self._done:
      return None
    return self._done / max(time.perf_counter() - self._t0, 1e-9)

  @property
  def eta_s(self) -> float | None:
    """Seconds to `total` at the current rate (None before the first update)."""
    rate = self.rate
    if rate is None:
      return None
    return max(self._total - self._initial - self._done, 0) / rate

  def close(self):
    self._bar.close()
