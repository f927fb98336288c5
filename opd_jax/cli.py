"""`opd-jax`: the command line. Thin: parse arguments, then call the library.

    opd-jax train    --config configs/opd.py:tiny --workdir DIR [--resume] [--config.x=y ...]
    opd-jax plan     --config configs/opd.py:qwen3_8b --devices 64 [--config.x=y ...]
    opd-jax diagnose --base A --tuned B [--snapshots S1 S2 ...] --out DIR
    opd-jax study    --config configs/study.py:tiny --workdir DIR [--redo PHASE] [--check]
    opd-jax report   --workdir DIR

`--config.a.b=value` (or `--config.a.b value`) overrides a field of the loaded config; an unknown key
is an error naming it. Multi-process runs (`launch/local_multiprocess.sh`, `launch/tpu_pod.sh`) pass
the coordinator through OPD_COORDINATOR / OPD_NUM_PROCESSES / OPD_PROCESS_ID (or the matching
flags); `jax.distributed.initialize` runs before anything touches a device.

jax is imported only inside the commands, so `plan` can re-run itself with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` when fewer than N devices exist.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import subprocess
import sys
from typing import Sequence

_REEXEC_ENV = "OPD_JAX_PLAN_REEXEC"
# OS errors that are the user's to fix (paths, permissions, disk space): one line, exit 2.
_USER_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EEXIST,
                errno.ENOTDIR, errno.EISDIR, errno.EDQUOT)
# The same kinds raised by our own checks with a message only (no errno): a missing path, ...
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                   FileExistsError)


def _is_user_os_error(e: OSError) -> bool:
  return e.errno in _USER_ERRNOS or isinstance(e, _USER_OS_ERRORS)


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.x=y` / `--config.x y` overrides from the other arguments."""
  rest, overrides = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    a = args[i]
    if a.startswith("--config."):
      if "=" in a:
        overrides.append(a[len("--config."):])
      elif i + 1 < len(args):
        overrides.append(f"{a[len('--config.'):]}={args[i + 1]}")
        i += 1
      else:
        raise SystemExit(f"opd-jax: {a} needs a value (--config.key=value)")
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def _add_distributed_flags(p: argparse.ArgumentParser):
  g = p.add_argument_group("multi-process (default: the OPD_* environment variables)")
  g.add_argument("--coordinator", default=None,
                 help="host:port of process 0, or 'auto' on a TPU pod (OPD_COORDINATOR)")
  g.add_argument("--num-processes", type=int, default=None, help="OPD_NUM_PROCESSES")
  g.add_argument("--process-id", type=int, default=None, help="OPD_PROCESS_ID")


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _mesh_shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(s) for s in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated sizes such as 1,8,1, got {text!r}") from None
  if any(n < 1 and n != -1 for n in shape) or shape.count(-1) > 1:
    raise argparse.ArgumentTypeError(
        f"sizes must be >= 1 (one may be -1: the rest of the devices), got {text!r}")
  return shape


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="opd-jax", description="On-policy distillation, SFT and RLVR in JAX, with "
      "parameter-space geometry diagnostics. Override any config field with --config.a.b=value.")
  parser.add_argument("--debug", action="store_true",
                      help="print the full traceback of user errors too")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="train with a config file preset")
  p.add_argument("--config", required=True, help="path/to/config.py:preset")
  p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --workdir")
  p.add_argument("--allow-changes", default="",
                 help="with --resume: comma-separated config fields you mean to change from the "
                 "saved run (e.g. optim.lr); any other change is refused")
  _add_distributed_flags(p)

  p = sub.add_parser("plan", help="compile the train step for an N-device mesh from abstract "
                     "shapes and print per-device memory")
  p.add_argument("--config", required=True, help="path/to/config.py:preset")
  p.add_argument("--devices", type=_positive_int, required=True, help="number of devices N")
  p.add_argument("--mesh", default=None, type=_mesh_shape,
                 help="mesh shape, e.g. 1,8,1 (default: the config's mesh.shape)")
  p.add_argument("--json", action="store_true", help="print the result as JSON")

  p = sub.add_parser("diagnose", help="parameter-space diagnostics of base -> tuned")
  p.add_argument("--base", required=True, help="HF checkpoint dir or opd_jax checkpoint path")
  p.add_argument("--tuned", required=True, help="HF checkpoint dir or opd_jax checkpoint path")
  p.add_argument("--snapshots", nargs="*", default=(), help="snapshot paths, in training order")
  p.add_argument("--out", required=True, help="output directory (metrics.json, summary.md, PNGs)")

  p = sub.add_parser("study", help="run the geometry study (resumable phases)")
  p.add_argument("--config", required=True, help="path/to/study.py:preset")
  p.add_argument("--workdir", required=True)
  p.add_argument("--redo", action="append", default=[], help="re-run this phase (repeatable)")
  p.add_argument("--check", action="store_true", help="check the claims; exit 1 if one fails")

  p = sub.add_parser("report", help="re-render the study report from its outputs")
  p.add_argument("--workdir", required=True)
  p.add_argument("--config", default=None, help="path/to/study.py:preset (optional)")
  return parser


# -- commands ---------------------------------------------------------------------------------------
def _train(args, overrides) -> int:
  from opd_jax.train import config as config_lib
  from opd_jax.train import mesh as mesh_lib

  cd = config_lib.load_config(args.config, overrides)  # config errors before any device work
  cfg = config_lib.from_config_dict(cd)
  mesh_lib.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from opd_jax.train import loop
  allow = tuple(f.strip() for f in args.allow_changes.split(",") if f.strip())
  summary = loop.run(cfg, args.workdir, resume=args.resume, allow_changes=allow)
  print(json.dumps(summary, indent=1, sort_keys=True, default=str))
  if summary.get("preempted"):
    print(f"opd-jax train: stopped by {summary['preempted']} after step {summary['step']} with a "
          f"checkpoint; continue with the same command plus --resume", file=sys.stderr)
  return 0


def _plan(args, overrides) -> int:
  from opd_jax.train import config as config_lib

  cd = config_lib.load_config(args.config, overrides)
  cfg = config_lib.from_config_dict(cd)
  mesh_shape = args.mesh

  import jax
  if len(jax.devices()) < args.devices:
    if os.environ.get(_REEXEC_ENV):
      raise SystemExit(f"opd-jax plan: asked for {args.devices} devices but only "
                       f"{len(jax.devices())} exist even with fake CPU devices")
    # XLA reads the fake-device count once, at import: re-run in a fresh process with it set.
    env = dict(os.environ)
    env[_REEXEC_ENV] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={args.devices}").strip()
    argv = [sys.executable, "-m", "opd_jax.cli"] + list(args.argv)
    return subprocess.run(argv, env=env, check=False).returncode

  from opd_jax.train import plan as plan_lib
  from opd_jax.train import run_plan
  shape, axes = mesh_shape, cfg.mesh.axes
  if shape is None:
    shape = cfg.mesh.resolved_shape(args.devices)
    if math.prod(shape) != args.devices:
      shape, axes = None, plan_lib.mesh_lib.AXES  # plan's default: FSDP over every device
      print(f"note: the config's mesh.shape={cfg.mesh.shape} does not cover {args.devices} "
            "devices; planning FSDP over all of them (choose with --mesh)")
  # Every phase of one iteration (sampler, scorers, train step) from abstract shapes: no weights,
  # no tokenizer are read.
  result = plan_lib.plan_run(run_plan.resolve(cfg, shapes_only=True), args.devices, shape,
                             axes=axes)
  if args.json:
    print(json.dumps(result, indent=1, sort_keys=True, default=str))
  return 0


def _diagnose(args, overrides) -> int:
  if overrides:
    raise SystemExit(f"opd-jax diagnose takes no --config.* overrides (got {overrides})")
  from opd_jax.geometry import report
  result = report.diagnose(args.base, args.tuned, snapshots=tuple(args.snapshots),
                           out_dir=args.out)
  print(f"diagnostics written to {args.out}")
  overall = result.get("overall") if isinstance(result, dict) else None
  if overall:
    print(json.dumps(overall, indent=1, sort_keys=True, default=str))
  return 0


def _study(args, overrides) -> int:
  from opd_jax import study  # written by the study engineer; imported only here
  from opd_jax.train import config as config_lib
  cd = config_lib.load_config(args.config, overrides)
  result = study.run(cd, args.workdir, redo=tuple(args.redo), check=args.check)
  if args.check and isinstance(result, dict) and result.get("ok") is False:
    return 1
  return 0


def _report(args, overrides) -> int:
  from opd_jax import study
  from opd_jax.train import config as config_lib
  cd = config_lib.load_config(args.config, overrides) if args.config else None
  path = study.report(args.workdir, cd)
  print(f"report written to {path}")
  return 0


_COMMANDS = {"train": _train, "plan": _plan, "diagnose": _diagnose, "study": _study,
             "report": _report}


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the `opd-jax` console script; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, overrides = _split_overrides(argv)
  args = _parser().parse_args(rest)
  args.argv = argv
  from opd_jax import host_malloc
  from opd_jax.errors import UserError
  from opd_jax.train.config import ConfigError
  try:
    host_malloc.tune()   # $OPD_JAX_HOST_MALLOC (on by default on CPU): before the first JAX op
    return _COMMANDS[args.command](args, overrides)
  except (UserError, OSError) as e:
    if args.debug or (isinstance(e, OSError) and not _is_user_os_error(e)):
      raise
    kind = "config error" if isinstance(e, ConfigError) else "error"
    message = " ".join(str(e).split()) if not isinstance(e, OSError) else (
        f"{e.strerror}: {e.filename}" if e.filename else str(e))
    print(f"opd-jax {args.command}: {kind}: {message} (--debug for the traceback)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
