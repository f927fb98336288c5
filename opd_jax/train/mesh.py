"""Device mesh, shardings for parameters / optimizer state / batches, and multi-process set-up.

The mesh has axes ('data', 'fsdp', 'tensor') by default. Every parameter axis carries a logical
name (`transformer.logical_axes`); `rules` (config) map logical names to mesh axes
(`opd_jax.models.sharding.DEFAULT_RULES`: batch over data x fsdp, parameters FSDP-sharded on
`embed`, tensor-parallel on heads / mlp / vocab). A dimension whose size is not divisible by its
mesh axes is replicated instead (e.g. 2 kv heads on a 4-way tensor axis): the layout degrades, the
program stays valid.

Multi-process: call `maybe_initialize_distributed()` first thing (coordinator from arguments or the
environment: OPD_COORDINATOR, OPD_NUM_PROCESSES, OPD_PROCESS_ID; OPD_COORDINATOR=auto lets
`jax.distributed.initialize()` detect a TPU pod), then build global batches from each process's
rows with `global_batch`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax.errors import UserError
from opd_jax.models import transformer
from opd_jax.models.config import ModelConfig
from opd_jax.models.sharding import (DEFAULT_RULES, Rules, fit_spec, logical_to_spec,
                                     validate_rules)
from opd_jax.train.state import TrainState, create_state

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape, axis names and logical-axis rules.

  Attributes:
    shape: devices per axis; at most one entry may be -1 (all remaining devices). The default
      (1, 1, 1) is one device: set e.g. (1, -1, 1) for FSDP over every device.
    axes: mesh axis names, one per shape entry.
    rules: logical -> mesh axis rules (`opd_jax.models.sharding`).
  """

  shape: tuple[int, ...] = (1, 1, 1)
  axes: tuple[str, ...] = AXES
  rules: Rules = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
    object.__setattr__(self, "axes", tuple(self.axes))
    object.__setattr__(self, "rules", validate_rules(self.rules))
    if len(self.shape) != len(self.axes):
      raise ValueError(f"MeshConfig.shape={self.shape} has {len(self.shape)} entries but "
                       f"MeshConfig.axes={self.axes} has {len(self.axes)}")
    if sum(s == -1 for s in self.shape) > 1 or any(s == 0 or s < -1 for s in self.shape):
      raise ValueError(f"MeshConfig.shape={self.shape}: entries must be positive, with at most "
                       "one -1 (all remaining devices)")
    if len(set(self.axes)) != len(self.axes):
      raise ValueError(f"MeshConfig.axes={self.axes}: duplicate axis name")

  def resolved_shape(self, n_devices: int) -> tuple[int, ...]:
    """`shape` with -1 replaced so that the product is `n_devices`."""
    known = math.prod(s for s in self.shape if s != -1)
    if -1 not in self.shape:
      return self.shape
    if n_devices % known:
      raise ValueError(f"MeshConfig.shape={self.shape}: {n_devices} devices are not divisible by "
                       f"the fixed axes' product {known}")
    return tuple(n_devices // known if s == -1 else s for s in self.shape)


class MeshError(UserError, ValueError):
  """A mesh that the devices at hand cannot form (names the shape and the device count)."""


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with Auto axis types (NNX models fail under the default Explicit types).

  Without `devices`, uses all devices when the shape has a -1, else the first prod(shape) devices
  (single process; a multi-process mesh must span every device).
  """
  all_devices = list(jax.devices() if devices is None else devices)
  shape = cfg.resolved_shape(len(all_devices))
  n = math.prod(shape)
  if n > len(all_devices):
    raise MeshError(
        f"mesh.shape={cfg.shape} needs {n} devices but only {len(all_devices)} exist. On "
        "CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported.")
  if n < len(all_devices) and jax.process_count() > 1 and devices is None:
    raise MeshError(f"mesh.shape={cfg.shape} covers {n} of {len(all_devices)} devices; a "
                     "multi-process mesh must use every device")
  return jax.make_mesh(shape, cfg.axes, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=all_devices[:n])


# -- shardings ------------------------------------------------------------------------------------
def logical_shardings(abstract_tree, logical_tree, mesh: jax.sharding.Mesh,
                      rules: Iterable[Sequence] = DEFAULT_RULES):
  """NamedShardings for a tree of arrays given the matching tree of logical-name tuples."""
  rules = validate_rules(rules)

  def one(x, names):
    spec = logical_to_spec(names, rules, mesh.axis_names)
    return NamedSharding(mesh, fit_spec(x.shape, spec, mesh))

  return jax.tree.map(one, abstract_tree, logical_tree)


def param_shardings(model_cfg: ModelConfig, mesh: jax.sharding.Mesh,
                    rules: Iterable[Sequence] = DEFAULT_RULES) -> dict:
  """NamedShardings of the parameters of `model_cfg` (same structure as the params dict)."""
  abstract = transformer.abstract_params(model_cfg)
  logical = transformer.logical_axes(model_cfg)
  return logical_shardings(abstract, logical, mesh, rules)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_key(path) -> tuple:
  return tuple(str(k) for k in path)


def opt_state_shardings(tx: optax.GradientTransformation, params_shardings, abstract_params):
  """Shardings of `tx.init(params)`, derived from abstract shapes (nothing allocated).

  An optimizer-state leaf whose tree path ends with a parameter's path mirrors that parameter:
  with the same shape (Adam's mu / nu, momentum traces, ...) it gets the parameter's sharding;
  with the same rank but other sizes (e.g. subspace bases [L, in, k] of a kernel [L, in, out]) it
  keeps the parameter's mesh axes on the dimensions whose sizes match and is replicated on the
  others. Everything else (counts, injected hyperparameters, ...) is replicated.
  """
  leaves = jax.tree_util.tree_leaves_with_path(params_shardings)
  if not leaves:
    raise ValueError("opt_state_shardings: params_shardings is empty")
  mesh = leaves[0][1].mesh
  by_path = {_path_key(p): s for p, s in leaves}
  shapes = {_path_key(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def one(path, x):
    key = _path_key(path)
    for start in range(len(key)):
      suffix = key[start:]
      if suffix not in by_path:
        continue
      shape, sharding = tuple(shapes[suffix]), by_path[suffix]
      if shape == tuple(x.shape):
        return sharding
      if len(shape) == len(x.shape):
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        return NamedSharding(mesh, P(*(a if n == m else None
                                       for a, n, m in zip(spec, shape, x.shape))))
      break
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def state_shardings(tx: optax.GradientTransformation, params_shardings, abstract_params, *,
                    value: Any = None, token_state: Any = None, frozen_shardings: Any = None
                    ) -> TrainState:
  """A TrainState of shardings: params as given, optimizer state mirroring them, the rest
  (step, rng, the value head and the token-transform state: small) replicated. `value` /
  `token_state` are the recipe's extra fields (arrays or abstract), None when unused. With
  adapters, `params_shardings` / `abstract_params` are the adapters' (`adapter_shardings`,
  `lora.abstract_adapters`) and `frozen_shardings` the base parameters' (`param_shardings`)."""
  leaves = jax.tree.leaves(params_shardings)
  rep = replicated(leaves[0].mesh)
  return TrainState(step=rep, params=params_shardings,
                    opt_state=opt_state_shardings(tx, params_shardings, abstract_params), rng=rep,
                    value=jax.tree.map(lambda _: rep, value),
                    token_state=jax.tree.map(lambda _: rep, token_state),
                    frozen=frozen_shardings)


def abstract_state(tx: optax.GradientTransformation, abstract_params, shardings: TrainState | None
                   = None, *, value: Any = None, token_state: Any = None, frozen: Any = None
                   ) -> TrainState:
  """ShapeDtypeStructs of the TrainState (with `shardings` attached when given): the target for
  `checkpoint.restore_latest` and for `plan`. `value` / `token_state` as in `state_shardings`;
  `frozen` the abstract base parameters of an adapter run (else None)."""
  abstract = jax.eval_shape(
      lambda p, v, t, f: create_state(p, tx, 0, value=v, token_state=t, frozen=f),
      abstract_params, value, token_state, frozen)
  if shardings is None:
    return abstract
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules: Iterable[Sequence] = DEFAULT_RULES
                   ) -> NamedSharding:
  """Leading (batch) dimension over the `batch` rule's axes (('data', 'fsdp')); rest replicated."""
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh.axis_names)
  return NamedSharding(mesh, spec)


def batch_shardings(batch, mesh: jax.sharding.Mesh, rules: Iterable[Sequence] = DEFAULT_RULES):
  """`batch_sharding` for every array of a batch pytree (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: batch_sharding(mesh, len(x.shape), rules), batch)


def init_sharded_params(model_cfg: ModelConfig, mesh: jax.sharding.Mesh,
                        rules: Iterable[Sequence] = DEFAULT_RULES, seed: int = 0):
  """(graphdef, params) with params created directly in their sharded layout (nothing is
  materialised replicated first)."""
  shardings = param_shardings(model_cfg, mesh, rules)
  params = jax.jit(lambda: transformer.init(model_cfg, seed)[1], out_shardings=shardings)()
  return transformer.graphdef_for(model_cfg), params


def init_sharded_state(params, tx: optax.GradientTransformation, seed: int,
                       shardings: TrainState, *, value: Any = None, token_state: Any = None,
                       frozen: Any = None) -> TrainState:
  """`create_state` under jit with `out_shardings`: the optimizer state is created sharded.

  `params` should already carry `shardings.params` (e.g. from `init_sharded_params`, `hf.load(...,
  mesh=)` or `reshard`); they are copied, not donated. `value` / `token_state` (the recipe's extra
  fields, small host or device pytrees) are placed replicated. `frozen`: the base parameters of
  an adapter run (`init_adapters`), laid out as `shardings.frozen`.
  """
  fn = jax.jit(lambda p, v, t, f: create_state(p, tx, seed, value=v, token_state=t, frozen=f),
               in_shardings=(shardings.params, shardings.value, shardings.token_state,
                             shardings.frozen),
               out_shardings=shardings)
  return fn(params, jax.device_put(value, shardings.value),
            jax.device_put(token_state, shardings.token_state), frozen)


# -- adapters (LoRA / PiSSA, `models.lora`) -------------------------------------------------------
def adapter_shardings(model_cfg: ModelConfig, lora_cfg, mesh: jax.sharding.Mesh,
                      rules: Iterable[Sequence] = DEFAULT_RULES) -> dict:
  """NamedShardings of the adapters: each adapted kernel's logical axes, the rank unsharded."""
  from opd_jax.models import lora
  return logical_shardings(lora.abstract_adapters(model_cfg, lora_cfg),
                           lora.logical_axes(model_cfg, lora_cfg), mesh, rules)


def init_adapters(params, lora_cfg, adapter_shardings_, base_shardings):
  """(adapters, base) of `lora.init`, jitted and placed (`params` is not donated: it may stay in
  use as the frozen reference policy)."""
  from opd_jax.models import lora
  fn = jax.jit(lambda p: lora.init(p, lora_cfg),
               out_shardings=(adapter_shardings_, base_shardings))
  return fn(params)


def jit_merge(lora_cfg, base_shardings) -> Callable:
  """(base, adapters) -> merged full params laid out like the base (`lora.merge`, jitted): the
  policy the sampler, eval and snapshots read."""
  from opd_jax.models import lora
  return jax.jit(lambda base, adapters: lora.merge(base, adapters, lora_cfg.scale),
                 out_shardings=base_shardings)


def reshard(tree, shardings):
  """Moves a pytree of arrays to another layout (e.g. the student's sampling layout, or another
  mesh); `shardings` is a matching tree (or a single sharding for all leaves)."""
  return jax.device_put(tree, shardings)


# -- multi-process --------------------------------------------------------------------------------
def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Initialises `jax.distributed` when the run is multi-process; returns whether it is.

  Arguments default to the environment variables OPD_COORDINATOR ("host:port", or "auto" to let
  jax detect a TPU pod / SLURM cluster), OPD_NUM_PROCESSES and OPD_PROCESS_ID. Nothing happens for
  a single process. Must run before any other jax call that touches devices.
  """
  env = os.environ
  coordinator = coordinator if coordinator is not None else env.get("OPD_COORDINATOR") or None
  if num_processes is None and env.get("OPD_NUM_PROCESSES"):
    num_processes = int(env["OPD_NUM_PROCESSES"])
  if process_id is None and env.get("OPD_PROCESS_ID"):
    process_id = int(env["OPD_PROCESS_ID"])
  if jax.distributed.is_initialized():
    return True
  if coordinator == "auto":
    _bound_cpu_collective_waits()
    jax.distributed.initialize()
    return True
  if num_processes is None or num_processes <= 1:
    return False
  if coordinator is None or process_id is None:
    raise ValueError(f"multi-process run with num_processes={num_processes} needs a coordinator "
                     "address and a process id (OPD_COORDINATOR / OPD_PROCESS_ID); got "
                     f"coordinator={coordinator!r}, process_id={process_id!r}")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"OPD_PROCESS_ID={process_id} is outside [0, {num_processes})")
  _bound_cpu_collective_waits()
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  return True


# How long a CPU (gloo) collective waits for its peers before it fails (XLA's default: 30 min).
CPU_COLLECTIVE_TIMEOUT_S = 600


def _bound_cpu_collective_waits() -> None:
  """A multi-process CPU run fails within `CPU_COLLECTIVE_TIMEOUT_S` instead of hanging for
  XLA's 30 minutes when the processes stop meeting in the same collective (unless XLA_FLAGS
  already sets the timeout; the flag means nothing to TPU / GPU backends).

  Why they could stop meeting (jaxlib 0.10.2, CPU only): XLA's gloo communicator gives every
  collective the same tag, so collectives pair up in the order each process launches them, and
  the CPU runtime can launch a while loop that holds collectives and an independent collective
  of the same program in either order. The programs order those pairs by data dependencies
  (`train.collective_order`, `sharding.after`, `transformer.gathered`); this bound is the
  fallback. A failed run resumes from its last checkpoint (`--resume`)."""
  flag = "--xla_cpu_collective_timeout_seconds"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}={CPU_COLLECTIVE_TIMEOUT_S}".strip()


def global_batch(local_batch: Mapping[str, Any], mesh: jax.sharding.Mesh,
                 rules: Iterable[Sequence] = DEFAULT_RULES) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (every process passes its own contiguous slice of
  the global batch, in process order); single-process this is a sharded `device_put`."""
  out = {}
  for name, x in local_batch.items():
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
      raise ValueError(f"global_batch: field {name!r} has dtype {x.dtype}; only numeric/bool "
                       "arrays can be sent to devices (keep strings such as answers on the host)")
    sharding = batch_sharding(mesh, x.ndim, rules)
    # THE host -> device transfer point of the step loop (explicit; allowed under the loop's
    # transfer guard, which multi-process JAX would otherwise apply to this call too).
    with jax.transfer_guard_host_to_device("allow"):
      out[name] = jax.make_array_from_process_local_data(sharding, x)
  return out


_SYNCS: dict[str, int] = {}


def sync_processes(name: str, timeout_s: float = 1800.0) -> None:
  """A coordination-service barrier among all processes (no-op for one). Call it before a host
  collective that may follow an uneven compile (gloo gives up on a peer after 30 s); every process
  must call it the same number of times with the same name."""
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost as ocp_multihost
  n = _SYNCS.get(name, 0)
  _SYNCS[name] = n + 1
  ocp_multihost.get_barrier_sync_fn()(key=f"opd_jax_{name}_{n}", timeout_ms=int(timeout_s * 1000))


def batch_axes(mesh: jax.sharding.Mesh, rules: Iterable[Sequence] = DEFAULT_RULES
               ) -> tuple[str, ...]:
  """The mesh axes the `batch` rule splits a batch over."""
  spec = batch_sharding(mesh, 1, rules).spec
  axes = spec[0] if spec else None
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_shards(mesh: jax.sharding.Mesh, rules: Iterable[Sequence] = DEFAULT_RULES) -> int:
  """How many ways the `batch` rule's mesh axes split a batch."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def process_rows_mismatch(mesh: jax.sharding.Mesh, rows: int,
                          rules: Iterable[Sequence] = DEFAULT_RULES, group: int = 1) -> str | None:
  """None when `global_batch`'s placement of a batch of `rows` is sound, else why not.

  Each process loads its own rows and `jax.make_array_from_process_local_data` lays them, in
  order, into the blocks of the global batch its devices hold. That needs (1) every row on the
  devices of one process only (a batch axis that does not split over the processes would take
  each process's rows for the whole batch), and (2) where a process's blocks are not adjacent
  (device meshes ordered host-interleaved, as TPU pods' are), blocks of whole groups of `group`
  consecutive rows (a prompt's G samples: the shared prefill and GRPO's statistics read
  consecutive rows). Decided from the whole mesh, so every process reaches the same answer."""
  if jax.process_count() == 1 or rows % jax.process_count():
    return None
  blocks: dict[int, set[tuple[int, int]]] = {}
  for device, index in batch_sharding(mesh, 1, rules).devices_indices_map((rows,)).items():
    start, stop, _ = index[0].indices(rows)
    blocks.setdefault(device.process_index, set()).add((start, stop))
  holder: dict[int, int] = {}
  for p, spans in sorted(blocks.items()):
    for start, stop in spans:
      for r in range(start, stop):
        if holder.setdefault(r, p) != p:
          return (f"batch row {r} is on the devices of processes {holder[r]} and {p}: the batch "
                  "axes do not split the batch over the processes, which each load their own "
                  "rows")
  for p, spans in sorted(blocks.items()):
    spans = sorted(spans)
    adjacent = all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    size = spans[0][1] - spans[0][0]
    if not adjacent and size % group:
      return (f"process {p}'s devices hold non-adjacent blocks of {size} batch rows, which split "
              f"the groups of {group} consecutive rows")
  return None


def process_rows(global_batch_size: int) -> slice:
  """The slice of a global batch this process should load (contiguous, in process order)."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{n} processes")
  per = global_batch_size // n
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)
