"""LoRA and PiSSA adapters on chosen matrices of the decoder.

An adapted kernel K (our (in, out) orientation, `y = x @ K`, stacked `[L, in, out]`) becomes

    K_eff = K_base + scale * a @ b,    a: [..., in, r],  b: [..., r, out],  scale = alpha / r

which is PEFT's `W_eff = W + scale * B @ A` for the PyTorch weight W = K.T (out, in), with
`A = a.T` ([r, in], `lora_A.weight`) and `B = b.T` ([out, r], `lora_B.weight`).

Adapter tree. The adapters mirror the params dict: the module of an adapted kernel holds
`{'lora_a', 'lora_b'}` instead of `{'kernel'}`, e.g. `{'layers': {'attn': {'q_proj': {'lora_a':
[L, D, r], 'lora_b': [L, r, H*h]}}}}`. Their logical axes are the kernel's, with the rank axis
unsharded (`lora_a`: (layers, in, None), `lora_b`: (layers, None, out)), so adapters shard like
the matrices they adapt.

Targets. `LoraConfig.targets` is a regular expression searched (`re.search`) in the matrix names
of `geometry.matrices` (`layers.3.attn.q_proj`, `layers.0.mlp.down_proj`, `lm_head`), so
`q_proj|v_proj` adapts every layer's q and v. Layers are stacked, so a pattern must select a
matrix in every layer or in none; embeddings, routers and stacked experts are not adaptable.

Initialisation (`init`):
  'lora'   a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default kaiming-uniform with a=sqrt(5)), b = 0:
           the adapted model is exactly the base at step 0.
  'pissa'  from the top-r singular triplets of the base kernel K = U S V^T (PEFT's PiSSA):
           a = U_r sqrt(S_r / scale), b = sqrt(S_r / scale) V_r^T, and the base keeps the residual
           K_res = K - scale * a @ b; K_res + scale * a @ b equals K up to float round-off.

Forward: the steps, the sampler and the scorers run the unchanged model on merged parameters
(`merge`, once per step or per rollout). Why merged rather than `x @ a @ b` beside `x @ K`: the
model code (scan over stacked layers, the dense layer's custom VJP, KV-cache decode, chunked
scoring) stays one code path, decode reads one matrix per layer, and the merge costs
`in * out * r` per matrix per call (its backward the same), small next to the forward's
`tokens * in * out` whenever r << tokens. The cost is one full-size K_eff and its gradient alive
during a step (full fine-tuning holds those too, plus two Adam moments; here Adam holds moments
for the adapters only). Adapter dropout needs the unmerged form and is therefore not offered
(`LoraConfig.dropout` must be 0).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from opd_jax.errors import UserError
from opd_jax.geometry import matrices

INITS = ("lora", "pissa")
# Matrix types of `geometry.matrices` an adapter may target.
ADAPTABLE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
ADAPTER_LEAVES = ("lora_a", "lora_b")
DEFAULT_TARGETS = r"q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"

Params = dict[str, Any]


class LoraTargetError(UserError, ValueError):
  """`lora.targets` selects nothing, a non-adaptable matrix, or only some layers of a stack."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters (module docstring).

  Attributes:
    rank: r, the adapter rank; 0 turns adapters off (full-parameter training).
    alpha: the scale numerator: K_eff = K + (alpha / r) a @ b (PEFT's lora_alpha).
    dropout: adapter-input dropout; only 0.0 (the merged forward cannot apply it).
    targets: regular expression searched in the matrix names (`layers.0.attn.q_proj`, ...).
    init: 'lora' (b = 0) or 'pissa' (top-r singular vectors, residual kept in the base).
    seed: seed of the 'lora' initialisation of `a`.
  """

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS
  init: str = "lora"
  seed: int = 0

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"LoraConfig.rank={self.rank}: must be >= 0 (0 = no adapters)")
    if not self.alpha > 0:
      raise ValueError(f"LoraConfig.alpha={self.alpha}: must be > 0")
    if self.dropout != 0.0:
      raise ValueError(f"LoraConfig.dropout={self.dropout}: adapters are merged into the kernels "
                       "for every forward (opd_jax.models.lora), which cannot drop the adapter "
                       "branch's inputs; only 0.0 is supported")
    if self.init not in INITS:
      raise ValueError(f"LoraConfig.init={self.init!r}; expected one of {INITS}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"LoraConfig.targets={self.targets!r} is not a regular expression: "
                       f"{e}") from e

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """alpha / r (the factor of a @ b in K_eff)."""
    return self.alpha / self.rank


# -- tree helpers ---------------------------------------------------------------------------------
def get_in(tree, path):
  """`tree[path[0]][path[1]]...`."""
  for p in path:
    tree = tree[p]
  return tree


def set_in(tree: dict, path, value) -> None:
  """Sets `tree[path[0]]...[path[-1]] = value`, creating intermediate dicts."""
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _copy_dicts(tree):
  """A copy of the nested dicts of `tree` (leaves shared), so leaves can be replaced."""
  if isinstance(tree, dict):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def adapter_modules(adapters) -> Iterator[tuple[tuple[str, ...], dict]]:
  """(module path, {'lora_a', 'lora_b'}) of every adapted module, in sorted path order."""
  def walk(node, path):
    if isinstance(node, dict) and set(node) == set(ADAPTER_LEAVES):
      yield path, node
      return
    for k in sorted(node):
      yield from walk(node[k], path + (k,))
  yield from walk(adapters, ())


# -- targets, shapes, logical axes ----------------------------------------------------------------
def target_paths(params, cfg: LoraConfig) -> tuple[tuple[str, ...], ...]:
  """Kernel paths (e.g. ('layers', 'attn', 'q_proj', 'kernel')) that `cfg.targets` selects in
  `params` (arrays or ShapeDtypeStructs). LoraTargetError names what is wrong."""
  pattern = re.compile(cfg.targets)
  out, names = [], []
  for group in matrices.matrix_groups(params):
    names.extend(group.names[:1])
    hits = [n for n in group.names if pattern.search(n)]
    if not hits:
      continue
    if group.module_type not in ADAPTABLE_TYPES:
      raise LoraTargetError(
          f"lora.targets={cfg.targets!r} matches {hits[0]!r}, a {group.module_type!r} matrix; "
          f"adapters go on {ADAPTABLE_TYPES} matrices only")
    if len(hits) != len(group.names):
      raise LoraTargetError(
          f"lora.targets={cfg.targets!r} matches {len(hits)} of the {len(group.names)} layers of "
          f"{'/'.join(group.path)} (e.g. {hits[0]!r}); layers are stacked, so a matrix is adapted "
          "in every layer or in none")
    out.append(tuple(group.path))
  if not out:
    raise LoraTargetError(f"lora.targets={cfg.targets!r} matches none of the model's matrices "
                          f"(names look like {names[:4]})")
  for path in out:
    shape = get_in(params, path).shape
    if cfg.rank > min(shape[-2:]):
      raise LoraTargetError(f"lora.rank={cfg.rank} exceeds min(in, out)={min(shape[-2:])} of "
                            f"{'/'.join(path)} {tuple(shape)}")
  return tuple(out)


def _shapes(kernel_shape, rank: int):
  lead, (d_in, d_out) = tuple(kernel_shape[:-2]), tuple(kernel_shape[-2:])
  return lead + (d_in, rank), lead + (rank, d_out)


def abstract_adapters(model_cfg, cfg: LoraConfig) -> Params:
  """ShapeDtypeStructs of the adapters of `model_cfg` (nothing allocated)."""
  from opd_jax.models import transformer
  abstract = transformer.abstract_params(model_cfg)
  tree: dict = {}
  for path in target_paths(abstract, cfg):
    kernel = get_in(abstract, path)
    a_shape, b_shape = _shapes(kernel.shape, cfg.rank)
    set_in(tree, path[:-1], {"lora_a": jax.ShapeDtypeStruct(a_shape, kernel.dtype),
                           "lora_b": jax.ShapeDtypeStruct(b_shape, kernel.dtype)})
  return tree


def adapter_logical_axes(kernel_axes) -> dict[str, tuple]:
  """Logical axes of one module's adapters from its kernel's: the rank axis is unsharded."""
  names = tuple(kernel_axes)
  return {"lora_a": names[:-1] + (None,), "lora_b": names[:-2] + (None, names[-1])}


def logical_axes(model_cfg, cfg: LoraConfig) -> Params:
  """Logical axis names of the adapters, in the adapter-tree structure."""
  from opd_jax.models import transformer
  kernels = transformer.logical_axes(model_cfg)
  tree: dict = {}
  for path in target_paths(transformer.abstract_params(model_cfg), cfg):
    set_in(tree, path[:-1], adapter_logical_axes(get_in(kernels, path)))
  return tree


# -- init and merge -------------------------------------------------------------------------------
def pissa_factors(kernel, rank: int, scale: float):
  """(a, b, residual) of PiSSA for a kernel [..., in, out]: the top-`rank` singular triplets of
  K = U S V^T give a = U_r sqrt(S_r / scale), b = sqrt(S_r / scale) V_r^T, and the residual
  K - scale * a @ b (computed in float32, returned in the kernel's dtype)."""
  k = kernel.astype(jnp.float32)
  u, s, vt = jnp.linalg.svd(k, full_matrices=False)
  root = jnp.sqrt(s[..., :rank] / scale)
  a = u[..., :, :rank] * root[..., None, :]
  b = root[..., :, None] * vt[..., :rank, :]
  residual = k - scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return a.astype(kernel.dtype), b.astype(kernel.dtype), residual.astype(kernel.dtype)


def init(params: Params, cfg: LoraConfig) -> tuple[Params, Params]:
  """(adapters, base) for full `params` (pure; jit it with out_shardings to place them).

  'lora': the base is `params` itself. 'pissa': the adapted kernels of the base are replaced by
  their residuals (module docstring), so merge(base, adapters) == params up to round-off.
  """
  if not cfg.enabled:
    raise ValueError("lora.init needs LoraConfig.rank > 0")
  key = jax.random.key(cfg.seed)
  adapters: dict = {}
  base = _copy_dicts(params)
  for i, path in enumerate(target_paths(params, cfg)):
    kernel = get_in(params, path)
    if cfg.init == "lora":
      a_shape, b_shape = _shapes(kernel.shape, cfg.rank)
      bound = 1.0 / float(kernel.shape[-2]) ** 0.5
      a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
      a, b = a.astype(kernel.dtype), jnp.zeros(b_shape, kernel.dtype)
    else:
      a, b, residual = pissa_factors(kernel, cfg.rank, cfg.scale)
      set_in(base, path, residual)
    set_in(adapters, path[:-1], {"lora_a": a, "lora_b": b})
  return adapters, base


def delta(module: dict, scale: float):
  """scale * a @ b of one module's adapters ([..., in, out], float32 accumulation)."""
  return scale * jnp.matmul(module["lora_a"].astype(jnp.float32),
                            module["lora_b"].astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)


def merge(base: Params, adapters: Params, scale: float) -> Params:
  """Full params with K_eff = K_base + scale * a @ b on every adapted kernel (differentiable in
  `adapters`; the other leaves are `base`'s)."""
  out = _copy_dicts(base)
  for path, module in adapter_modules(adapters):
    kernel = get_in(base, path + ("kernel",))
    set_in(out, path + ("kernel",),
         (kernel.astype(jnp.float32) + delta(module, scale)).astype(kernel.dtype))
  return out


def pissa_to_lora(adapters: Params, initial: Params, cfg: LoraConfig
                  ) -> tuple[Params, LoraConfig]:
  """A PiSSA run's update as a plain LoRA adapter on the ORIGINAL base (PEFT's PiSSA conversion).

  With K_res = K - s a0 b0 (`initial` = the adapters at init), K_res + s a b = K + s (a b - a0 b0)
  = K + s [a, -a0] @ [b; b0]: rank 2r, and alpha 2 alpha keeps the scale s. Returns (adapters of
  rank 2r, their LoraConfig).
  """
  out: dict = {}
  for path, module in adapter_modules(adapters):
    init_module = get_in(initial, path)
    set_in(out, path, {
        "lora_a": jnp.concatenate([module["lora_a"], -init_module["lora_a"]], axis=-1),
        "lora_b": jnp.concatenate([module["lora_b"], init_module["lora_b"]], axis=-2)})
  return out, dataclasses.replace(cfg, rank=2 * cfg.rank, alpha=2 * cfg.alpha, init="lora")


def count(tree) -> int:
  """Number of array elements in a tree."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))
