"""Bytes saved by delta snapshots (`loop.snapshot_format='delta'`) on a real OPD run.

    python bench/delta_snapshots.py [--preset smoke] [--steps 20] [--every 4] [--lr LR]
                                    [--student smoke|small] [--anchor-every 10] [--workdir DIR]

Runs `configs/opd.py:<preset>` through `loop.run` with full snapshots every `--every` steps (step
0 included), then writes the same parameters again as a delta chain
(`train.snapshot_delta.save`) and reads every delta back (as `geometry.report.diagnose` would: in
order, the previous snapshot still held), checking each is bit-identical to its full snapshot.
Bytes are the files on disk of each step directory (orbax's metadata included: on the 82k-parameter
smoke model it is a visible part of every snapshot). `--student small` swaps in the 42M-parameter
`small` preset for the student (a longer run).

Per snapshot: its format in the chain, bytes full / delta, the fraction of bf16 codes unchanged
since the previous snapshot and since step 0 (`geometry.linalg.bf16_changed` semantics), encode
(delta save) and decode (delta load) seconds. Encode / decode times include the first call's
compilation (`encode_s_warm` / `decode_s_warm` leave the first delta out); `decode_cold_last_s`
rebuilds the last snapshot from its anchor with nothing held. Timings move with the machine's load
(`load_avg_1m` is printed with them); bytes do not.

Prints progress to stderr and ONE JSON object as the last line of stdout (with `cpu_model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

from opd_jax.models import config as mc
from opd_jax.train import checkpoint as ckpt
from opd_jax.train import config as C
from opd_jax.train import loop
from opd_jax.train import snapshot_delta as sd
from opd_jax.train import timing

ROOT = pathlib.Path(__file__).resolve().parent.parent


def log(msg: str):
  print(msg, file=sys.stderr, flush=True)


def dir_bytes(path) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def host(params) -> dict[str, np.ndarray]:
  names, leaves, _ = sd._flatten(params)  # noqa: SLF001
  return {n: np.asarray(x) for n, x in zip(names, leaves)}


def bf16_codes(x: np.ndarray) -> np.ndarray:
  """geometry.linalg.bf16_codes on the host: round to nearest even, -0 read as +0."""
  c = x.astype(ml_dtypes.bfloat16).view(np.uint16)
  return np.where((c & 0x7FFF) == 0, 0, c)


def unchanged_fraction(a: dict, b: dict) -> float:
  same = total = 0
  for n, x in a.items():
    if x.dtype in (np.float32, ml_dtypes.bfloat16):
      same += int(np.sum(bf16_codes(x) == bf16_codes(b[n])))
      total += x.size
  return same / total


def bit_equal(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      a[n].dtype == b[n].dtype and np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8))
      for n in a)


def main(argv=None) -> int:
  from opd_jax import host_malloc
  host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="smoke", help="configs/opd.py preset")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--every", type=int, default=4, help="a snapshot every this many steps")
  p.add_argument("--lr", type=float, default=None, help="override optim.lr")
  p.add_argument("--student", choices=("smoke", "small"), default="smoke")
  p.add_argument("--anchor-every", type=int, default=sd.ANCHOR_EVERY)
  p.add_argument("--workdir", default=None, help="kept when given (else a temporary directory)")
  args = p.parse_args(argv)
  log(f"cpu: {timing.cpu_model()}")
  snaps = tuple(range(0, args.steps + 1, args.every))
  if snaps[-1] != args.steps:
    snaps += (args.steps,)
  over = [f"loop.steps={args.steps}", f"loop.snapshot_steps={snaps}", "loop.checkpoint_every=0",
          "loop.eval_every=0", "loop.progress=false", "loop.tensorboard=false",
          "loop.snapshot_format=full"]
  if args.lr is not None:
    over.append(f"optim.lr={args.lr}")
  cfg = C.from_config_dict(C.load_config(str(ROOT / "configs" / "opd.py") + f":{args.preset}",
                                         over))
  if args.student == "small":
    cfg = cfg.replace(student=dataclasses.replace(
        cfg.student, model=mc.small(vocab_size=cfg.student.model.vocab_size)))
  tmp = None if args.workdir else tempfile.TemporaryDirectory()
  work = pathlib.Path(args.workdir or tmp.name)
  t0 = time.time()
  summary = loop.run(cfg, work / "run")
  run_s = time.time() - t0
  full = {int(k): v for k, v in summary["snapshots"].items()}
  log(f"run: {summary['step']} steps in {run_s:.1f} s; snapshots {sorted(full)}")

  delta_root = work / "delta"
  sd.clear_caches()
  rows, originals, first = [], {}, None
  for step in sorted(full):
    params, model_cfg = ckpt.load_params_and_config(full[step])
    originals[step] = host(params)
    t = time.perf_counter()
    path = sd.save(delta_root, step, params, model_cfg, anchor_every=args.anchor_every)
    encode_s = time.perf_counter() - t
    s = sd.summary(path)
    row = {"step": step, "format": s["format"], "bytes_full": dir_bytes(full[step]),
           "bytes_delta": dir_bytes(path), "encode_s": encode_s,
           "bf16_unchanged_vs_prev": (unchanged_fraction(originals[step], originals[prev])
                                      if rows else None),
           "bf16_unchanged_vs_step0": (unchanged_fraction(originals[step], originals[first])
                                       if rows else None)}
    if s["format"] == "delta":  # the stored change agrees with the host reference
      assert abs(1 - s["bf16_changed"] / s["n"] - row["bf16_unchanged_vs_prev"]) < 1e-12
    first = step if first is None else first
    prev = step
    rows.append(row)
    log(f"step {step}: {row['format']}, {row['bytes_full']} -> {row['bytes_delta']} bytes, "
        f"encode {encode_s:.2f} s, bf16 unchanged vs prev {row['bf16_unchanged_vs_prev']}")

  # Decode as trajectory diagnostics read the snapshots: in order, the previous one still held.
  sd.clear_caches()
  held, exact = None, True
  for row in rows:
    t = time.perf_counter()
    loaded = ckpt.load_params(delta_root / str(row["step"]))
    jax.block_until_ready(loaded)
    row["decode_s"] = time.perf_counter() - t
    exact &= bit_equal(host(loaded), originals[row["step"]])
    held = loaded  # noqa: F841 - kept alive: the next load continues from it
  sd.clear_caches()
  held = None
  t = time.perf_counter()
  jax.block_until_ready(ckpt.load_params(delta_root / str(rows[-1]["step"])))
  decode_cold_last_s = time.perf_counter() - t

  deltas = [r for r in rows if r["format"] == "delta"]
  bytes_full = sum(r["bytes_full"] for r in rows)
  bytes_delta = sum(r["bytes_delta"] for r in rows)
  n_params = sum(x.size for x in originals[rows[0]["step"]].values())
  result = {
      "bench": "delta_snapshots", "preset": args.preset, "student": args.student,
      "n_params": int(n_params), "steps": summary["step"], "snapshot_steps": list(snaps),
      "lr": cfg.optim.lr, "anchor_every": args.anchor_every,
      "bytes_full": bytes_full, "bytes_delta": bytes_delta,
      "size_ratio": bytes_delta / bytes_full,
      # the delta snapshots alone against the full snapshots they replace (anchors excluded)
      "size_ratio_deltas_only": (sum(r["bytes_delta"] for r in deltas)
                                 / sum(r["bytes_full"] for r in deltas)) if deltas else None,
      "exact": bool(exact),
      "encode_s": sum(r["encode_s"] for r in deltas),
      "decode_s": sum(r["decode_s"] for r in deltas),
      "encode_s_warm": (sum(r["encode_s"] for r in deltas[1:]) / len(deltas[1:])
                        if len(deltas) > 1 else None),
      "decode_s_warm": (sum(r["decode_s"] for r in deltas[1:]) / len(deltas[1:])
                        if len(deltas) > 1 else None),
      "decode_cold_last_s": decode_cold_last_s,
      "per_snapshot": rows, "run_s": run_s, "load_avg_1m": os.getloadavg()[0],
      "cpu_model": timing.cpu_model(),
  }
  if tmp is not None:
    tmp.cleanup()
  print(json.dumps(result))
  return 0 if exact else 1


if __name__ == "__main__":
  sys.exit(main())
