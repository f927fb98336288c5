"""Metrics: one-step-late fetching, JSONL / TensorBoard writers, progress bar (no compilation)."""

import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.train import metrics as metrics_lib


def test_late_fetcher_returns_the_previous_step_after_the_next_dispatch():
  f = metrics_lib.LateFetcher()
  assert f.push(1, {"train/loss": jnp.float32(3.0)}) is None
  assert f.pending_step == 1
  step, host = f.push(2, {"train/loss": jnp.float32(2.5), "x/y": jnp.int32(4)})
  assert step == 1 and host == {"train/loss": 3.0}
  assert isinstance(host["train/loss"], float)
  step, host = f.flush()
  assert step == 2 and host == {"train/loss": 2.5, "x/y": 4.0}
  assert f.flush() is None and f.pending_step is None


def test_to_host_rejects_non_scalar_metrics():
  with pytest.raises(ValueError, match=r"metric 'a/b' must be a scalar.*\(2,\)"):
    metrics_lib.to_host({"a/b": jnp.zeros(2)})


def test_masked_mean_and_prefixed():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  m = rng.random((3, 5)) > 0.4
  np.testing.assert_allclose(metrics_lib.masked_mean(jnp.asarray(x), jnp.asarray(m)),
                             x.astype(np.float64)[m].mean(), rtol=1e-6)
  assert float(metrics_lib.masked_mean(jnp.asarray(x), jnp.zeros((3, 5), bool))) == 0.0
  assert metrics_lib.prefixed("eval", {"accuracy": 1, "rollout/len": 2}) == {
      "eval/accuracy": 1, "rollout/len": 2}


def test_jsonl_round_trip_keeps_non_finite_values(tmp_path):
  path = tmp_path / "m.jsonl"
  w = metrics_lib.JsonlWriter(str(path))
  w.write(1, {"train/loss": 1.5, "train/grad_norm": float("nan")})
  w.write(2, {"train/loss": float("inf")})
  w.close()
  rows = metrics_lib.read_jsonl(path)
  assert rows[0]["step"] == 1 and rows[0]["train/loss"] == 1.5
  assert math.isnan(rows[0]["train/grad_norm"]) and rows[1]["train/loss"] == math.inf
  path.write_text(path.read_text() + "not json\n")
  with pytest.raises(ValueError, match=r"m\.jsonl:3: not a JSON object"):
    metrics_lib.read_jsonl(path)


def _read_tfrecords(path):
  """Minimal TFRecord reader (length, crc, payload, crc) -> tensorboardX Event protos."""
  from tensorboardX.proto import event_pb2
  data = path.read_bytes()
  pos, events = 0, []
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    payload = data[pos + 12:pos + 12 + n]
    pos += 12 + n + 4
    events.append(event_pb2.Event.FromString(payload))
  return events


def test_metrics_writer_writes_jsonl_and_tensorboard_scalars(tmp_path):
  w = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=True)
  w.write(3, {"train/loss": 0.25, "opd/teacher_gap": 1.5})
  w.write(4, {"train/loss": 0.125})
  w.close()
  assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [3, 4]
  files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {(e.step, v.tag): v.simple_value for e in _read_tfrecords(files[0])
             for v in e.summary.value}
  assert scalars == {(3, "train/loss"): 0.25, (3, "opd/teacher_gap"): 1.5,
                     (4, "train/loss"): 0.125}


def test_progress_reports_rate_and_shows_chosen_metrics(capsys):
  p = metrics_lib.Progress(total=10, initial=2, show=("train/loss",), enabled=True)
  for _ in range(3):
    p.update(1, {"train/loss": 0.5, "other": 1.0})
  assert p.rate is not None and p.rate > 0
  assert p.eta_s == pytest.approx(5 / p.rate, rel=0.5)
  p.show_metrics({"train/loss": 0.5, "other": 1.0}, refresh=True)
  err = capsys.readouterr().err
  assert "5/10" in err and "loss=0.5" in err and "other" not in err
  # metrics fetched one step late carry the step they were computed at
  p.update(1, {"train/loss": 0.25}, step=5)
  p.close()
  assert "6/10" in capsys.readouterr().err.split("\r")[-1]
  assert p._bar.postfix == "at=5, loss=0.25"


def _reference_eval(scores_PxN, k):
  """float64 reference: per-problem values, then mean and SE = std(ddof=1) / sqrt(P) over the
  problems; pass@k by the binomial formula 1 - C(n-c, k) / C(n, k) with exact integers."""
  from math import comb
  s = np.asarray(scores_PxN, np.float64)
  n = s.shape[1]
  avg = s.mean(axis=1)
  c = (s >= 1.0).sum(axis=1)
  pas = np.asarray([1.0 - comb(n - ci, k) / comb(n, k) for ci in c], np.float64)
  se = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
  return avg.mean(), se(avg), pas.mean(), se(pas)


def test_pass_at_k_matches_the_binomial_formula_on_random_counts():
  from math import comb
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 40))
    k = int(rng.integers(1, n + 1))
    c = rng.integers(0, n + 1, size=7)
    want = np.asarray([1.0 - comb(n - ci, k) / comb(n, k) for ci in c])
    np.testing.assert_allclose(metrics_lib.pass_at_k(n, c, k), want, rtol=1e-12, atol=1e-15)
    assert metrics_lib.pass_at_k(n, int(c[0]), k) == pytest.approx(want[0], abs=1e-15)
  assert metrics_lib.pass_at_k(8, 0, 8) == 0.0 and metrics_lib.pass_at_k(8, 1, 8) == 1.0
  assert metrics_lib.pass_at_k(8, 2, 1) == pytest.approx(0.25)
  with pytest.raises(ValueError):
    metrics_lib.pass_at_k(4, 1, 5)


def test_eval_summary_matches_a_float64_reference_over_distinct_problems():
  """Random scores (binary and partial credit) split into random batches and summed, as the
  loop does across batches and processes, vs per-problem means and SEs in float64."""
  rng = np.random.default_rng(1)
  for trial in range(30):
    p, n = int(rng.integers(1, 50)), int(rng.integers(1, 9))
    k = int(rng.integers(1, n + 1))
    scores = (rng.random((p, n)) < rng.random((p, 1))).astype(np.float64)
    if trial % 3 == 0:
      scores = np.where(rng.random((p, n)) < 0.3, rng.random((p, n)), scores)  # partial credit
    cuts = np.sort(rng.integers(0, p + 1, size=3))
    stats = sum(metrics_lib.problem_stats(part, k) for part in np.split(scores, cuts))
    got = metrics_lib.eval_summary(stats, n, k)
    avg, avg_se, pas, pas_se = _reference_eval(scores, k)
    assert got["problems"] == p
    np.testing.assert_allclose([got[f"avg@{n}"], got[f"avg@{n}_se"], got[f"pass@{k}"],
                                got[f"pass@{k}_se"]], [avg, avg_se, pas, pas_se],
                               rtol=1e-9, atol=1e-12)
  assert metrics_lib.eval_summary(np.zeros(metrics_lib.EVAL_STATS), 4, 4)["avg@4"] == 0.0
