"""Checkpoints (orbax): rolling train-state checkpoints for resume, and parameter snapshots.

Layouts (each step directory is written to a temporary name and renamed when complete, so a
crash never leaves a half-written checkpoint that looks valid)::

    <checkpoint root>/<step>/state/   the TrainState (params, opt_state, rng, step)  (StandardSave)
    <checkpoint root>/<step>/meta/    JSON: data-iterator state, config, step, model_config
    <snapshot root>/<step>/params/    the parameters only                            (StandardSave)
    <snapshot root>/<step>/meta/      JSON: step, model_config
    <snapshot root>/<step>/delta/     a delta snapshot instead of params/: the exact change from
                                      the previous snapshot (`train.snapshot_delta`)

Rolling checkpoints (`Checkpointer`) are asynchronous and keep the newest `keep`; snapshots
(`save_snapshot`, for trajectory diagnostics) are kept forever and written synchronously. Every
process of a multi-process run calls these functions (orbax writes collectively: each process its
own shards, the primary the metadata).

`load_params(path)` accepts a snapshot step dir, a checkpoint step dir, or either root (then the
latest step), and returns the parameters as single-device arrays (or with given shardings);
`load_params_and_config` also returns the `ModelConfig` recorded in the meta JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import pathlib
import warnings
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from opd_jax.errors import UserError
from opd_jax.models.config import ModelConfig
from opd_jax.train.state import TrainState

STATE, PARAMS, META = "state", "params", "meta"
DELTA = "delta"  # a delta snapshot's item (train.snapshot_delta)
SNAPSHOT_FORMATS = ("full", "delta")
VALUE_HEAD = "value_head"
FROZEN = "frozen"  # the frozen base of an adapter run (TrainState.frozen)


class _QuietDiskFull(logging.Filter):
  """Orbax logs a traceback from its writer threads when a write fails; a full disk is re-raised
  as one `DiskFullError` line by the caller, so its tracebacks are not shown."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (_is_disk_full(exc) or any(t in record.getMessage() for t in _DISK_FULL_TEXT))


class _QuietMissingMetadata(logging.Filter):
  """Orbax warns 'Metadata file does not exist' on every load of a checkpoint written without its
  optional metadata file (ours): expected, so not shown."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_QuietMissingMetadata())
logging.getLogger("absl").addFilter(_QuietDiskFull())


def as_path(path) -> epath.Path:
  """A run / checkpoint location as an `epath.Path`. A path with a scheme (gs://bucket/run) is
  kept exactly as given (`epath.Path.absolute()` would turn it into a local './gs:/bucket/run');
  a local path is made absolute."""
  text = os.fspath(path) if not isinstance(path, str) else path
  if "://" in str(text):
    return epath.Path(str(text))
  return epath.Path(os.path.abspath(text))


def model_config_to_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def model_config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(d) - fields
  if unknown:
    raise ValueError(f"model_config in checkpoint meta has unknown fields {sorted(unknown)}")
  return ModelConfig(**d)


# Orbax names a step's directory `<step>.orbax-checkpoint-tmp-<n>` while it is being written.
_TMP_MARK = ".orbax-checkpoint-tmp"


def _remove_unfinished(root: epath.Path) -> None:
  """Removes the temporary step directories a kill mid-write left under `root`, before any
  manager reads it. Orbax's own cleanup runs in a background thread that `delete` does not wait
  for, and `delete(step)` also removes `step`'s temporary directories: the two raced (a
  FileNotFoundError from a resumed snapshot write). Here it is synchronous: the primary process
  removes, then every process waits for it."""
  if jax.process_index() == 0 and root.is_dir():
    for p in root.iterdir():
      if _TMP_MARK not in p.name:
        continue
      if p.is_dir():
        p.rmtree(missing_ok=True)
      else:
        p.unlink(missing_ok=True)
  from opd_jax.train import mesh as mesh_lib  # noqa: PLC0415
  mesh_lib.sync_processes(f"remove_unfinished_{root}")


def _host_barriers_for_orbax() -> None:
  """Makes orbax's barriers host-only (the coordination service) in a multi-process run.

  By default orbax synchronises processes with `multihost_utils.sync_global_devices`, a device
  all-reduce, and an async save issues it from orbax's writer thread whenever that thread gets
  there, while the main thread keeps dispatching steps with collectives of their own. Nothing
  then makes every process launch the two in the same order, and gloo (CPU) pairs collectives by
  launch order: a deadlock waiting to happen. Orbax's own flag routes its barriers through the
  coordination service instead. Set as absl does for a flag given on the command line, so an
  explicit `--experimental_orbax_use_distributed_barrier` parsed later still wins."""
  if jax.process_count() == 1:
    return
  from absl import flags  # noqa: PLC0415
  name = "experimental_orbax_use_distributed_barrier"
  if name in flags.FLAGS and not flags.FLAGS[name].present:
    flags.FLAGS[name].value = True
    flags.FLAGS[name].present = 1


def open_manager(root, item_names: tuple[str, ...], *, keep: int | None = None,
                 async_save: bool = False, read_only: bool = False) -> ocp.CheckpointManager:
  """An orbax manager over `root` (created if missing) with `root`'s unfinished writes removed.

  Orbax writes each step into a temporary directory and renames it when complete (atomic on a
  local filesystem; a commit marker on object stores): a kill mid-write leaves only a temporary
  directory. Every process calls this (it synchronises). `read_only`: another run's
  checkpoints (a branch's source, which may still be training): nothing is created, removed or
  written."""
  root = as_path(root)
  _host_barriers_for_orbax()
  if not read_only:
    _remove_unfinished(root)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=not read_only, cleanup_tmp_directories=False,
                                         read_only=read_only)
  return ocp.CheckpointManager(root, options=options, item_names=tuple(item_names))


# How a full disk (or quota) reaches us: an OSError from Python code, or tensorstore's
# RESOURCE_EXHAUSTED ValueError from orbax's writer threads, whose text carries the OS error.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded",
                   *(f"os_error_code='{n}'" for n in _DISK_FULL_ERRNOS))


class DiskFullError(UserError):
  """A checkpoint or snapshot write ran out of disk space (the previous checkpoint is intact)."""

  errno = errno.ENOSPC


def _is_disk_full(e: BaseException | None) -> bool:
  seen = 0
  while e is not None and seen < 8:   # the error itself or what it was raised from
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
      return True
    if any(t in str(e) for t in _DISK_FULL_TEXT):
      return True
    e, seen = e.__cause__ or e.__context__, seen + 1
  return False


@contextlib.contextmanager
def _disk_full_is_a_user_error(directory, what: str):
  """Turns a full disk during a write into one line naming the directory (orbax's own error is a
  150-line traceback from its writer thread). The write's temporary directory is left for the
  next start to remove; the checkpoints before it are complete, so `--resume` continues."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
    if not _is_disk_full(e):
      raise
    raise DiskFullError(f"no space left on device while writing the {what} in "
                        f"{directory}; free space (or pass another --workdir) and run again with "
                        "--resume: it continues from the last complete checkpoint") from e


class CheckpointError(UserError, ValueError):
  """No checkpoint of a run could be read (a user-facing error: names the directory)."""


class CorruptCheckpointWarning(UserWarning):
  """The latest checkpoint could not be read; an earlier one was restored."""


def _processes_that_failed(failed_here: bool) -> list[int]:
  """The indices of the processes that report a failure (all of them learn every process's
  flag: a tiny all-gather, an explicit transfer). One process: its own flag."""
  if jax.process_count() == 1:
    return [0] if failed_here else []
  from jax.experimental import multihost_utils
  with jax.transfer_guard("allow"):
    flags = np.asarray(multihost_utils.process_allgather(np.asarray([failed_here], np.int32)))
  return [int(p) for p in np.flatnonzero(flags.reshape(-1))]


class Checkpointer:
  """Rolling train-state checkpoints: orbax CheckpointManager (async, keep N).

  Usage::

      ckpt = Checkpointer(workdir / "checkpoints", keep=3, model_cfg=cfg)
      ckpt.save(step, state, {"data": iterator_state, "config": config_dict})
      restored = ckpt.restore_latest(abstract_state)   # None when there is no checkpoint
      ckpt.close()                                      # waits for pending writes

  `abstract_state` is a TrainState of `jax.ShapeDtypeStruct`s carrying the target shardings
  (`train.mesh.abstract_state(tx, abstract_params, shardings)`); restoring onto a different mesh
  than the one that saved works.
  """

  def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True,
               model_cfg: ModelConfig | None = None, read_only: bool = False):
    self.directory = as_path(directory)
    self.model_cfg = model_cfg
    self.manager = open_manager(self.directory, (STATE, META), keep=keep, async_save=async_save,
                                read_only=read_only)

  def save(self, step: int, state: TrainState, meta: Mapping[str, Any] | None = None, *,
           force: bool = True) -> bool:
    """Starts writing checkpoint `step` (async); returns whether a save was started.

    `meta` must be JSON-serialisable (data-iterator state, config, ...); `step` and, when the
    Checkpointer knows it, `model_config` are added.
    """
    meta = dict(meta or {})
    meta.setdefault("step", int(step))
    if self.model_cfg is not None:
      meta.setdefault("model_config", model_config_to_dict(self.model_cfg))
    try:
      json.dumps(meta)
    except TypeError as e:
      raise ValueError(f"checkpoint meta for step {step} is not JSON-serialisable: {e}") from e
    with _disk_full_is_a_user_error(self.directory, f"checkpoints (at step {step})"):
      if int(step) in self.manager.all_steps():
        # Idempotent: a step redone after a resume rewrites its checkpoint (same values).
        self.manager.wait_until_finished()
        self.manager.delete(int(step))
      return self.manager.save(int(step), args=ocp.args.Composite(
          **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}), force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict]:
    """(state, meta) of checkpoint `step`, placed as `abstract_state`'s shardings say."""
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}))
    except Exception:
      if jax.process_count() > 1:
        # Orbax's restore ends in a cross-process barrier ('Checkpointer:restore'): a process
        # whose read failed (each reads its own shards) still takes its part in it, or the others
        # would wait there forever; `restore_latest` then has them all fall back together.
        # The key orbax builds (`Checkpointer.restore`), with its checkpointer's key prefix.
        prefix = getattr(getattr(self.manager, "_checkpointer", None),
                         "_barrier_sync_key_prefix", None)
        ocp.multihost.sync_global_processes(
            ocp.multihost.unique_barrier_key("Checkpointer:restore", prefix=prefix))
      raise
    return out[STATE], dict(out[META])

  def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict] | None:
    """(state, meta) of the newest readable checkpoint, or None when there is none.

    A checkpoint that cannot be read (corrupted or truncated files) is skipped with a
    `CorruptCheckpointWarning` naming it, and the one before it is tried. With several
    processes they agree on every attempt (each reads its own shards: a file only one process
    reads may be the broken one), so all of them fall back together.
    """
    self.manager.wait_until_finished()
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        out, why = self.restore(step, abstract_state), None
      except Exception as e:  # noqa: BLE001 - any read failure means: fall back
        out, why = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        cause = e
      failed = _processes_that_failed(why is not None)
      if not failed:
        return out
      if why is None:
        why = f"unreadable on process(es) {', '.join(map(str, failed))}"
        cause = None
      if i + 1 == len(steps):
        raise CheckpointError(f"no readable checkpoint in {self.directory}: step {step} "
                              f"failed with {why}") from cause
      warnings.warn(f"checkpoint {self.directory / str(step)} is unreadable ({why}); falling "
                    f"back to step {steps[i + 1]}", CorruptCheckpointWarning, stacklevel=2)
    return None

  def latest_readable_meta(self) -> dict | None:
    """The metadata of the newest checkpoint whose metadata reads, or None when there is none:
    the one `restore_latest` falls back to where a newer one's metadata is unreadable (warned
    about there)."""
    self.manager.wait_until_finished()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore_meta(step)
      except Exception:  # noqa: BLE001 - any read failure means: fall back
        continue
    return None

  def restore_meta(self, step: int | None = None) -> dict | None:
    step = self.manager.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(int(step), args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return dict(out[META])

  def wait_until_finished(self):
    with _disk_full_is_a_user_error(self.directory, "checkpoints"):
      self.manager.wait_until_finished()

  def close(self):
    """Waits for pending writes and releases the manager."""
    try:
      self.wait_until_finished()
    finally:
      self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# -- parameter snapshots --------------------------------------------------------------------------
def save_snapshot(directory, step: int, params, model_cfg: ModelConfig | None = None,
                  meta: Mapping[str, Any] | None = None, *, value_head=None,
                  snapshot_format: str = "full") -> epath.Path:
  """Writes the parameters of `step` to `<directory>/<step>/` (kept forever; blocking) and
  returns that path. A learned value head (GAE-OPD) is written apart from the policy, as its own
  item `value_head/` (`load_value_head`): geometry and export read the policy alone.

  `snapshot_format='delta'` stores the exact change from the previous snapshot in `directory`
  (`train.snapshot_delta.save`); `load_params` reads either kind."""
  if snapshot_format not in SNAPSHOT_FORMATS:
    raise ValueError(f"snapshot_format={snapshot_format!r}: expected one of {SNAPSHOT_FORMATS}")
  if snapshot_format == "delta":
    from opd_jax.train import snapshot_delta  # noqa: PLC0415 - it imports this module
    return snapshot_delta.save(directory, step, params, model_cfg, meta, value_head=value_head)
  root = as_path(directory)
  if (root / str(int(step))).is_dir():  # a rewrite: keep delta snapshots based on it readable
    from opd_jax.train import snapshot_delta  # noqa: PLC0415
    snapshot_delta.before_replace(root, step, params)
  info = dict(meta or {})
  info["step"] = int(step)
  if model_cfg is not None:
    info["model_config"] = model_config_to_dict(model_cfg)
  items = {PARAMS: ocp.args.StandardSave(params), META: ocp.args.JsonSave(info)}
  if value_head is not None:
    items[VALUE_HEAD] = ocp.args.StandardSave(value_head)
  manager = open_manager(root, tuple(items))
  try:
    with _disk_full_is_a_user_error(root, f"parameter snapshot of step {step}"):
      if int(step) in manager.all_steps():
        manager.delete(int(step))  # idempotent: a resumed run rewrites the snapshot it redoes
      manager.save(int(step), args=ocp.args.Composite(**items), force=True)
      manager.wait_until_finished()
  finally:
    manager.close()
  return root / str(int(step))


def is_snapshot_dir(path) -> bool:
  """Whether `path` is a parameter snapshot step directory (full: params/; delta: delta/)."""
  path = epath.Path(path)
  return (path / PARAMS).is_dir() or (path / DELTA).is_dir()


def _is_step_dir(path: epath.Path) -> bool:
  return is_snapshot_dir(path) or (path / STATE).is_dir()


def _latest_step_dir(root: epath.Path) -> epath.Path | None:
  steps = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()
           and _is_step_dir(p)]
  return root / str(max(steps)) if steps else None


def resolve_step_dir(path) -> epath.Path:
  """A snapshot / checkpoint step directory from a step dir or a root (its latest step)."""
  p = as_path(path)
  if not p.exists():
    raise FileNotFoundError(f"no checkpoint at {str(p)!r}")
  if _is_step_dir(p):
    return p
  latest = _latest_step_dir(p) if p.is_dir() else None
  if latest is None:
    raise CheckpointError(f"{str(p)!r} is neither a snapshot/checkpoint step directory (with a "
                     f"'{PARAMS}/' or '{STATE}/' subdirectory) nor a root holding numbered step "
                     "directories")
  return latest


def _read_meta(step_dir: epath.Path) -> dict:
  meta_dir = step_dir / META
  if not meta_dir.is_dir():
    return {}
  files = [f for f in meta_dir.iterdir() if f.is_file() and not f.name.startswith(".")]
  for f in files:
    try:
      return dict(json.loads(f.read_text()))
    except (ValueError, UnicodeDecodeError):
      continue
  return {}


def _abstract_from_metadata(item_dir: epath.Path, shardings=None):
  """Target ShapeDtypeStructs for every array under `item_dir` (single device by default)."""
  meta = ocp.PyTreeCheckpointer().metadata(item_dir)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(m, s=None):
    return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s if s is not None else default)

  if shardings is None:
    return jax.tree.map(one, tree)
  return jax.tree.map(one, tree, shardings)


def load_params_and_config(path, *, shardings=None) -> tuple[dict, ModelConfig | None]:
  """(params, ModelConfig or None) from a snapshot / checkpoint step dir or root.

  Args:
    path: `<snapshot root>/<step>`, `<checkpoint root>/<step>`, or either root (latest step).
    shardings: optional tree of shardings for the params (default: the first local device).
  """
  step_dir = epath.Path(resolve_step_dir(path))
  meta = _read_meta(step_dir)
  cfg = model_config_from_dict(meta["model_config"]) if "model_config" in meta else None
  if (step_dir / DELTA).is_dir():
    from opd_jax.train import snapshot_delta  # noqa: PLC0415
    params = snapshot_delta.load(step_dir, shardings=shardings)
  elif (step_dir / PARAMS).is_dir():
    item = step_dir / PARAMS
    target = _abstract_from_metadata(item, shardings)
    params = ocp.StandardCheckpointer().restore(item, target)
  else:
    item = step_dir / STATE
    meta_tree = ocp.PyTreeCheckpointer().metadata(item)
    tree = getattr(meta_tree, "item_metadata", meta_tree)
    tree = getattr(tree, "tree", tree)
    if PARAMS not in tree:
      raise ValueError(f"checkpoint {str(item)!r} holds no '{PARAMS}' entry (keys: {list(tree)})")
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract_of(sub):
      return jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=default), sub)

    # An adapter run (LoRA / PiSSA) saves the adapters as params and the base as 'frozen': the
    # policy is their merge (scale alpha / r from the run config in the checkpoint's meta).
    adapters = bool(jax.tree.leaves(tree.get(FROZEN)))  # (a non-adapter state saves None)
    items = {PARAMS: abstract_of(tree[PARAMS])}
    if adapters:
      items[FROZEN] = abstract_of(tree[FROZEN])
    elif shardings is not None:
      items[PARAMS] = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), items[PARAMS],
          shardings)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding,
                                                               global_shape=a.shape,
                                                               dtype=a.dtype), items)
    out = ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(
        item=items, restore_args=restore_args, partial_restore=True))
    params = out[PARAMS]
    if adapters:
      from opd_jax.models import lora  # noqa: PLC0415
      lora_cfg = (meta.get("config") or {}).get("lora")
      if not lora_cfg or not lora_cfg.get("rank"):
        raise CheckpointError(f"checkpoint {str(item)!r} holds adapters but its meta has no "
                              "config.lora (rank, alpha) to merge them with")
      params = lora.merge(out[FROZEN], params, float(lora_cfg["alpha"]) / int(lora_cfg["rank"]))
      if shardings is not None:
        params = jax.device_put(params, shardings)
  return params, cfg


def load_value_head(path) -> dict | None:
  """The learned value head saved beside a snapshot's policy (None when the run had none)."""
  item = resolve_step_dir(path) / VALUE_HEAD
  if not item.is_dir():
    return None
  return ocp.StandardCheckpointer().restore(item, _abstract_from_metadata(item))


def load_params(path, *, shardings=None) -> dict:
  """The parameters from a snapshot / checkpoint step dir or root (see `load_params_and_config`)."""
  return load_params_and_config(path, shardings=shardings)[0]


def export_adapters(path, out_dir, *, tokenizer=None, overwrite: bool = False) -> dict[str, str]:
  """Exports an adapter run's checkpoint (LoRA / PiSSA: `TrainState.params` the adapters,
  `TrainState.frozen` the base) for Hugging Face and PEFT.

  Writes `<out_dir>/base` (the frozen base as a transformers checkpoint: for PiSSA the residual
  base the adapter belongs to), `<out_dir>/adapter` (`adapter_config.json` +
  `adapter_model.safetensors`: `peft.PeftModel.from_pretrained(<base model>, <adapter>)`), and
  `<out_dir>/merged` (base + adapters as one transformers checkpoint). Returns {'base', 'adapter',
  'merged'} paths. Single process (the arrays are restored onto the first local device).
  """
  from opd_jax.models import hf, lora  # noqa: PLC0415
  step_dir = epath.Path(resolve_step_dir(path))
  meta = _read_meta(step_dir)
  run = (meta.get("config") or {}).get("lora") or {}
  if not (step_dir / STATE).is_dir() or not run.get("rank"):
    raise CheckpointError(f"{str(step_dir)!r} is not a checkpoint of an adapter run (lora.rank > "
                          "0); export a full-parameter run with models.hf.save")
  if "model_config" not in meta:
    raise CheckpointError(f"{str(step_dir)!r}: its meta has no model_config")
  cfg = model_config_from_dict(meta["model_config"])
  lora_cfg = lora.LoraConfig(**run)
  tree = ocp.PyTreeCheckpointer().metadata(step_dir / STATE)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  items = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                          sharding=default), tree[k])
           for k in (PARAMS, FROZEN)}
  out = ocp.PyTreeCheckpointer().restore(step_dir / STATE, args=ocp.args.PyTreeRestore(
      item=items, restore_args=jax.tree.map(
          lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                         dtype=a.dtype), items), partial_restore=True))
  adapters, base = out[PARAMS], out[FROZEN]
  root = pathlib.Path(str(out_dir))
  written = {
      "base": hf.save(root / "base", cfg, base, tokenizer, overwrite=overwrite),
      "adapter": hf.save_peft_adapter(root / "adapter", cfg, adapters, lora_cfg,
                                      overwrite=overwrite),
      "merged": hf.save(root / "merged", cfg, lora.merge(base, adapters, lora_cfg.scale),
                        tokenizer, overwrite=overwrite),
  }
  return {k: str(v) for k, v in written.items()}
