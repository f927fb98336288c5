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
