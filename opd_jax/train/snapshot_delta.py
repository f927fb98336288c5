"""Delta snapshots: a parameter snapshot stored as the exact change from the previous snapshot.

`checkpoint.save_snapshot(..., snapshot_format='delta')` (the loop's `loop.snapshot_format`) calls
`save`; `checkpoint.load_params` / `load_params_and_config` read a delta step directory through
`load`, which rebuilds the float32 parameters bit for bit from the chain's full anchor. Layout,
beside full snapshots under the same root::

    <root>/<step>/delta/       per parameter leaf one uint8 array (planes, *leaf shape): the byte
                               planes below (orbax StandardSave; tensorstore compresses them with
                               zstd like every checkpoint array; sharded like the parameter)
    <root>/<step>/meta/        JSON: step, model_config, snapshot_format 'delta', fingerprint,
                               delta {base_step, base_fingerprint, anchor_step, depth, n,
                               bf16_changed, leaves {name: codec, dtype, shape, n, bf16_changed,
                               fingerprint}}
    <root>/<step>/value_head/  (GAE-OPD) stored whole, as in a full snapshot

The first snapshot of a root is full (`params/`, plus a `fingerprint` in its meta), and so is one
whose base chain would reach `anchor_every` deltas, whose parameter tree differs from its base, or
whose base was written by the full format (no fingerprint: never a base).

Encoding of a float32 leaf x against its base p, elementwise on the devices (bits = the uint32
bit pattern; code(bits) = the bfloat16 code by round to nearest even on the bits, as
`geometry.linalg.bf16_codes`; mapped(code) = code with -0 read as +0):

    planes 0, 1   zigzag(mapped(code(x)) - mapped(code(p)) mod 2^16), low / high byte: the
                  bf16-visible change. Nonzero exactly where geometry's `bf16_changed(p, x)`
                  holds (`bf16_change` reads these indices without decoding anything).
    planes 2, 3   low 16 bits of x XOR low 16 bits of p (what bfloat16 does not show), low / high
                  byte.
    plane 4       flags: bit 0 the rounding carry at a tie (low 16 bits exactly 0x8000: code(x)
                  is x's high half plus its own lowest bit), bit 1 code(x) is bf16 -0.

Decoding inverts it for every bit pattern (subnormals, -0, Inf and NaN payloads alike): code(x)
from code(p) and the change, the low half from the XOR, x's high half = code(x) - carry, where the
carry is 1 above 0x8000, 0 below and flag bit 0 at the tie. bfloat16 leaves keep planes 0, 1 and
the flags (plane 2); leaves of other dtypes are stored whole. A changed float32 weight costs its
16 low bits (noise to zstd) plus a few bits of code change; an unchanged bf16 code costs ~nothing
in planes 0, 1. `bench/delta_snapshots.py` measures the bytes on a real OPD run (README).

Integrity: every snapshot written here records a 64-bit fingerprint of its parameters (an
order-free hash of every leaf's bits and positions, computed on the devices), and a delta records
its base's. `load` checks the base it starts from and every decoded leaf against them, so a base
that was replaced under a delta, or a corrupt file, is an error naming the step, never silently
different parameters. A step rewritten with different values (a resumed run redoing it on
hardware that is not bit-reproducible) first rewrites the deltas based on it as full snapshots
(`before_replace`; the full format calls it too), so the chain stays consistent.

Multi-process: every process calls `save` / `load` (as orbax wants); the encoding runs on the
global arrays under jit, each process's shards stay on its devices and orbax writes them (no
gathering to one host). The previous snapshot is kept as a host copy of this process's shards
(so the next delta does not re-read it); on a fresh process it is decoded from disk. At the
moment of a save the planes take 1.25x the parameters' bytes on the devices.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import weakref
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

from opd_jax.models.config import ModelConfig
from opd_jax.train import checkpoint as ckpt

VERSION = 1
ANCHOR_EVERY = 10  # a full snapshot at least every this many snapshots (bounds a load's replay)
CODEC_F32, CODEC_BF16, CODEC_RAW = "f32", "bf16", "raw"
_FORMAT_KEYS = ("snapshot_format", "fingerprint", "delta")  # what this module adds to a meta


# -- leaves ---------------------------------------------------------------------------------------
def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flatten(tree) -> tuple[list[str], list[Any], Any]:
  """(leaf names 'a/b/c', leaves, treedef) of a params tree (nested dicts)."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = ["/".join(_key_name(k) for k in path) for path, _ in pairs]
  if len(set(names)) != len(names):
    raise ValueError("parameter leaf names are not unique: " + ", ".join(sorted(names))[:400])
  return names, [leaf for _, leaf in pairs], treedef


def codec_of(dtype) -> str:
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return CODEC_F32
  if dtype == jnp.bfloat16:
    return CODEC_BF16
  return CODEC_RAW


# -- the codec (jnp, elementwise; uint32 arithmetic wraps mod 2^32) -------------------------------
_U = jnp.uint32


def _code16(bits):
  """bfloat16 code (round to nearest even on the bits) of uint32 float32 bits, in [0, 2^16)."""
  return (bits + _U(0x7FFF) + ((bits >> 16) & _U(1))) >> 16


def _mapped(code):
  return jnp.where((code & _U(0x7FFF)) == 0, _U(0), code)


def _zigzag16(d):
  return ((d << 1) & _U(0xFFFF)) ^ jnp.where((d & _U(0x8000)) != 0, _U(0xFFFF), _U(0))


def _unzigzag16(z):
  return (z >> 1) ^ jnp.where((z & _U(1)) != 0, _U(0xFFFF), _U(0))


def _codes(x, codec):
  """(bits as uint32, code as uint32) of a float32 or bfloat16 array."""
  if codec == CODEC_F32:
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return bits, _code16(bits)
  bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  return bits, bits


def _encode_planes(p, x, codec):
  """uint8 planes (k, *shape) of x against p, and the bf16-changed mask."""
  pb, cp = _codes(p, codec)
  xb, cx = _codes(x, codec)
  change = (_mapped(cx) - _mapped(cp)) & _U(0xFFFF)
  zz = _zigzag16(change)
  neg_zero = (cx == _U(0x8000)).astype(jnp.uint32) << 1
  if codec == CODEC_F32:
    low = (xb ^ pb) & _U(0xFFFF)
    tie = ((xb & _U(0xFFFF)) == _U(0x8000)) & (((xb >> 16) & _U(1)) == 1)
    planes = [zz & _U(0xFF), zz >> 8, low & _U(0xFF), low >> 8, tie.astype(jnp.uint32) | neg_zero]
  else:
    planes = [zz & _U(0xFF), zz >> 8, neg_zero]
  return jnp.stack([q.astype(jnp.uint8) for q in planes]), change != 0


def _decode_planes(p, planes, codec):
  pb, cp = _codes(p, codec)
  q = [planes[i].astype(jnp.uint32) for i in range(planes.shape[0])]
  change = _unzigzag16(q[0] | (q[1] << 8))
  mx = (_mapped(cp) + change) & _U(0xFFFF)
  flags = q[-1]
  cx = jnp.where(mx == 0, jnp.where((flags & _U(2)) != 0, _U(0x8000), _U(0)), mx)
  if codec == CODEC_BF16:
    return lax.bitcast_convert_type(cx.astype(jnp.uint16), jnp.bfloat16)
  low = (pb & _U(0xFFFF)) ^ (q[2] | (q[3] << 8))
  carry = (low > _U(0x8000)) | ((low == _U(0x8000)) & ((flags & _U(1)) != 0))
  high = (cx - carry.astype(jnp.uint32)) & _U(0xFFFF)
  return lax.bitcast_convert_type((high << 16) | low, jnp.float32)


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * _U(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * _U(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x):
  """The bits of any array as uint32 words (8-byte dtypes: a trailing axis of 2)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    return lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16).astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint32)


def _fingerprint(x):
  """Two uint32 sums of hashed (bits, flat position): equal arrays give equal sums whatever the
  sharding (integer sums are exact in any order)."""
  w = _words(x)
  pos = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    pos = pos + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * _U(stride % (1 << 32))
    stride *= w.shape[axis]
  h1 = _fmix32(w ^ _fmix32(pos ^ _U(0x9E3779B9)))
  h2 = _fmix32((w * _U(0x27D4EB2F)) + _fmix32(pos + _U(0x165667B1)))
  return jnp.stack([jnp.sum(h1, dtype=jnp.uint32), jnp.sum(h2, dtype=jnp.uint32)])


def _count(mask):
  """Per leading index counts (int32 cannot hold the count of a whole stacked matrix)."""
  return jnp.sum(mask, axis=tuple(range(1, mask.ndim)) if mask.ndim >= 2 else None,
                 dtype=jnp.int32)


# -- shardings ------------------------------------------------------------------------------------
def _planes_sharding(s):
  """The sharding of a leaf's planes (k, *shape): the leaf's, the plane axis unsplit."""
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))
  return s


def _replicated(s):
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  return s


def _constrain(x, s):
  return lax.with_sharding_constraint(x, s) if isinstance(s, jax.sharding.NamedSharding) else x


def _default_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# Leaves go through the jitted functions below in groups of at most GROUP_BYTES: one compilation
# per group (not per leaf) and a bound on the device memory one call adds.
GROUP_BYTES = 1 << 28


def _groups(sizes: Sequence[int], budget: int = GROUP_BYTES) -> list[list[int]]:
  groups, current, total = [], [], 0
  for i, size in enumerate(sizes):
    if current and total + size > budget:
      groups.append(current)
      current, total = [], 0
    current.append(i)
    total += size
  return groups + ([current] if current else [])


@functools.partial(jax.jit, static_argnames=("stat_shardings",))
def _fingerprint_group(xs, *, stat_shardings):
  return tuple(_constrain(_fingerprint(x), s) for x, s in zip(xs, stat_shardings))


@functools.partial(jax.jit, static_argnames=("codecs", "planes_shardings", "stat_shardings"))
def _encode_group(ps, xs, *, codecs, planes_shardings, stat_shardings):
  out = []
  for p, x, codec, s_planes, s_stat in zip(ps, xs, codecs, planes_shardings, stat_shardings):
    planes, changed = _encode_planes(p, x, codec)
    out.append((_constrain(planes, s_planes), _constrain(_count(changed), s_stat)))
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("codecs", "shardings", "stat_shardings"))
def _decode_group(ps, stored, *, codecs, shardings, stat_shardings):
  out = []
  for p, q, codec, s, s_stat in zip(ps, stored, codecs, shardings, stat_shardings):
    x = _constrain(q if codec == CODEC_RAW else _decode_planes(p, q, codec), s)
    out.append((x, _constrain(_fingerprint(x), s_stat)))
  return tuple(out)


def _hex(fp) -> str:
  a, b = (int(v) for v in np.asarray(jax.device_get(fp)).reshape(-1)[:2])
  return f"{a:08x}{b:08x}"


def _leaf_fingerprints(leaves) -> list[str]:
  out = [None] * len(leaves)
  for g in _groups([x.nbytes for x in leaves]):
    fps = _fingerprint_group(tuple(leaves[i] for i in g),
                             stat_shardings=tuple(_replicated(leaves[i].sharding) for i in g))
    for i, f in zip(g, fps):
      out[i] = f
  return [_hex(f) for f in out]


def _combine(names, leaves, fps) -> str:
  rows = sorted([n, str(jnp.dtype(x.dtype)), list(x.shape), f]
                for n, x, f in zip(names, leaves, fps))
  return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def fingerprint(params) -> str:
  """The 64-bit fingerprint (16 hex digits) of a params tree, as recorded in snapshot metas."""
  names, leaves, _ = _flatten(params)
  leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x for x in leaves]
  return _combine(names, leaves, _leaf_fingerprints(leaves))


# -- pure encode / decode (in memory) -------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Delta:
  """The change of a params tree from a base tree, in memory.

  Attributes:
    planes: {leaf name: uint8 planes (k, *shape)} (the stored value itself for 'raw' leaves).
    codecs: {leaf name: 'f32' | 'bf16' | 'raw'}.
    bf16_changed: {leaf name: entries whose bf16 code changed} (None for 'raw' leaves).
  """

  planes: dict[str, jax.Array]
  codecs: dict[str, str]
  bf16_changed: dict[str, int | None]


def _aligned(base_names, base_leaves, names, leaves) -> bool:
  if base_names != names:
    return False
  return all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(base_leaves, leaves))


def encode(base, params) -> Delta:
  """The exact change of `params` from `base` (same tree, shapes and dtypes)."""
  bn, bl, _ = _flatten(base)
  names, leaves, _ = _flatten(params)
  bl = [jnp.asarray(x) for x in bl]
  leaves = [jnp.asarray(x) for x in leaves]
  if not _aligned(bn, bl, names, leaves):
    raise ValueError("encode: base and params differ in leaves, shapes or dtypes")
  return _encode_flat(names, bl, leaves)


def _encode_flat(names, base_leaves, leaves) -> Delta:
  codecs = {n: codec_of(x.dtype) for n, x in zip(names, leaves)}
  planes = {n: x for n, x in zip(names, leaves) if codecs[n] == CODEC_RAW}
  changed: dict[str, int | None] = {n: None for n in planes}
  coded = [i for i, n in enumerate(names) if codecs[n] != CODEC_RAW]
  pending = []
  for g in _groups([leaves[i].nbytes for i in coded]):
    ids = [coded[j] for j in g]
    xs = tuple(leaves[i] for i in ids)
    ps = tuple(base_leaves[i] if base_leaves[i].sharding == x.sharding
               else jax.device_put(base_leaves[i], x.sharding) for i, x in zip(ids, xs))
    out = _encode_group(ps, xs, codecs=tuple(codecs[names[i]] for i in ids),
                        planes_shardings=tuple(_planes_sharding(x.sharding) for x in xs),
                        stat_shardings=tuple(_replicated(x.sharding) for x in xs))
    for i, (q, counts) in zip(ids, out):
      planes[names[i]] = q
      pending.append((names[i], counts))
  for name, counts in pending:
    changed[name] = int(np.asarray(jax.device_get(counts), np.int64).sum())
  return Delta({n: planes[n] for n in names}, codecs, {n: changed[n] for n in names})


def _decode_flat(names, base_leaves, stored: Mapping[str, jax.Array], codecs: Mapping[str, str],
                 shardings: Sequence[Any]) -> tuple[list[jax.Array], list[str]]:
  """(leaves, their fingerprints) of a delta applied to `base_leaves`, placed as `shardings`."""
  leaves, fps = [None] * len(names), [None] * len(names)
  for g in _groups([base_leaves[i].nbytes for i in range(len(names))]):
    ps = tuple(base_leaves[i] if base_leaves[i].sharding == shardings[i]
               else jax.device_put(base_leaves[i], shardings[i]) for i in g)
    out = _decode_group(ps, tuple(stored[names[i]] for i in g),
                        codecs=tuple(codecs[names[i]] for i in g),
                        shardings=tuple(shardings[i] for i in g),
                        stat_shardings=tuple(_replicated(shardings[i]) for i in g))
    for i, (x, f) in zip(g, out):
      leaves[i], fps[i] = x, f
  return leaves, [_hex(f) for f in fps]


def decode(base, delta: Delta):
  """The params tree `delta` was encoded from, given the same `base` (bit for bit)."""
  names, leaves, treedef = _flatten(base)
  leaves = [jnp.asarray(x) for x in leaves]
  out, _ = _decode_flat(names, leaves, delta.planes, delta.codecs, [x.sharding for x in leaves])
  return jax.tree_util.tree_unflatten(treedef, out)


# -- caches ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _HostLeaf:
  """This process's shards of a global array, on the host."""

  shape: tuple[int, ...]
  dtype: Any
  sharding: Any
  shards: dict[tuple, np.ndarray]

  @staticmethod
  def _key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in index)

  @classmethod
  def of(cls, x: jax.Array) -> _HostLeaf:
    shards = {}
    for s in x.addressable_shards:
      key = cls._key(s.index)
      if key not in shards:
        shards[key] = np.array(s.data, copy=True)  # copied: the array may be donated later
    return cls(tuple(x.shape), x.dtype, x.sharding, shards)

  def to_device(self, sharding=None) -> jax.Array:
    index_map = self.sharding.addressable_devices_indices_map(self.shape)
    arrays = [jax.device_put(self.shards[self._key(idx)], d) for d, idx in index_map.items()]
    x = jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)
    return x if sharding is None or sharding == self.sharding else jax.device_put(x, sharding)


# root -> (step, fingerprint, names, host leaves) of the last snapshot this process wrote there:
# the base of the next delta, without reading it back.
_SAVED: dict[str, tuple[int, str, list[str], list[_HostLeaf]]] = {}
# (step dir, fingerprint) -> (names, weakrefs to the decoded leaves): a load that passes a step of
# its chain still held by the caller (trajectory diagnostics read the snapshots in order)
# continues from it.
_LOADED: dict[tuple[str, str], tuple[list[str], list[weakref.ref]]] = {}
_LOADED_MAX = 64


def clear_caches() -> None:
  """Forgets the host copy of the last saved snapshot and the loaded-chain shortcuts."""
  _SAVED.clear()
  _LOADED.clear()


def _remember_loaded(step_dir, fp, names, leaves):
  try:
    refs = [weakref.ref(x) for x in leaves]
  except TypeError:
    return
  _LOADED[(str(step_dir), fp)] = (names, refs)
  while len(_LOADED) > _LOADED_MAX:
    _LOADED.pop(next(iter(_LOADED)))


def _recall_loaded(step_dir, fp, names, shardings):
  hit = _LOADED.get((str(step_dir), fp))
  if hit is None or hit[0] != names:
    return None
  leaves = [r() for r in hit[1]]
  if any(x is None or x.is_deleted() for x in leaves):
    return None
  if [x.sharding for x in leaves] != list(shardings):
    return None
  return leaves


# -- disk -----------------------------------------------------------------------------------------
def _scan(root: epath.Path) -> dict[int, dict]:
  """{step: meta} of every complete snapshot step directory under `root`."""
  if not root.is_dir():
    return {}
  return {int(p.name): ckpt._read_meta(p) for p in root.iterdir()  # noqa: SLF001
          if p.name.isdigit() and ckpt.is_snapshot_dir(p)}


def _barrier(name: str) -> None:
  """Every process has read the directory before any of them writes to it."""
  from opd_jax.train import mesh as mesh_lib  # noqa: PLC0415
  mesh_lib.sync_processes(name)


def _is_delta(meta: Mapping) -> bool:
  return meta.get("snapshot_format") == "delta" and isinstance(meta.get("delta"), Mapping)


def _depth(meta: Mapping) -> int:
  return int(meta["delta"].get("depth", 1)) if _is_delta(meta) else 0


def _write(root: epath.Path, step: int, items: dict, what: str) -> epath.Path:
  manager = ckpt.open_manager(root, tuple(items))
  try:
    with ckpt._disk_full_is_a_user_error(root, what):  # noqa: SLF001
      if int(step) in manager.all_steps():
        manager.delete(int(step))
      manager.save(int(step), args=ocp.args.Composite(**items), force=True)
      manager.wait_until_finished()
  finally:
    manager.close()
  return root / str(int(step))


def _write_full(root, step, params, info: dict, value_head) -> epath.Path:
  items = {ckpt.PARAMS: ocp.args.StandardSave(params), ckpt.META: ocp.args.JsonSave(info)}
  if value_head is not None:
    items[ckpt.VALUE_HEAD] = ocp.args.StandardSave(value_head)
  return _write(root, step, items, f"parameter snapshot of step {step}")


def _value_head_like(step_dir: epath.Path, sharding):
  """A snapshot's value head (None without one), placed replicated on `sharding`'s devices."""
  item = step_dir / ckpt.VALUE_HEAD
  if not item.is_dir():
    return None
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                       sharding=_replicated(sharding)),
                        ckpt._abstract_from_metadata(item))  # noqa: SLF001
  return ocp.StandardCheckpointer().restore(item, target)


def _info(meta, step, model_cfg) -> dict:
  info = {k: v for k, v in dict(meta or {}).items() if k not in _FORMAT_KEYS}
  info["step"] = int(step)
  if model_cfg is not None:
    info["model_config"] = ckpt.model_config_to_dict(model_cfg)
  return info


# -- save -----------------------------------------------------------------------------------------
def before_replace(directory, step: int, params, *, new_fingerprint: str | None = None,
                   metas: Mapping[int, Mapping] | None = None) -> list[int]:
  """Call before snapshot `step` under `directory` is rewritten with `params`: when its values
  change, every delta snapshot based on it is first rewritten as a full snapshot (same values),
  so none is left pointing at a base that no longer holds what it was encoded against. Returns
  the steps rewritten. Every process calls it (it reads, then writes collectively)."""
  root = ckpt.as_path(directory)
  step = int(step)
  if metas is None:
    metas = _scan(root)
    _barrier(f"opd_jax_snapshot_delta_before_replace_{step}")
  deps = sorted(t for t, m in metas.items() if _is_delta(m) and m["delta"].get("base_step") == step)
  if step not in metas or not deps:
    return []
  names, leaves, _ = _flatten(params)
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
  new_fp = new_fingerprint or _combine(names, leaves, _leaf_fingerprints(leaves))
  old_fp = metas[step].get("fingerprint")
  shardings = jax.tree_util.tree_unflatten(jax.tree.structure(params),
                                           [x.sharding for x in leaves])
  if old_fp is None:
    old_fp = fingerprint(ckpt.load_params(root / str(step), shardings=shardings))
  if old_fp == new_fp:
    return []
  for t in deps:
    values = load(root / str(t), shardings=shardings)
    head = _value_head_like(root / str(t), leaves[0].sharding)
    info = {k: v for k, v in metas[t].items() if k not in _FORMAT_KEYS}
    info.update(snapshot_format="full",
                fingerprint=metas[t].get("fingerprint") or fingerprint(values))
    _write_full(root, t, values, info, head)
    logging.info("snapshot %s/%d: rewritten as a full snapshot (its base step %d is replaced)",
                 root, t, step)
  for key in [k for k in _SAVED if _SAVED[k][0] in deps]:
    _SAVED.pop(key)
  return deps


def save(directory, step: int, params, model_cfg: ModelConfig | None = None,
         meta: Mapping[str, Any] | None = None, *, value_head=None,
         anchor_every: int = ANCHOR_EVERY) -> epath.Path:
  """Writes snapshot `step` of `params` under `directory` as a delta from the snapshot before it
  (the highest step below `step` there), or as a full snapshot when there is none, when the chain
  would reach `anchor_every` deltas (0: no limit), or when the trees differ. Returns the step
  directory. Every process calls it with the same (global) arrays."""
  root = ckpt.as_path(directory)
  step = int(step)
  names, leaves, treedef = _flatten(params)
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in leaves]
  params = jax.tree_util.tree_unflatten(treedef, leaves)
  fps = _leaf_fingerprints(leaves)
  fp = _combine(names, leaves, fps)
  metas = _scan(root)
  _barrier(f"opd_jax_snapshot_delta_save_{step}")
  before_replace(root, step, params, new_fingerprint=fp, metas=metas)
  metas.pop(step, None)
  base = max((t for t in metas if t < step), default=None)
  if base is not None and anchor_every > 0 and _depth(metas[base]) + 1 >= anchor_every:
    base = None
  base_leaves = (_base_leaves(root, base, metas[base], names, leaves) if base is not None
                 else None)
  info = _info(meta, step, model_cfg)
  info["fingerprint"] = fp
  if base_leaves is None:
    info["snapshot_format"] = "full"
    path = _write_full(root, step, params, info, value_head)
  else:
    base_meta = metas[base]
    delta = _encode_flat(names, base_leaves, leaves)
    info["snapshot_format"] = "delta"
    n = sum(int(x.size) for x, c in zip(leaves, delta.codecs.values()) if c != CODEC_RAW)
    changed = sum(v for v in delta.bf16_changed.values() if v is not None)
    info["delta"] = {
        "version": VERSION, "base_step": base, "base_fingerprint": base_meta["fingerprint"],
        "anchor_step": (base_meta["delta"]["anchor_step"] if _is_delta(base_meta) else base),
        "depth": _depth(base_meta) + 1, "n": n, "bf16_changed": changed,
        "leaves": {name: {"codec": delta.codecs[name], "dtype": str(jnp.dtype(x.dtype)),
                          "shape": list(x.shape), "n": int(x.size),
                          "bf16_changed": delta.bf16_changed[name], "fingerprint": f}
                   for name, x, f in zip(names, leaves, fps)},
    }
    items = {ckpt.DELTA: ocp.args.StandardSave(
                 jax.tree_util.tree_unflatten(treedef, [delta.planes[n] for n in names])),
             ckpt.META: ocp.args.JsonSave(info)}
    if value_head is not None:
      items[ckpt.VALUE_HEAD] = ocp.args.StandardSave(value_head)
    path = _write(root, step, items, f"delta snapshot of step {step}")
  _SAVED[str(root)] = (step, fp, names, [_HostLeaf.of(x) for x in leaves])
  return path


def _base_leaves(root, base: int, base_meta: Mapping, names, leaves):
  """The base snapshot's leaves, placed like `leaves` (None: write a full snapshot instead)."""
  base_fp = base_meta.get("fingerprint")
  if base_fp is None:
    return None  # a snapshot written without a fingerprint (the full format) anchors nothing
  cached = _SAVED.get(str(root))
  if cached is not None and cached[0] == base and cached[1] == base_fp and cached[2] == names:
    out = [h.to_device(x.sharding) for h, x in zip(cached[3], leaves)]
  else:
    shardings = {n: x.sharding for n, x in zip(names, leaves)}
    try:
      loaded = _load_flat(root / str(base), shardings)
    except (ckpt.CheckpointError, ValueError, FileNotFoundError) as e:
      logging.warning("snapshot %s/%d unreadable as a delta base (%s): writing a full snapshot",
                      root, base, str(e).splitlines()[0][:200])
      return None
    if loaded[0] != names:
      return None
    out = loaded[1]
  if not _aligned(names, out, names, leaves):
    return None
  return out


# -- load -----------------------------------------------------------------------------------------
def chain(step_dir) -> list[epath.Path]:
  """The step directories a snapshot is rebuilt from: its full anchor first, itself last."""
  d = epath.Path(ckpt.as_path(step_dir))
  out = [d]
  seen = {str(d)}
  while not (d / ckpt.PARAMS).is_dir():
    meta = ckpt._read_meta(d)  # noqa: SLF001
    if not (d / ckpt.DELTA).is_dir() or not _is_delta(meta):
      raise ckpt.CheckpointError(f"{str(d)!r} is neither a full nor a delta snapshot (its meta "
                                 "has no delta record)")
    base = d.parent / str(int(meta["delta"]["base_step"]))
    if not ckpt.is_snapshot_dir(base) or str(base) in seen:
      raise ckpt.CheckpointError(
          f"delta snapshot {str(d)!r} is based on step {meta['delta']['base_step']}, which is "
          f"missing from {str(d.parent)!r}: the snapshots of a delta chain must be kept together")
    seen.add(str(base))
    out.append(base)
    d = base
  return out[::-1]


def _restore_planes(item: epath.Path, codecs: Mapping[str, str],
                    shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{leaf name: planes (or the whole value of a 'raw' leaf)} of a delta item, placed like the
  leaves' `shardings`."""
  meta = ocp.PyTreeCheckpointer().metadata(item)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  names, leaves, treedef = _flatten(tree)
  if sorted(names) != sorted(codecs):
    raise ckpt.CheckpointError(f"delta {str(item)!r} holds other leaves than its meta records")
  target = [jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                 sharding=(shardings[n] if codecs[n] == CODEC_RAW
                                           else _planes_sharding(shardings[n])))
            for n, m in zip(names, leaves)]
  restored = ocp.StandardCheckpointer().restore(item, jax.tree_util.tree_unflatten(treedef, target))
  r_names, r_leaves, _ = _flatten(restored)
  return dict(zip(r_names, r_leaves))


def _load_flat(step_dir, shardings: Mapping[str, Any] | None):
  """(names, leaves, treedef) of a snapshot (full or delta), placed as `shardings` ({name:
  sharding}; None: the first local device)."""
  links = chain(step_dir)
  anchor = links[0]
  metas = [ckpt._read_meta(d) for d in links]  # noqa: SLF001
  fps = [m.get("fingerprint") for m in metas]
  # Continue from the latest link still held by a caller, else from the anchor.
  start, names, leaves, treedef = None, None, None, None
  anchor_tree = ckpt._abstract_from_metadata(anchor / ckpt.PARAMS)  # noqa: SLF001
  a_names, _, treedef = _flatten(anchor_tree)
  target = ({n: shardings[n] for n in a_names} if shardings is not None
            else {n: _default_sharding() for n in a_names})
  wanted = [target[n] for n in a_names]
  for i in range(len(links) - 1, 0, -1):
    if fps[i] is not None:
      held = _recall_loaded(links[i], fps[i], a_names, wanted)
      if held is not None:
        start, names, leaves = i, a_names, held
        break
  if start is None:
    tree = ckpt.load_params(anchor, shardings=jax.tree_util.tree_unflatten(treedef, wanted))
    names, leaves, treedef = _flatten(tree)
    start = 0
    if len(links) > 1:
      got = _combine(names, leaves, _leaf_fingerprints(leaves))
      want = metas[1]["delta"].get("base_fingerprint")
      if got != want:
        raise ckpt.CheckpointError(
            f"snapshot {str(anchor)!r} is not the one the delta snapshot {str(links[1])!r} was "
            f"written against (fingerprint {got}, expected {want}): it was rewritten or is "
            "corrupt; the deltas after it cannot be rebuilt")
      if fps[0] is not None:
        _remember_loaded(anchor, fps[0], names, leaves)
  current_fp = fps[start]
  for i in range(start + 1, len(links)):
    d, meta = links[i], metas[i]
    record = meta["delta"]
    if record.get("version", VERSION) > VERSION:
      raise ckpt.CheckpointError(f"delta snapshot {str(d)!r} has format version "
                                 f"{record['version']}; this code reads up to {VERSION}")
    if current_fp is not None and record.get("base_fingerprint") != current_fp:
      raise ckpt.CheckpointError(
          f"delta snapshot {str(d)!r} was written against a different step "
          f"{record['base_step']} than the one on disk (fingerprint "
          f"{record.get('base_fingerprint')} vs {current_fp}): that step was rewritten outside "
          "save_snapshot; this snapshot cannot be rebuilt")
    if sorted(record.get("leaves", {})) != sorted(names):
      raise ckpt.CheckpointError(f"delta snapshot {str(d)!r} records other parameter leaves than "
                                 f"its base step {record['base_step']} holds")
    codecs = {n: record["leaves"][n]["codec"] for n in names}
    planes = _restore_planes(d / ckpt.DELTA, codecs, {n: x.sharding for n, x in zip(names, leaves)})
    decoded, got = _decode_flat(names, leaves, planes, codecs, [x.sharding for x in leaves])
    for n, f in zip(names, got):
      if f != record["leaves"][n]["fingerprint"]:
        raise ckpt.CheckpointError(
            f"delta snapshot {str(d)!r}: leaf {n!r} decodes to fingerprint {f}, recorded "
            f"{record['leaves'][n]['fingerprint']} (a corrupt file, or its base step "
            f"{record['base_step']} was changed)")
    # Exactly the requested sharding objects (jit may return an equivalent spelling: P() for
    # P(None,)); same devices, so no data moves.
    leaves = [x if x.sharding == s else jax.device_put(x, s) for x, s in zip(decoded, wanted)]
    current_fp = meta.get("fingerprint")
    if current_fp is not None:
      _remember_loaded(d, current_fp, names, leaves)
  return names, leaves, treedef


def load(step_dir, *, shardings=None):
  """The params of a snapshot step directory (delta or full), rebuilt bit for bit; `shardings`
  as in `checkpoint.load_params` (default: the first local device)."""
  flat = None
  if shardings is not None:
    s_names, s_leaves, _ = _flatten(shardings)
    flat = dict(zip(s_names, s_leaves))
  names, leaves, treedef = _load_flat(step_dir, flat)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def bf16_change(step_dir) -> dict[str, np.ndarray]:
  """{leaf name: flat indices whose bfloat16 value changed from the base snapshot} of a delta
  snapshot, read from its planes alone (no decoding; +0 and -0 count as equal, as in
  `geometry.linalg.bf16_changed`). Leaves stored whole ('raw' codec) are left out."""
  d = epath.Path(ckpt.as_path(step_dir))
  meta = ckpt._read_meta(d)  # noqa: SLF001
  if not _is_delta(meta):
    raise ValueError(f"{str(d)!r} is not a delta snapshot")
  record = meta["delta"]["leaves"]
  names = sorted(record)
  planes = _restore_planes(d / ckpt.DELTA, {n: record[n]["codec"] for n in names},
                           {n: _default_sharding() for n in names})
  out = {}
  for n in names:
    if record[n]["codec"] == CODEC_RAW:
      continue
    q = np.asarray(planes[n])
    out[n] = np.flatnonzero((q[0] | q[1]).reshape(-1))
  return out


def summary(step_dir) -> dict:
  """{'format', 'step', 'base_step', 'depth', 'n', 'bf16_changed'} of a snapshot step dir (the
  bf16 counts are those of a delta, against its base; None for a full snapshot)."""
  d = epath.Path(ckpt.as_path(step_dir))
  meta = ckpt._read_meta(d)  # noqa: SLF001
  if _is_delta(meta):
    r = meta["delta"]
    return {"format": "delta", "step": meta.get("step"), "base_step": r["base_step"],
            "depth": r.get("depth"), "n": r.get("n"), "bf16_changed": r.get("bf16_changed")}
  return {"format": "full", "step": meta.get("step"), "base_step": None, "depth": 0, "n": None,
          "bf16_changed": None}
