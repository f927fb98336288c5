"""Warm starts without tracing: jitted entry points exported once (`jax.export`) and loaded by key.

The persistent compilation cache (`compile_cache`) skips XLA compilation on a second run of the
same shapes, but every run still traces and lowers its programs in Python: for the `small` OPD
run about 2.5 s for the train step and 2.3 s for the sampler, the bulk of a warm first step. Here
a program is traced and lowered once, serialized with `jax.export` and, in a later process, read
back and called through `Exported.call` under the same `jax.jit` shardings and donation: the
process then traces only a thin wrapper, and XLA compilation of the result hits the compilation
cache as before.

What the key covers (a stale entry would silently run old code, so everything the trace can
depend on is hashed; anything that cannot be hashed reliably disables the cache for that call,
never guesses):
  - the opd_jax sources (every .py file of the package), the versions of jax, jaxlib, flax, optax,
    numpy and ml_dtypes, the JAX and flax configuration flags, the backend, the device kinds and
    counts;
  - the function and its bound knobs, walked deeply (`fingerprint`): code objects with their
    closures and defaults, dataclasses, named tuples, containers, numpy arrays by content, meshes
    and shardings. Functions from modules outside opd_jax and its stack (e.g. an optax transform
    written in a notebook) are not fingerprinted: such a call is traced as usual;
  - the static arguments (the same walk) and the dynamic ones' tree structure, shapes, dtypes,
    weak types and shardings;
  - whether the trace orders its collectives (`models.sharding.orders_collectives`, read from
    the calling context).

Entries live beside the compilation cache (`<cache dir>-traces/`), written atomically (a temporary
file renamed into place), so concurrent processes share them safely. `OPD_JAX_TRACE_CACHE=off`
turns the cache off (the compilation cache stays on); it is off whenever the compilation cache
is and under `jax.disable_jit`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import importlib
import json
import logging
import os
import pathlib
import re
import types
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath

from opd_jax.models import sharding

_TRUSTED_PACKAGES = frozenset({
    "opd_jax", "jax", "jaxlib", "flax", "optax", "chex", "numpy", "ml_dtypes", "builtins",
    "functools", "operator", "math", "typing", "dataclasses", "enum", "collections", "abc"})
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")
_UNSPECIFIED = object()
_log = logging.getLogger(__name__)


class Uncacheable(Exception):
  """A value the key cannot cover reliably (the call is then traced as usual)."""


def _trusted(module: str | None) -> bool:
  return bool(module) and module.split(".")[0] in _TRUSTED_PACKAGES


# -- the key --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def environment_fingerprint() -> str:
  """opd_jax's sources, the stack's versions, JAX's flags, the backend and its devices."""
  h = hashlib.sha256()
  root = pathlib.Path(__file__).resolve().parent
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode())
    h.update(path.read_bytes())
  import flax
  import jaxlib
  import ml_dtypes
  import optax
  for mod in (jax, jaxlib, flax, optax, np, ml_dtypes):
    h.update(f"{mod.__name__}={getattr(mod, '__version__', '?')};".encode())
  for name, value in sorted(jax.config.values.items()):
    if not any(s in name for s in ("cache", "log", "explain", "profil", "traceback")):
      h.update(f"{name}={value!r};".encode())
  for name in sorted(n for n in dir(flax.config) if n.startswith(("flax_", "nnx_"))):
    h.update(f"{name}={getattr(flax.config, name, None)!r};".encode())
  devices = jax.devices()
  h.update(f"{jax.default_backend()}|{jax.process_count()}|{len(devices)}|"
           f"{sorted({d.device_kind for d in devices})}".encode())
  return h.hexdigest()


def fingerprint(obj: Any) -> str:
  """A stable text for `obj` covering everything a trace can read from it (raises Uncacheable)."""
  parts: list[str] = []
  _walk(obj, parts, set())
  return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _walk(obj: Any, out: list[str], active: set) -> None:  # noqa: C901 - one case per kind
  if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
    out.append(f"{type(obj).__name__}:{obj!r}")
    return
  if isinstance(obj, (np.dtype, np.generic)) or (isinstance(obj, type) and
                                                 issubclass(obj, np.generic)):
    out.append(f"np:{obj!r}")
    return
  if isinstance(obj, enum.Enum):
    out.append(f"enum:{type(obj).__module__}.{type(obj).__qualname__}.{obj.name}")
    return
  if isinstance(obj, type):
    if not _trusted(obj.__module__):
      raise Uncacheable(f"class {obj.__module__}.{obj.__qualname__}")
    out.append(f"type:{obj.__module__}.{obj.__qualname__}")
    return
  if isinstance(obj, jax.Array):
    raise Uncacheable("a device array bound into the function")
  if isinstance(obj, np.ndarray):
    out.append(f"ndarray:{obj.dtype}{obj.shape}:"
               f"{hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()}")
    return
  if isinstance(obj, jax.sharding.Sharding) or isinstance(obj, jax.sharding.Mesh):
    out.append(f"sharding:{_sharding_text(obj)}")
    return
  if isinstance(obj, jax.sharding.PartitionSpec):
    out.append(f"spec:{tuple(obj)!r}")
    return
  if isinstance(obj, jax.tree_util.PyTreeDef):
    text = str(obj)
    if _ADDRESS.search(text):
      raise Uncacheable(f"a tree structure printed with an address: {text[:80]}")
    out.append(f"treedef:{text}")
    return
  key = id(obj)
  if key in active:
    out.append("cycle")
    return
  active.add(key)
  try:
    _walk_compound(obj, out, active)
  finally:
    active.discard(key)


def _walk_compound(obj: Any, out: list[str], active: set) -> None:
  kind = type(obj)
  if isinstance(obj, functools.partial):
    out.append("partial(")
    for v in (obj.func, obj.args, obj.keywords):
      _walk(v, out, active)
    out.append(")")
  elif isinstance(obj, types.MethodType):
    out.append("method(")
    _walk(obj.__func__, out, active)
    _walk(obj.__self__, out, active)
    out.append(")")
  elif isinstance(obj, types.FunctionType):
    if not _trusted(obj.__module__):
      raise Uncacheable(f"function {obj.__module__}.{obj.__qualname__}")
    out.append(f"fn:{obj.__module__}.{obj.__qualname__}:{_code_text(obj.__code__)}")
    cells = tuple(c.cell_contents if _filled(c) else "<empty>" for c in obj.__closure__ or ())
    for v in (obj.__defaults__, obj.__kwdefaults__, cells):
      _walk(v, out, active)
  elif isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
    module = getattr(obj, "__module__", None) or "builtins"
    if not _trusted(module):
      raise Uncacheable(f"builtin {module}.{obj.__qualname__}")
    out.append(f"builtin:{module}.{obj.__qualname__}")
  elif hasattr(obj, "__wrapped__") and callable(obj):  # jax.jit / custom_jvp / functools.wraps
    out.append(f"wrapped:{kind.__module__}.{kind.__qualname__}(")
    _walk(obj.__wrapped__, out, active)
    out.append(")")
  elif kind in (tuple, list, set, frozenset):
    items = sorted(obj, key=repr) if kind in (set, frozenset) else obj
    out.append(f"{kind.__name__}[")
    for v in items:
      _walk(v, out, active)
    out.append("]")
  elif isinstance(obj, dict):
    out.append(f"dict:{kind.__module__}.{kind.__qualname__}{{")
    for k in sorted(obj, key=repr):
      _walk(k, out, active)
      _walk(obj[k], out, active)
    out.append("}")
  elif isinstance(obj, tuple) and hasattr(kind, "_fields"):  # a named tuple
    _walk(kind, out, active)
    _walk(tuple(obj), out, active)
  elif dataclasses.is_dataclass(obj):
    _walk(kind, out, active)
    out.append("{")
    for f in dataclasses.fields(obj):
      out.append(f.name)
      _walk(getattr(obj, f.name), out, active)
    out.append("}")
  else:
    # Other objects of the stack (flax's graph definitions, optax's named transforms): their
    # printed form when it holds no address, else their attributes.
    _walk(kind, out, active)
    text = repr(obj)
    if not _ADDRESS.search(text):
      out.append(f"repr:{text}")
    elif hasattr(obj, "__dict__"):
      _walk(dict(vars(obj)), out, active)
    else:
      raise Uncacheable(f"an instance of {kind.__module__}.{kind.__qualname__}")


def _filled(cell) -> bool:
  try:
    cell.cell_contents  # noqa: B018 - an empty cell raises
    return True
  except ValueError:
    return False


def _code_text(code: types.CodeType) -> str:
  consts = tuple(_code_text(c) if isinstance(c, types.CodeType) else repr(c)
                 for c in code.co_consts)
  return hashlib.sha256(repr((code.co_code, consts, code.co_names, code.co_varnames,
                              code.co_freevars)).encode()).hexdigest()[:24]


def _sharding_text(s) -> str:
  if isinstance(s, jax.sharding.Mesh):
    return f"mesh{tuple(s.axis_names)}{tuple(s.devices.shape)}{s.device_ids.ravel().tolist()}"
  if isinstance(s, jax.sharding.NamedSharding):
    spec = tuple(s.spec)
    while spec and spec[-1] is None:   # P('x', None) and P('x') place alike
      spec = spec[:-1]
    return f"named:{_sharding_text(s.mesh)}:{spec!r}:{s.memory_kind}"
  if isinstance(s, jax.sharding.SingleDeviceSharding):
    (device,) = s.device_set
    return f"single:{device.id}:{s.memory_kind}"
  text = repr(s)
  if _ADDRESS.search(text):
    raise Uncacheable(f"sharding {text[:80]}")
  return text


def _leaf_signature(x, placed_by_jit: bool = False) -> tuple:
  """Shape, dtype, weak type and (unless jit's in_shardings place the argument) sharding: a
  hashable tuple, cheap per call (`_signature_text` writes it for the key)."""
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    sharding = None if placed_by_jit else getattr(x, "sharding", None)
    return ("array", tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
            sharding)
  if isinstance(x, (np.ndarray, np.generic)):
    return ("host", tuple(np.shape(x)), str(x.dtype))
  if isinstance(x, (bool, int, float, complex)):
    return ("py", type(x).__name__)     # weakly typed scalars
  raise Uncacheable(f"argument of type {type(x).__name__}")


def _signature_text(signature: tuple) -> str:
  return repr([sig[:-1] + (_sharding_text(sig[-1]) if sig[-1] is not None else "unplaced",)
               if sig[0] == "array" else sig for sig in signature])


# -- the tree of outputs, written as JSON --------------------------------------------------------
def _describe(tree: jax.tree_util.PyTreeDef) -> Any:
  data = tree.node_data()
  children = [_describe(c) for c in tree.children()]
  if data is None:
    return "*"
  node_type, aux = data
  if node_type is type(None):
    return "none"
  if not _trusted(node_type.__module__):
    raise Uncacheable(f"output node {node_type.__module__}.{node_type.__qualname__}")
  return {"type": f"{node_type.__module__}:{node_type.__qualname__}", "aux": _aux_to_json(aux),
          "children": children}


def _aux_to_json(aux: Any) -> Any:
  if aux is None or isinstance(aux, (bool, int, float, str)):
    return aux
  if isinstance(aux, tuple):
    return {"tuple": [_aux_to_json(a) for a in aux]}
  if isinstance(aux, list):
    return [_aux_to_json(a) for a in aux]
  raise Uncacheable(f"output tree data of type {type(aux).__name__}")


def _aux_from_json(data: Any) -> Any:
  if isinstance(data, dict):
    return tuple(_aux_from_json(a) for a in data["tuple"])
  if isinstance(data, list):
    return [_aux_from_json(a) for a in data]
  return data


def _rebuild(desc: Any) -> jax.tree_util.PyTreeDef:
  if desc == "*":
    return jax.tree.structure(0)
  if desc == "none":
    return jax.tree.structure(None)
  module, qualname = desc["type"].split(":")
  node_type: Any = importlib.import_module(module)
  for part in qualname.split("."):
    node_type = getattr(node_type, part)
  children = [_rebuild(c) for c in desc["children"]]
  return jax.tree.structure(0).from_node_data_and_children(
      jax.tree_util.default_registry, (node_type, _aux_from_json(desc["aux"])), children)


# -- the cache ------------------------------------------------------------------------------------
def directory() -> epath.Path | None:
  """Where entries live (local or, like the compilation cache, e.g. gs://), or None when off."""
  if os.environ.get("OPD_JAX_TRACE_CACHE", "").strip().lower() in ("off", "0", "false", "no"):
    return None
  xla = jax.config.jax_compilation_cache_dir
  if not xla or jax.config.jax_disable_jit:
    return None
  return epath.Path(str(xla).rstrip("/") + "-traces")


@dataclasses.dataclass
class _Entry:
  call: Callable          # the jitted wrapper around Exported.call
  loaded: bool            # read from the cache (True) or exported in this process


class CachedJit:
  """`jax.jit(fn, ...)` whose per-signature trace and lowering are read from the trace cache.

  `key`: what the trace depends on besides the arguments, fingerprinted in place of `fn` (e.g.
  the step function and its bound knobs when `fn` is a thin wrapper around them); default `fn`.
  `__call__` behaves as the jitted function. `lower` lowers the plain jitted function (tracing
  it: for memory plans and cost analyses). `prepare(*args)` readies the program for arguments
  (arrays or `jax.ShapeDtypeStruct`s) without running it and returns whether the trace came from
  the cache; `compile(*args)` also compiles it (a persistent-cache read when warm).
  """

  def __init__(self, fn: Callable, *, name: str, key: Any = _UNSPECIFIED,
               in_shardings=_UNSPECIFIED, out_shardings=_UNSPECIFIED,
               donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = (),
               static_argnames: Sequence[str] = ()):
    self.fn = fn
    self.name = name
    kw = {}
    if in_shardings is not _UNSPECIFIED:
      kw["in_shardings"] = in_shardings
    if out_shardings is not _UNSPECIFIED:
      kw["out_shardings"] = out_shardings
    self._in_shardings, self._out_shardings = in_shardings, out_shardings
    self._donate = tuple(donate_argnums)
    self._static_argnums = tuple(static_argnums)
    self._static_argnames = tuple(static_argnames)
    self._placed: dict[Any, tuple[bool, ...]] = {}
    self.plain = jax.jit(fn, donate_argnums=self._donate, static_argnums=self._static_argnums,
                         static_argnames=self._static_argnames, **kw)
    self._entries: dict[Any, _Entry | None] = {}
    try:
      self._fn_key = fingerprint(fn if key is _UNSPECIFIED else key)
    except Uncacheable:
      self._fn_key = None
    self.loads = 0     # programs read from the cache in this process
    self.exports = 0   # programs traced and written in this process

  # The argument split that jax.jit's static_argnums / static_argnames make.
  def _split(self, args, kwargs):
    statics = tuple((i, args[i]) for i in self._static_argnums) + tuple(
        sorted((k, v) for k, v in kwargs.items() if k in self._static_argnames))
    dyn_args = tuple(a for i, a in enumerate(args) if i not in self._static_argnums)
    dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self._static_argnames}
    if dyn_kwargs:
      raise Uncacheable("dynamic keyword arguments")
    return statics, dyn_args

  def __call__(self, *args, **kwargs):
    entry = self._entry(args, kwargs)
    if entry is None:
      return self.plain(*args, **kwargs)
    return entry.call(*self._split(args, kwargs)[1])

  def lower(self, *args, **kwargs):
    return self.plain.lower(*args, **kwargs)

  def _cache_size(self) -> int:
    """Programs held for distinct signatures (as `jax.jit`'s `_cache_size`)."""
    held = sum(e is not None for e in self._entries.values())
    return held or self.plain._cache_size()

  def prepare(self, *args, **kwargs) -> bool:
    entry = self._entry(args, kwargs)
    return entry is not None and entry.loaded

  def compile(self, *args, **kwargs):
    entry = self._entry(args, kwargs)
    if entry is None:
      return self.plain.lower(*args, **kwargs).compile()
    return entry.call.lower(*self._split(args, kwargs)[1]).compile()

  def _entry(self, args, kwargs) -> _Entry | None:
    root = directory()
    if root is None or self._fn_key is None:
      return None
    try:
      statics, dyn = self._split(args, kwargs)
      leaves, tree = jax.tree.flatten(dyn)
      placed = self._placed.get(tree)
      if placed is None:   # which leaves jit's in_shardings place (their own sharding is moot)
        given = _flat_shardings(self._in_shardings, dyn, own=False)
        placed = self._placed[tree] = tuple(g is not None for g in given)
      # (index 3: whether the trace orders its collectives, which depends on the context)
      memo = (tuple((i, _hashable(v)) for i, v in statics), tree,
              tuple(_leaf_signature(x, p) for x, p in zip(leaves, placed)),
              sharding.orders_collectives())
    except (Uncacheable, TypeError):
      return None
    if memo in self._entries:
      return self._entries[memo]
    try:
      entry = self._load_or_export(root, statics, dyn, tree, memo)
    except Uncacheable:
      entry = None
    self._entries[memo] = entry
    return entry

  def _load_or_export(self, root, statics, dyn, tree, memo) -> _Entry:
    static_key = fingerprint(tuple(v for _, v in statics))
    text = str(tree)
    if _ADDRESS.search(text):
      raise Uncacheable("argument tree printed with an address")
    key = hashlib.sha256("\x1e".join(
        (environment_fingerprint(), self.name, self._fn_key, static_key, text,
         _signature_text(memo[2]), _shardings_text(self._in_shardings),
         _shardings_text(self._out_shardings), repr(self._donate),
         f"ordered={memo[3]}")).encode()).hexdigest()
    path = root / f"{self.name.replace('/', '_')}-{key[:40]}"
    exported, out_tree = _read(path)
    loaded = exported is not None
    if not loaded:
      try:
        exported, out_tree = self._export(statics, dyn, tree)
      except Uncacheable:
        raise
      except Exception as e:  # noqa: BLE001 - the plain jit traces again and raises what is real
        _log.info("trace cache: %s not exported (%s: %s)", self.name, type(e).__name__, e)
        raise Uncacheable(str(e)) from e
      try:
        _write(path, exported, out_tree)
      except Exception as e:  # noqa: BLE001 - a read-only / full / unreachable cache: keep going
        _log.info("trace cache: %s not written (%s)", path, e)
      self.exports += 1
    else:
      self.loads += 1

    def call(*dyn_args):
      flat = jax.tree.leaves(dyn_args)
      return jax.tree.unflatten(out_tree, exported.call(*flat))

    kw = {}
    if self._in_shardings is not _UNSPECIFIED:
      kw["in_shardings"] = self._in_shardings
    if self._out_shardings is not _UNSPECIFIED:
      kw["out_shardings"] = self._out_shardings
    donate = tuple(_dyn_index(i, self._static_argnums) for i in self._donate)
    return _Entry(jax.jit(call, donate_argnums=donate, **kw), loaded)

  def _export(self, statics, dyn, tree):
    static_args = {i: v for i, v in statics if isinstance(i, int)}
    static_kwargs = {k: v for k, v in statics if isinstance(k, str)}
    n_args = len(dyn) + len(static_args)
    holder = {}
    out_shardings = self._out_shardings
    fn = self.fn

    def flat_fn(*leaves):
      dyn_args = iter(jax.tree.unflatten(tree, leaves))
      args = [static_args[i] if i in static_args else next(dyn_args) for i in range(n_args)]
      out = fn(*args, **static_kwargs)
      if out_shardings is not _UNSPECIFIED and out_shardings is not None:
        out = jax.lax.with_sharding_constraint(out, out_shardings)
      out_leaves, holder["tree"] = jax.tree.flatten(out)
      return out_leaves

    specs = [_spec(x, s) for x, s in zip(jax.tree.leaves(dyn),
                                         _flat_shardings(self._in_shardings, dyn))]
    exported = jax.export.export(jax.jit(flat_fn))(*specs)
    out_tree = holder["tree"]
    if _rebuild(_describe(out_tree)) != out_tree:
      raise Uncacheable("output tree does not survive its JSON form")
    return exported, out_tree


def jit(fn: Callable | None = None, *, name: str | None = None, **kwargs) -> Any:
  """`jax.jit` (as a decorator too) with its traces kept in the trace cache: `CachedJit`."""
  if fn is None:
    return functools.partial(jit, name=name, **kwargs)
  cached = CachedJit(fn, name=name or fn.__name__, **kwargs)
  functools.update_wrapper(cached, fn)
  return cached


def _hashable(v):
  try:
    hash(v)
    return v
  except TypeError:
    return fingerprint(v)


def _dyn_index(i: int, static_argnums: Sequence[int]) -> int:
  return i - sum(1 for s in static_argnums if s < i)


def _flat_shardings(prefix, dyn, own: bool = True) -> list:
  """One sharding (or None) per leaf of `dyn`, from jit's in_shardings prefix tree; where that
  gives none, the leaf's own (`own=True`) or None."""
  leaves = jax.tree.leaves(dyn)
  if prefix is _UNSPECIFIED or prefix is None:
    return [getattr(x, "sharding", None) if own and isinstance(
        x, (jax.Array, jax.ShapeDtypeStruct)) else None for x in leaves]
  if isinstance(prefix, jax.sharding.Sharding):
    return [prefix] * len(leaves)
  is_spec = lambda x: x is None or isinstance(x, jax.sharding.Sharding)  # noqa: E731
  per_prefix_leaf = jax.tree.map(
      lambda s, sub: [(s, x) for x in jax.tree.leaves(sub)], tuple(prefix), tuple(dyn),
      is_leaf=is_spec)
  pairs = [p for group in jax.tree.leaves(per_prefix_leaf, is_leaf=lambda x: isinstance(x, list))
           for p in group]
  assert len(pairs) == len(leaves)
  return [s if s is not None else (getattr(x, "sharding", None) if own and isinstance(
      x, (jax.Array, jax.ShapeDtypeStruct)) else None) for s, x in pairs]


def _spec(x, sharding) -> jax.ShapeDtypeStruct:
  if sharding is None and isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    sharding = getattr(x, "sharding", None)
  if isinstance(x, (bool, int, float, complex)):
    return jax.ShapeDtypeStruct((), jax.dtypes.canonicalize_dtype(type(x)), weak_type=True,
                                sharding=sharding)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding,
                              weak_type=bool(getattr(x, "weak_type", False)))


def _shardings_text(shardings) -> str:
  if shardings is _UNSPECIFIED:
    return "unspecified"
  leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return repr([_sharding_text(s) if isinstance(s, jax.sharding.Sharding) else repr(s)
               for s in leaves]) + str(jax.tree.structure(
                   shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))


def _read(path: epath.Path):
  try:
    blob = path.with_suffix(".jaxexp").read_bytes()
    out = json.loads(path.with_suffix(".json").read_text())
    return jax.export.deserialize(bytearray(blob)), _rebuild(out)
  except Exception:  # noqa: BLE001 - a missing, partial or foreign entry is re-exported
    return None, None


def _write(path: epath.Path, exported, out_tree) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  for suffix, data in ((".json", json.dumps(_describe(out_tree)).encode()),
                       (".jaxexp", bytes(exported.serialize()))):
    tmp = path.with_suffix(f"{suffix}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path.with_suffix(suffix))   # whole entries only (a rename on local disks)
