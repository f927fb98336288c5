"""A parameter pytree -> the named 2-D matrices the geometry diagnostics analyse.

Orientation, fixed once here
----------------------------
Every matrix is handed out in our storage orientation, **(in, out)**: a Flax kernel maps
`y = x @ K`, so rows index input features. A PyTorch `nn.Linear` weight W is stored (out, in)
with `y = W x`, so `K = W.T`, and the paper's "right singular vectors" (the input side) of W are
the **left** singular vectors of K. `oriented(A, side)` is the one helper that resolves this: its
rows index the requested side, so the left singular vectors of `oriented(A, side)` are that
side's singular vectors. Every module here (endpoint angles, trajectory Sim_K, subspace bases)
goes through it.

Layout (see `opd_jax/models/transformer.py`): stacked `[L, ...]` kernels are split per layer.

  ==========  =====================================  ====================================
  type        params path                            matrix (in, out)
  ==========  =====================================  ====================================
  q, k, v     layers/attn/{q,k,v}_proj/kernel[l]     [D, H*h] / [D, K*h]
  o           layers/attn/o_proj/kernel[l]           [H*h, D]
  gate, up    layers/mlp/{gate,up}_proj/kernel[l]    [D, F]
  down        layers/mlp/down_proj/kernel[l]         [F, D]
  embed       embed/embedding                        [V, D]  (as stored; see below)
  lm_head     lm_head/kernel (untied only)           [D, V]
  router      layers/mlp/router/kernel[l]            [D, E]   (mixture of experts, qwen3_moe)
  expert_gate layers/mlp/experts/gate_proj/kernel    [D, Fe]  one matrix per (layer l, expert e)
  expert_up   layers/mlp/experts/up_proj/kernel      [D, Fe]  of the [L, E, in, out] leaf,
  expert_down layers/mlp/experts/down_proj/kernel    [Fe, D]  named layers.l.mlp.experts.e.*_proj
  ==========  =====================================  ====================================

Expert leaves are stacked on two axes ([L, E, in, out]; [E, in, out] outside `layers`): their
group has L * E members, layer-major (member i is layer i // E, expert i % E; see
`MatrixGroup.member_layer` / `member_expert`), so every per-matrix metric is per expert and the
per-type aggregates (expert_gate, expert_up, expert_down, router) pool the experts of all layers.

The embedding is taken **as stored, [V, D]**, read as (in, out) like every other leaf: as an
input layer it maps a one-hot token (V) to a hidden vector (D), so its "input side" is the
vocabulary axis. (The paper's tooling reads every PyTorch 2-D tensor as (out, in), which for the
embedding swaps the two sides; every side-symmetric metric -- sparsity, NSS, masks, the per-matrix
maximum angle over both sides -- is unaffected, only the `in`/`out` labels of the embedding's
angles swap.) A tied model has no separate lm_head matrix.

1-D parameters (norm scales, q/k/v biases; stacked per layer) are `Matrix` objects of type
'norm' / 'bias' with a 1-D array; they only enter sparsity (`include_1d=True`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

MATRIX_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "router",
                "expert_gate", "expert_up", "expert_down")
EXPERT_TYPES = ("expert_gate", "expert_up", "expert_down")
VECTOR_TYPES = ("norm", "bias")
SIDES = ("input", "output")
ATTENTION_TYPES = ("q", "k", "v", "o")

# module name in our params -> module type
_MODULE_TYPE = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down", "embed": "embed", "lm_head": "lm_head",
                "router": "router"}
# module name under an `experts` module -> module type (stacked [E, in, out] kernels)
_EXPERT_TYPE = {"gate_proj": "expert_gate", "up_proj": "expert_up", "down_proj": "expert_down"}
_MATRIX_LEAVES = ("kernel", "embedding")


# -- the one orientation helper -----------------------------------------------------------------
def oriented(array, side: str):
  """`array` (..., in, out) with its rows indexing `side` ('input' or 'output').

  The left singular vectors of the result are the `side` singular vectors of the matrix; for a
  PyTorch weight W (out, in) and our kernel K = W.T, `oriented(K, 'input')` is K and its left
  singular vectors are the right singular vectors of W (the paper's input side).
  """
  if side == "input":
    return array
  if side == "output":
    return array.swapaxes(-1, -2)
  raise ValueError(f"side={side!r}: expected one of {SIDES}")


def side_dims(shape: Sequence[int]) -> dict[str, int]:
  """{'input': in, 'output': out} of an (..., in, out) shape."""
  return {"input": int(shape[-2]), "output": int(shape[-1])}


def short_side(shape: Sequence[int]) -> str:
  """The side with fewer features ('input' on ties): the side whose Gram matrix is smallest."""
  return "input" if shape[-2] <= shape[-1] else "output"


# -- named matrices -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Matrix:
  """One named matrix (or 1-D vector) of a params pytree.

  `array` slices the stacked leaf lazily (a view for numpy leaves), so a list of `Matrix` holds no
  copies. 2-D arrays are (in, out); see the module docstring.
  """

  name: str
  module_type: str
  layer: int | None
  path: tuple[str, ...]
  leaf: Any = dataclasses.field(repr=False)
  expert: int | None = None  # expert index of a stacked-experts leaf

  @property
  def array(self):
    a = self.leaf if self.layer is None else self.leaf[self.layer]
    return a if self.expert is None else a[self.expert]

  @property
  def shape(self) -> tuple[int, ...]:
    s = tuple(self.leaf.shape)
    return s[(self.layer is not None) + (self.expert is not None):]

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def is_matrix(self) -> bool:
    return self.module_type in MATRIX_TYPES

  def side_dims(self) -> dict[str, int]:
    """{'input': in, 'output': out} (matrices only)."""
    return side_dims(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class MatrixGroup:
  """Same-shape matrices that share one (possibly stacked) leaf: batched together downstream."""

  module_type: str
  path: tuple[str, ...]
  leaf: Any = dataclasses.field(repr=False)
  stacked: bool
  names: tuple[str, ...]
  # Expert leaves: how many experts the leaf stacks (after the layer axis, if `layered`).
  n_experts: int | None = None
  layered: bool = True

  @property
  def n_lead(self) -> int:
    """Leading stacked axes of the leaf (0, 1 or 2)."""
    if self.n_experts is not None:
      return 1 + int(self.layered)
    return int(self.stacked)

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of one member."""
    return tuple(self.leaf.shape)[self.n_lead:]

  @property
  def count(self) -> int:
    return len(self.names)

  def member_layer(self, i: int) -> int | None:
    """The layer of member i (None for an unstacked leaf)."""
    if self.n_experts is not None:
      return i // self.n_experts if self.layered else None
    return i if self.stacked else None

  def member_expert(self, i: int) -> int | None:
    """The expert of member i (None outside stacked-experts leaves)."""
    return None if self.n_experts is None else i % self.n_experts

  def batch(self, start: int, stop: int):
    """Members [start, stop) stacked on a leading axis (a view for contiguous numpy leaves)."""
    if self.n_lead == 2:
      return self.leaf.reshape((-1,) + self.shape)[start:stop]
    if self.stacked:
      return self.leaf[start:stop]
    if (start, stop) != (0, 1):
      raise IndexError(f"{self.names[0]}: unstacked group has one member")
    return self.leaf[None]

  def members(self) -> list[Matrix]:
    if not self.stacked:
      return [Matrix(self.names[0], self.module_type, None, self.path, self.leaf)]
    return [Matrix(n, self.module_type, self.member_layer(i), self.path, self.leaf,
                   self.member_expert(i)) for i, n in enumerate(self.names)]


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaves_with_paths(params) -> list[tuple[tuple[str, ...], Any]]:
  import jax  # local: matrices.py is importable without initialising jax

  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    out.append((tuple(_key_str(k) for k in path), leaf))
  return out


def _classify(path: tuple[str, ...], leaf) -> tuple[str, bool]:
  """(module type, stacked) of a leaf of our layout; ValueError naming the path otherwise."""
  where = "/".join(path)
  stacked = len(path) > 0 and path[0] == "layers"
  ndim = len(leaf.shape)
  if path[-1] in _MATRIX_LEAVES:
    module = path[-2] if len(path) >= 2 else ""
    if len(path) >= 3 and path[-3] == "experts" and module in _EXPERT_TYPE:
      want = 4 if stacked else 3
      if ndim != want:
        raise ValueError(f"params leaf {where!r} has shape {tuple(leaf.shape)}: expected "
                         f"{'stacked experts [L, E, in, out]' if stacked else '[E, in, out]'}")
      return _EXPERT_TYPE[module], stacked
    if module not in _MODULE_TYPE:
      raise ValueError(f"params leaf {where!r}: unknown module {module!r}; expected one of "
                       f"{sorted(_MODULE_TYPE)} (our layout, see opd_jax/models/transformer.py; "
                       "split fused q/k/v first with geometry.matrices.split_fused_qkv)")
    want = 3 if stacked else 2
    if ndim != want:
      raise ValueError(f"params leaf {where!r} has shape {tuple(leaf.shape)}: expected a "
                       f"{'stacked [L, in, out]' if stacked else '2-D (in, out)'} array")
    return _MODULE_TYPE[module], stacked
  if path[-1] in ("scale", "bias"):
    want = 2 if stacked else 1
    if ndim != want:
      raise ValueError(f"params leaf {where!r} has shape {tuple(leaf.shape)}: expected "
                       f"{'[L, n]' if stacked else '1-D'}")
    return ("norm" if path[-1] == "scale" else "bias"), stacked
  raise ValueError(f"params leaf {where!r}: not part of our layout (leaves end in 'kernel', "
                   "'embedding', 'scale' or 'bias'; see opd_jax/models/transformer.py)")


def _name(path: tuple[str, ...], layer: int | None, module_type: str,
          expert: int | None = None) -> str:
  parts = list(path)
  if module_type in MATRIX_TYPES:
    parts = parts[:-1]  # drop 'kernel' / 'embedding'
  if expert is not None:  # ... experts.<e>.gate_proj
    at = len(parts) - 1 - parts[::-1].index("experts")
    parts = parts[:at + 1] + [str(expert)] + parts[at + 1:]
  if layer is not None:
    parts = [parts[0], str(layer)] + parts[1:]
  return ".".join(parts)


def matrix_groups(params, *, include_1d: bool = False, types: Sequence[str] | None = None
                  ) -> list[MatrixGroup]:
  """The (stacked) leaves of `params` as groups of same-shape named matrices.

  Args:
    params: our params dict, or a source `resolve_params` accepts (HF checkpoint dir, our
      checkpoint path).
    include_1d: also return norm scales and biases (types 'norm', 'bias').
    types: keep only these module types.
  """
  params = resolve_params(params)
  if types is not None:
    unknown = set(types) - set(MATRIX_TYPES + VECTOR_TYPES)
    if unknown:
      raise ValueError(f"types={tuple(types)}: unknown {sorted(unknown)}; valid: "
                       f"{MATRIX_TYPES + VECTOR_TYPES}")
  groups = []
  for path, leaf in _leaves_with_paths(params):
    mtype, stacked = _classify(path, leaf)
    if mtype in VECTOR_TYPES and not include_1d:
      continue
    if types is not None and mtype not in types:
      continue
    if mtype in EXPERT_TYPES:
      n_layers, n_experts = (leaf.shape[0], leaf.shape[1]) if stacked else (None, leaf.shape[0])
      layers = range(n_layers) if stacked else [None]
      names = tuple(_name(path, l, mtype, e) for l in layers for e in range(n_experts))
      groups.append(MatrixGroup(mtype, path, leaf, True, names, n_experts=int(n_experts),
                                layered=stacked))
      continue
    layers = range(leaf.shape[0]) if stacked else [None]
    names = tuple(_name(path, l, mtype) for l in layers)
    groups.append(MatrixGroup(mtype, path, leaf, stacked, names))
  return groups


def named_matrices(params, *, include_1d: bool = False, types: Sequence[str] | None = None
                   ) -> list[Matrix]:
  """Every matrix of `params` (our layout, or an HF / our checkpoint path), one per layer.

  Matrices come in params order (embed, layers by leaf then layer, lm_head ...); `Matrix.array`
  is (in, out) (see the module docstring for the embedding). 1-D parameters are included only
  with `include_1d=True`.
  """
  return [m for g in matrix_groups(params, include_1d=include_1d, types=types)
          for m in g.members()]


# -- loading ------------------------------------------------------------------------------------
def resolve_params(source) -> Mapping[str, Any]:
  """A params dict from a dict (returned as is), a Hugging Face checkpoint directory (one holding
  `config.json`; read with `opd_jax.models.hf.load`), or one of our checkpoint / snapshot paths
  (`opd_jax.train.checkpoint.load_params`)."""
  if isinstance(source, Mapping):
    return source
  if not isinstance(source, (str, os.PathLike)):
    raise TypeError(f"expected a params dict or a checkpoint path, got {type(source).__name__}")
  path = pathlib.Path(source)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
  if (path / "config.json").is_file():
    from opd_jax.models import hf  # imported only when a checkpoint directory is given

    return hf.load(path)[1]
  from opd_jax.train import checkpoint  # imported only when one of our checkpoints is given

  return checkpoint.load_params(path)


def describe_source(source) -> str:
  """A short label for a params source (a path, or 'params in memory')."""
  if isinstance(source, Mapping):
    return "params in memory"
  return str(source)


# -- fused q/k/v --------------------------------------------------------------------------------
QKV_LAYOUTS = ("concat", "interleaved")


def split_fused_qkv_array(array, *, n_heads: int, n_kv_heads: int, head_dim: int,
                          layout: str = "concat"):
  """Splits a fused q/k/v array on its last axis into (q, k, v).

  Works for kernels (..., in, (H + 2K) h) in our (in, out) orientation and for biases
  (..., (H + 2K) h).

  Layouts:
    'concat': [q (H h) | k (K h) | v (K h)] (Phi-3 `qkv_proj`, most fused GQA checkpoints).
    'interleaved': per head [q_i | k_i | v_i] (GPT-NeoX / BLOOM `query_key_value`); needs
      n_heads == n_kv_heads.
  A PyTorch fused weight (out, in) must be transposed to (in, out) first.
  """
  width = array.shape[-1]
  want = (n_heads + 2 * n_kv_heads) * head_dim
  if width != want:
    raise ValueError(f"fused qkv array of shape {tuple(array.shape)}: last axis {width} != "
                     f"(n_heads + 2 n_kv_heads) head_dim = {want}")
  if layout == "concat":
    q_w, kv_w = n_heads * head_dim, n_kv_heads * head_dim
    return (array[..., :q_w], array[..., q_w:q_w + kv_w], array[..., q_w + kv_w:])
  if layout == "interleaved":
    if n_heads != n_kv_heads:
      raise ValueError(f"layout='interleaved' needs n_heads == n_kv_heads (got {n_heads}, "
                       f"{n_kv_heads})")
    per = array.reshape(array.shape[:-1] + (n_heads, 3, head_dim))
    merge = lambda x: x.reshape(array.shape[:-1] + (n_heads * head_dim,))  # noqa: E731
    return merge(per[..., 0, :]), merge(per[..., 1, :]), merge(per[..., 2, :])
  raise ValueError(f"layout={layout!r}: expected one of {QKV_LAYOUTS}")


def split_fused_qkv(params, *, n_heads: int, n_kv_heads: int, head_dim: int,
                    fused_name: str = "qkv_proj", layout: str = "concat"):
  """A copy of a params pytree in which every `<fused_name>` module (a dict with 'kernel' and
  optionally 'bias') is replaced by `q_proj`, `k_proj`, `v_proj` modules (our layout).

  Example: a user tree `{'layers': {'attn': {'qkv_proj': {'kernel': [L, D, (H+2K)h]}, ...}}}`
  becomes `{'layers': {'attn': {'q_proj': {'kernel': [L, D, Hh]}, 'k_proj': ..., 'v_proj': ...}}}`.
  """
  if not isinstance(params, Mapping):
    return params
  out = {}
  for key, value in params.items():
    if key == fused_name and isinstance(value, Mapping):
      unknown = set(value) - {"kernel", "bias"}
      if unknown or "kernel" not in value:
        raise ValueError(f"fused module {fused_name!r} holds {sorted(value)}; expected 'kernel' "
                         "and optionally 'bias'")
      parts = {name: split_fused_qkv_array(value[name], n_heads=n_heads, n_kv_heads=n_kv_heads,
                                           head_dim=head_dim, layout=layout)
               for name in value}
      for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        if proj in params:
          raise ValueError(f"{proj!r} already exists next to {fused_name!r}")
        out[proj] = {name: parts[name][i] for name in parts}
    else:
      out[key] = split_fused_qkv(value, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                 head_dim=head_dim, fused_name=fused_name, layout=layout)
  return out

