"""Hugging Face interop: `config.json` <-> `ModelConfig`, safetensors checkpoints <-> params.

    cfg = config_from_hf("/ckpt/Qwen3-0.6B")                 # or a config dict
    cfg, params = load("/ckpt/Qwen3-0.6B", mesh=mesh)        # each tensor placed with its sharding
    save("/out/student", cfg, params, tokenizer=tok)         # loads with AutoModelForCausalLM

Supported `model_type`s: qwen3, qwen2, llama, qwen3_moe (their `*ForCausalLM` architectures).
Weights are read and written with `safetensors` in numpy form only: never pickle, never
`trust_remote_code`.

Name mapping (PyTorch weights are (out, in); our kernels are (in, out), so kernels are transposed;
per-layer tensors are stacked on a leading `layers` axis)::

    model.embed_tokens.weight                         embed/embedding
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  layers/attn/{q,k,v,o}_proj/kernel   (T)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias      layers/attn/{q,k,v}_proj/bias       (qwen2)
    model.layers.{i}.self_attn.{q,k}_norm.weight      layers/attn/{q,k}_norm/scale        (qwen3)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   layers/mlp/{gate,up,down}_proj/kernel (T)
    model.layers.{i}.mlp.gate.weight                  layers/mlp/router/kernel (T)     (qwen3_moe)
    model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
                                       layers/mlp/experts/{gate,up,down}_proj/kernel[i, e] (T)
    model.layers.{i}.input_layernorm.weight           layers/input_norm/scale
    model.layers.{i}.post_attention_layernorm.weight  layers/post_attn_norm/scale
    model.norm.weight                                 final_norm/scale
    lm_head.weight                                    lm_head/kernel (T)                  (untied)

Choices not fixed by transformers:
  * dtypes: `config_from_hf` gives float32 parameters (master weights: a 1e-6 learning rate is
    invisible in bf16 storage) and a compute dtype of bfloat16 when `config.json`'s `dtype` is
    bfloat16 or float16, float32 otherwise. `load(..., dtype=)` or `cfg.replace` override either.
  * tied checkpoints may or may not contain `lm_head.weight`; when present it must equal
    `model.embed_tokens.weight` exactly. `*.rotary_emb.inv_freq` buffers (old Llama exports) are
    ignored; any other unknown tensor is an error.
  * sharding: on a mesh, each parameter gets `NamedSharding(mesh, logical_to_spec(logical axes,
    rules))`; a mesh axis that does not divide a dimension is dropped for that dimension (that
    dimension is replicated, with a warning) rather than failing.
  * `save` writes tensors in the parameter dtype, `config.json`'s `dtype` says which.
  * special-token ids: `config_from_hf` / `load` keep config.json's `bos_token_id`,
    `eos_token_id` (an int or a list) and `pad_token_id` on the `ModelConfig` (metadata fields
    that change no math), and `save` writes them back to config.json and to a
    generation_config.json (`GenerationConfig.from_model_config`, the file transformers'
    `save_pretrained` writes for every *ForCausalLM), with or without a tokenizer. A tokenizer
    passed to `save` wins for each id it defines (its ids are the ones generation will see; a
    disagreement with the config's is logged), except that a config's list of eos ids is kept
    when it contains the tokenizer's eos (Llama-3-Instruct style several stop tokens).
  * qwen3_moe: experts are per-expert tensors on disk, as transformers 5's `save_pretrained` writes
    them and as the Qwen3-MoE hub checkpoints hold them (transformers fuses them into
    `experts.gate_up_proj` [E, 2F, D] / `experts.down_proj` only in memory). Only every-layer-sparse
    models are supported (`decoder_sparse_step=1`, no `mlp_only_layers`: Qwen3-30B-A3B and
    Qwen3-235B-A22B); others are rejected by name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from opd_jax.errors import UserError
from opd_jax.models import transformer
from opd_jax.models.config import ModelConfig
from opd_jax.models.sharding import DEFAULT_RULES, current_rules, logical_to_spec


class HFCheckpointError(UserError, ValueError):
  """A Hugging Face checkpoint directory we cannot read as asked (names the file and field)."""


log = logging.getLogger(__name__)

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
SUPPORTED = tuple(ARCHITECTURES)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Fields of ModelConfig that define the weights; the rest (dtypes, scan, remat) are free to differ.
ARCH_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "d_ff", "rope_theta", "rope_type", "rope_factor", "rope_low_freq_factor",
               "rope_high_freq_factor", "rope_original_max_position", "rms_eps", "tie_embeddings",
               "qk_norm", "qkv_bias", "num_experts", "experts_per_token", "moe_d_ff",
               "norm_topk_prob")
_MAX_LISTED = 12
# config.json's special-token ids, kept on ModelConfig (metadata, not architecture).
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
GENERATION_CONFIG_FILE = "generation_config.json"


# -- config.json <-> ModelConfig -------------------------------------------------------------------
def _hf_config(source) -> tuple[Any, str]:
  """A transformers config object from a directory, a config.json path, a dict or a config."""
  import transformers  # noqa: PLC0415 (heavy import, only needed here)

  file, is_config = None, hasattr(source, "to_dict") and hasattr(source, "model_type")
  if is_config:
    raw, where = {"model_type": source.model_type}, f"config object {type(source).__name__}"
  elif isinstance(source, Mapping):
    raw, where = dict(source), "config dict"
  else:
    path = pathlib.Path(source)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
      raise FileNotFoundError(f"no config.json at {file}")
    where = str(file)
    try:
      raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
      raise HFCheckpointError(f"{file}: not valid JSON ({e})") from e
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED:
    raise HFCheckpointError(f"{where}: unsupported model_type {model_type!r}; supported model types: "
                     f"{', '.join(SUPPORTED)}")
  if is_config:
    return source, where
  try:
    if file is not None and file.name == "config.json":
      hf = transformers.AutoConfig.from_pretrained(str(file.parent), trust_remote_code=False,
                                                   local_files_only=True)
    else:  # a dict (or a file under another name): what from_pretrained's from_dict does
      hf = transformers.AutoConfig.for_model(
          model_type, **{k: v for k, v in raw.items() if k != "model_type"})
  except Exception as e:  # transformers' validation errors name the field; keep them, add where.
    raise HFCheckpointError(f"{where}: transformers rejected the config: {e}") from e
  return hf, where


def _dtype_name(dtype) -> str | None:
  return None if dtype is None else str(dtype).replace("torch.", "")


def config_from_hf(source, **overrides) -> ModelConfig:
  """`ModelConfig` from a checkpoint directory, a config.json path, a dict or a transformers config.

  Reads with `transformers.AutoConfig` (local files only, never remote code), so transformers'
  defaults apply to absent fields (e.g. qwen3's `head_dim`; `head_dim` otherwise defaults to
  hidden_size / num_attention_heads). `overrides` are applied with `ModelConfig.replace`.
  The config's bos / eos / pad token ids (as transformers reads them, its defaults included) are
  kept on the result for `save`. Unsupported features raise a ValueError naming the field.
  """
  hf, where = _hf_config(source)
  family = hf.model_type

  def bad(field, why):
    raise HFCheckpointError(f"{where}: {field}={getattr(hf, field, None)!r}: {why}")

  archs = getattr(hf, "architectures", None) or []
  for arch in archs:
    if arch != ARCHITECTURES[family]:
      bad("architectures", f"unsupported architecture {arch!r}; supported: "
          f"{', '.join(ARCHITECTURES.values())}")
  if getattr(hf, "hidden_act", "silu") != "silu":
    bad("hidden_act", "only 'silu' (SwiGLU) is supported")
  if family in ("qwen3", "llama", "qwen3_moe") and getattr(hf, "attention_bias", False):
    bad("attention_bias", f"{family} with attention biases (incl. o_proj) is not supported")
  if family == "llama" and getattr(hf, "mlp_bias", False):
    bad("mlp_bias", "MLP biases are not supported")
  if getattr(hf, "use_sliding_window", False):
    bad("use_sliding_window", "sliding-window attention is not supported")
  layer_types = getattr(hf, "layer_types", None) or []
  if any(t != "full_attention" for t in layer_types):
    bad("layer_types", "only 'full_attention' layers are supported")
  rope = dict(getattr(hf, "rope_parameters", None) or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    bad("rope_parameters", f"unsupported rope_type {rope_type!r}; supported: 'default', "
        "'linear', 'llama3'")
  rope_kw = {}
  if rope_type in ("linear", "llama3"):
    rope_kw["rope_factor"] = float(rope.get("factor", 1.0))
  if rope_type == "llama3":
    absent = [k for k in ("low_freq_factor", "high_freq_factor",
                          "original_max_position_embeddings") if rope.get(k) is None]
    if absent:
      bad("rope_parameters", f"rope_type 'llama3' needs {', '.join(absent)}")
    rope_kw.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_position=int(rope["original_max_position_embeddings"]))
  moe_kw = {}
  if family == "qwen3_moe":
    if not getattr(hf, "num_experts", 0):
      bad("num_experts", "qwen3_moe without experts is not supported (use model_type qwen3)")
    if getattr(hf, "decoder_sparse_step", 1) != 1:
      bad("decoder_sparse_step", "only 1 (a sparse MLP in every layer) is supported: the stacked "
          "layer layout needs identical layers")
    if list(getattr(hf, "mlp_only_layers", None) or []):
      bad("mlp_only_layers", "only [] (a sparse MLP in every layer) is supported: the stacked "
          "layer layout needs identical layers")
    moe_kw = dict(num_experts=int(hf.num_experts), experts_per_token=int(hf.num_experts_per_tok),
                  moe_d_ff=int(hf.moe_intermediate_size),
                  norm_topk_prob=bool(hf.norm_topk_prob),
                  router_aux_loss_coef=float(getattr(hf, "router_aux_loss_coef", 0.001)))
  n_heads = hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
  compute = "bfloat16" if _dtype_name(getattr(hf, "dtype", None)) in ("bfloat16",
                                                                       "float16") else "float32"
  try:
    cfg = ModelConfig(
        family=family, vocab_size=hf.vocab_size, d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or n_heads, head_dim=head_dim,
        d_ff=hf.intermediate_size, rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_type=rope_type, **rope_kw,
        rms_eps=float(hf.rms_norm_eps), tie_embeddings=bool(hf.tie_word_embeddings),
        qk_norm=family in ("qwen3", "qwen3_moe"), qkv_bias=family == "qwen2",
        max_position=int(hf.max_position_embeddings), param_dtype="float32", dtype=compute,
        **moe_kw, **{k: getattr(hf, k, None) for k in TOKEN_ID_FIELDS})
  except ValueError as e:  # ModelConfig's check names the field; add the source
    raise HFCheckpointError(f"{where}: {e}") from e
  return cfg.replace(**overrides) if overrides else cfg


def _check_expressible(cfg: ModelConfig) -> None:
  want = {"qwen3": (True, False), "qwen2": (False, True), "llama": (False, False),
          "qwen3_moe": (True, False)}[cfg.family]
  if (cfg.qk_norm, cfg.qkv_bias) != want:
    raise ValueError(f"ModelConfig(family={cfg.family!r}, qk_norm={cfg.qk_norm}, "
                     f"qkv_bias={cfg.qkv_bias}) has no transformers equivalent; {cfg.family} "
                     f"needs qk_norm={want[0]}, qkv_bias={want[1]}")


def config_to_hf(cfg: ModelConfig) -> dict:
  """A `config.json` dict from which `AutoModelForCausalLM` builds the same model.

  `dtype` is the parameter dtype (the dtype `save` writes tensors in). The token ids the config
  carries (not None) are written too; a tuple of eos ids as a list.
  """
  _check_expressible(cfg)
  rope = {"rope_type": cfg.rope_type, "rope_theta": float(cfg.rope_theta)}
  if cfg.rope_type in ("linear", "llama3"):
    rope["factor"] = float(cfg.rope_factor)
  if cfg.rope_type == "llama3":
    rope.update(low_freq_factor=float(cfg.rope_low_freq_factor),
                high_freq_factor=float(cfg.rope_high_freq_factor),
                original_max_position_embeddings=int(cfg.rope_original_max_position))
  out = {
      "architectures": [ARCHITECTURES[cfg.family]], "model_type": cfg.family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.rms_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
      "dtype": cfg.param_dtype, "use_cache": True,
  }
  if cfg.family in ("qwen3", "llama", "qwen3_moe"):
    out["attention_bias"] = False
  if cfg.family == "qwen3_moe":
    out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
               moe_intermediate_size=cfg.moe_d_ff, norm_topk_prob=cfg.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=[],
               router_aux_loss_coef=float(cfg.router_aux_loss_coef), output_router_logits=False)
  if cfg.family == "llama":
    out["mlp_bias"] = False
  else:
    out["use_sliding_window"] = False
  for key in TOKEN_ID_FIELDS:
    value = getattr(cfg, key)
    if value is not None:
      out[key] = list(value) if isinstance(value, tuple) else value
  return out


def _token_ids_with_tokenizer(cfg: ModelConfig, tokenizer) -> dict:
  """The bos / eos / pad ids `save` writes: the config's, each replaced by the tokenizer's when the
  tokenizer defines it, except that a config list of eos ids containing the tokenizer's eos is
  kept. Where a replaced config id differs from the tokenizer's, a warning names both."""
  ids = {key: getattr(cfg, key) for key in TOKEN_ID_FIELDS}
  for key in TOKEN_ID_FIELDS:
    tok_id = getattr(tokenizer, key, None)
    if tok_id is None:
      continue
    tok_id, have = int(tok_id), ids[key]
    if isinstance(have, tuple) and tok_id in have:
      continue
    if have is not None and have != tok_id:
      log.warning("hf.save: the tokenizer's %s=%d replaces the model config's %r", key, tok_id,
                  have)
    ids[key] = tok_id
  return ids


def generation_config_json(config: Mapping[str, Any]) -> str:
  """The generation_config.json text transformers' `save_pretrained` writes for a *ForCausalLM
  with this `config.json` dict (`GenerationConfig.from_model_config`: its bos / eos / pad ids,
  no sampling settings)."""
  import transformers  # noqa: PLC0415 (heavy import, only needed here)

  hf_config = transformers.AutoConfig.for_model(
      config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
  return transformers.GenerationConfig.from_model_config(hf_config).to_json_string(
      use_diff=True, keys_to_pop=["compile_config"])


def check_tokenizer(cfg: ModelConfig, tokenizer) -> None:
  """A tokenizer whose ids do not all fit in the embedding table is an error naming both sizes.

  (A smaller tokenizer is fine: Qwen pads vocab_size beyond len(tokenizer).)
  """
  n = len(tokenizer)
  if n > cfg.vocab_size:
    raise HFCheckpointError(f"tokenizer/vocab mismatch: len(tokenizer)={n} (incl. added tokens) > "
                     f"model vocab_size={cfg.vocab_size}; token ids >= {cfg.vocab_size} have "
                     f"no embedding")


# -- parameter <-> tensor-name mapping ------------------------------------------------------------
class _Spec(NamedTuple):
  path: tuple[str, ...]  # path in the params dict
  name: str  # HF tensor name; '{i}' marks a per-layer tensor stacked on axis 0, '{e}' a
  # per-expert tensor stacked on the next axis
  transpose: bool  # HF (out, in) vs our (in, out)
  shape: tuple[int, ...]  # our (stacked) shape

  @property
  def layered(self) -> bool:
    return "{i}" in self.name

  @property
  def per_expert(self) -> bool:
    return "{e}" in self.name

  @property
  def n_stacked(self) -> int:
    """Leading stacked axes (layers, experts) of our shape that are separate tensors on disk."""
    return int(self.layered) + int(self.per_expert)

  def hf_shape(self) -> tuple[int, ...]:
    shape = self.shape[self.n_stacked:]
    return tuple(reversed(shape)) if self.transpose else tuple(shape)

  def hf_names(self, n_layers: int) -> list[str]:
    """Names in storage order (layer-major, then expert)."""
    if not self.layered:
      return [self.name]
    if not self.per_expert:
      return [self.name.format(i=i) for i in range(n_layers)]
    return [self.name.format(i=i, e=e) for i in range(n_layers) for e in range(self.shape[1])]


_TOP = {("embed", "embedding"): ("model.embed_tokens.weight", False),
        ("final_norm", "scale"): ("model.norm.weight", False),
        ("lm_head", "kernel"): ("lm_head.weight", True)}
_MODULE = {"attn": "self_attn", "input_norm": "input_layernorm",
           "post_attn_norm": "post_attention_layernorm", "router": "gate",
           "experts": "experts.{e}"}
_LEAF = {"kernel": ("weight", True), "bias": ("bias", False), "scale": ("weight", False)}


@functools.lru_cache(maxsize=32)
def _specs(cfg: ModelConfig) -> tuple[_Spec, ...]:
  """One spec per parameter leaf (in `jax.tree` order), from abstract shapes."""
  abstract = transformer.abstract_params(cfg)
  out = []
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    path = tuple(k.key for k in keypath)
    if path[0] == "layers":
      leaf_name, transpose = _LEAF[path[-1]]
      module = ".".join(_MODULE.get(p, p) for p in path[1:-1])
      name = f"model.layers.{{i}}.{module}.{leaf_name}"
    else:
      name, transpose = _TOP[path]
    out.append(_Spec(path, name, transpose, tuple(leaf.shape)))
  return tuple(out)


def _path_str(path) -> str:
  return "params" + "".join(f"[{p!r}]" for p in path)


def _listing(names) -> str:
  names = list(names)
  more = f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return f"({len(names)}): " + ", ".join(names[:_MAX_LISTED]) + more


# -- reading --------------------------------------------------------------------------------------
class _Checkpoint:
  """Tensor name -> safetensors file of a checkpoint directory (single file or sharded index)."""

  def __init__(self, directory: pathlib.Path, stack: contextlib.ExitStack):
    self.dir = directory
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.is_file():
      files = {SINGLE_FILE: None}
    elif index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFCheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from e
      files = {}
      for name, file in weight_map.items():
        files.setdefault(file, []).append(name)
    else:
      pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
          p.name for p in directory.glob("*.pt*"))
      hint = (f" (found pickle files {pickles}: they are never loaded; convert them to "
              "safetensors)" if pickles else "")
      raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    self.where: dict[str, str] = {}
    self._handles = {}
    for file, listed in files.items():
      path = directory / file
      if not path.is_file():
        raise FileNotFoundError(f"{index}: shard {file} is missing; it should hold "
                                f"{_listing(sorted(listed))}")
      handle = stack.enter_context(safe_open(str(path), framework="np"))
      self._handles[file] = handle
      present = set(handle.keys())
      if listed is not None:
        absent = sorted(set(listed) - present)
        if absent:
          raise HFCheckpointError(f"{index} lists tensors that {file} does not contain: "
                           f"{_listing(absent)}")
      for name in (present if listed is None else listed):
        self.where[name] = file

  def slice(self, name: str):
    return self._handles[self.where[name]].get_slice(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self.slice(name).get_dtype()

  def file_of(self, name: str) -> str:
    return str(self.dir / self.where[name])


def _validate(ckpt: _Checkpoint, cfg: ModelConfig, specs: tuple[_Spec, ...]) -> None:
  expected = {}
  for s in specs:
    for name in s.hf_names(cfg.n_layers):
      expected[name] = s.hf_shape()
  optional = {}
  if cfg.tie_embeddings:
    optional["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
  present = set(ckpt.where)
  missing = [n for n in expected if n not in present]
  unexpected = sorted(n for n in present - set(expected) - set(optional)
                      if not n.endswith("rotary_emb.inv_freq"))
  misshaped, bad_dtype = [], []
  for name, shape in {**expected, **optional}.items():
    if name in present:
      got = ckpt.shape(name)
      if got != shape:
        misshaped.append(f"{name}: expected {shape}, got {got}")
      if ckpt.dtype(name) not in ("F32", "BF16", "F16", "F64"):
        bad_dtype.append(f"{name}: {ckpt.dtype(name)}")
  problems = []
  if missing:
    problems.append(f"missing tensors {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors {_listing(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped tensors {_listing(misshaped)}")
  if bad_dtype:
    problems.append(f"non-float tensors {_listing(bad_dtype)}")
  if problems:
    arch = ", ".join(f"{f}={getattr(cfg, f)!r}" for f in ARCH_FIELDS)
    raise HFCheckpointError(f"checkpoint {ckpt.dir} does not match ModelConfig({arch}):\n  " +
                     "\n  ".join(problems))
  if cfg.tie_embeddings and "lm_head.weight" in present:
    emb, head = ckpt.slice("model.embed_tokens.weight"), ckpt.slice("lm_head.weight")
    for start in range(0, cfg.vocab_size, 8192):  # chunked: never two full copies in memory
      rows = (slice(start, min(start + 8192, cfg.vocab_size)),)
      if not np.array_equal(emb[rows], head[rows]):
        raise HFCheckpointError(f"{ckpt.file_of('lm_head.weight')}: tie_word_embeddings=True but "
                         "lm_head.weight differs from model.embed_tokens.weight (e.g. rows "
                         f"{rows[0].start}:{rows[0].stop}); set tie_word_embeddings=false")


def _full_index(index, shape) -> tuple[slice, ...]:
  if index is None:
    return tuple(slice(None) for _ in shape)
  return tuple(index) + tuple(slice(None) for _ in range(len(shape) - len(index)))


def _reader(ckpt: _Checkpoint, spec: _Spec, n_layers: int, dtype):
  """data_callback for `jax.make_array_from_callback`: reads only the requested block."""

  def read_one(name, index):
    hf_index = (index[1], index[0]) if spec.transpose else index
    block = ckpt.slice(name)[hf_index]
    return block.T if spec.transpose else block

  def read(index):
    index = _full_index(index, spec.shape)
    if spec.per_expert:
      experts = range(spec.shape[1])[index[1]]
      out = np.stack([np.stack([read_one(spec.name.format(i=i, e=e), index[2:]) for e in experts])
                      for i in range(n_layers)[index[0]]])
    elif spec.layered:
      blocks = [read_one(spec.name.format(i=i), index[1:]) for i in range(n_layers)[index[0]]]
      out = np.stack(blocks)
    else:
      out = read_one(spec.name, index)
    return np.ascontiguousarray(out, dtype=dtype)

  return read


def _sharding_for(spec: _Spec, names, mesh, rules) -> jax.sharding.Sharding:
  if mesh is None:
    return SingleDeviceSharding(jax.local_devices()[0])
  pspec = logical_to_spec(names, rules, mesh.axis_names)
  fixed = []
  for dim, axes in zip(spec.shape, tuple(pspec) + (None,) * (len(spec.shape) - len(pspec))):
    axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in axes_t)
    if axes_t and dim % size:
      log.warning("%s: dimension %d is not divisible by mesh axes %s (size %d); replicating it",
                  _path_str(spec.path), dim, axes_t, size)
      axes = None
    fixed.append(axes)
  return NamedSharding(mesh, P(*fixed))


def _same_architecture(cfg: ModelConfig, file_cfg: ModelConfig, where) -> None:
  diff = [f"{f}: given {getattr(cfg, f)!r}, config.json {getattr(file_cfg, f)!r}"
          for f in ARCH_FIELDS if getattr(cfg, f) != getattr(file_cfg, f)]
  if diff:
    raise HFCheckpointError(f"cfg disagrees with {where}/config.json on " + "; ".join(diff))


def load(directory, *, cfg: ModelConfig | None = None, mesh: jax.sharding.Mesh | None = None,
         rules=None, dtype: str | None = None, tokenizer=None) -> tuple[ModelConfig, dict]:
  """Reads a local checkpoint directory into `(cfg, params)`.

  Args:
    directory: holds `config.json` and `model.safetensors` or `model.safetensors.index.json`.
    cfg: use this config (its architecture fields must agree with config.json when present; its
      dtypes, `scan_layers`, `remat` are kept). Default: `config_from_hf(directory)`.
    mesh: place every parameter with `NamedSharding(mesh, logical_to_spec(axes, rules))`, each
      device reading only its own block from disk (layer by layer) so no device or host ever holds
      the full checkpoint. Default: the mesh set with `jax.set_mesh`, else one local device.
    rules: logical -> mesh axis rules; default: the installed `axis_rules`, else `DEFAULT_RULES`.
    dtype: parameter storage dtype ('float32' / 'bfloat16'); default `cfg.param_dtype`.
    tokenizer: if given, `check_tokenizer(cfg, tokenizer)`.

  The returned cfg carries config.json's bos / eos / pad token ids (for `save`); a given `cfg`
  keeps its own where they are not None and takes config.json's for the others.

  Raises a ValueError naming the missing, unexpected, mis-shaped or non-float tensors, and
  FileNotFoundError naming absent files.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  file_cfg = config_from_hf(directory) if (directory / "config.json").is_file() else None
  if cfg is None:
    if file_cfg is None:
      raise FileNotFoundError(f"{directory}: no config.json (pass cfg= to load bare weights)")
    cfg = file_cfg
  elif file_cfg is not None:
    _same_architecture(cfg, file_cfg, directory)
    missing = {k: getattr(file_cfg, k) for k in TOKEN_ID_FIELDS if getattr(cfg, k) is None}
    if any(v is not None for v in missing.values()):
      cfg = cfg.replace(**missing)
  if dtype is not None:
    cfg = cfg.replace(param_dtype=dtype)
  if tokenizer is not None:
    check_tokenizer(cfg, tokenizer)
  if mesh is None:
    mesh = jax.sharding.get_mesh()
    mesh = None if mesh.empty else mesh
  rules = rules if rules is not None else (current_rules() or DEFAULT_RULES)
  specs = _specs(cfg)
  axes = transformer.logical_axes(cfg)
  np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  params: dict = {}
  with contextlib.ExitStack() as stack:
    ckpt = _Checkpoint(directory, stack)
    _validate(ckpt, cfg, specs)
    for spec in specs:
      names = axes
      for p in spec.path:
        names = names[p]
      sharding = _sharding_for(spec, names, mesh, rules)
      array = jax.make_array_from_callback(spec.shape, sharding,
                                           _reader(ckpt, spec, cfg.n_layers, np_dtype))
      node = params
      for p in spec.path[:-1]:
        node = node.setdefault(p, {})
      node[spec.path[-1]] = array
  return cfg, params


# -- writing --------------------------------------------------------------------------------------
def _check_params(cfg: ModelConfig, params) -> None:
  expected = {s.path: s.shape for s in _specs(cfg)}
  got = {}
  for kp, v in jax.tree_util.tree_leaves_with_path(params):
    got[tuple(getattr(k, "key", getattr(k, "name", k)) for k in kp)] = tuple(np.shape(v))
  problems = [f"{_path_str(p)} missing" for p in expected if p not in got]
  problems += [f"{_path_str(p)} unexpected" for p in got if p not in expected]
  problems += [f"{_path_str(p)}: expected shape {s}, got {got[p]}"
               for p, s in expected.items() if p in got and got[p] != s]
  if problems:
    raise ValueError(f"params do not match the config ({cfg.family}, {cfg.n_layers} layers): " +
                     "; ".join(problems[:_MAX_LISTED]))


def _to_host(x) -> np.ndarray:
  """Whole array on the host; a collective when parts live on other processes."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _tensors(cfg, params, specs) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor in the parameter dtype) in spec order, one stacked parameter on the host at
  a time."""
  np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  for spec in specs:
    leaf = params
    for p in spec.path:
      leaf = leaf[p]
    host = _to_host(leaf).astype(np_dtype, copy=False)
    if spec.per_expert:
      blocks = list(host.reshape((-1,) + host.shape[2:]))
    else:
      blocks = list(host) if spec.layered else [host]
    for name, block in zip(spec.hf_names(cfg.n_layers), blocks):
      yield name, np.ascontiguousarray(block.T if spec.transpose else block)
    del host, blocks


def _replace_dir(tmp: pathlib.Path, target: pathlib.Path) -> None:
  if target.exists() and not any(target.iterdir()):
    target.rmdir()
  if not target.exists():
    os.replace(tmp, target)
    return
  old = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
  os.replace(target, old / "ckpt")
  os.replace(tmp, target)
  shutil.rmtree(old)


def save(directory, cfg: ModelConfig, params, tokenizer=None, *,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> pathlib.Path:
  """Writes `config.json`, `generation_config.json` and safetensors weights (+ tokenizer files)
  that transformers loads.

  The bos / eos / pad token ids written are `cfg`'s (config.json's when `cfg` came from
  `config_from_hf` / `load`), with or without a tokenizer; a tokenizer's own ids win where it
  defines them (see the module docstring). Tensors are written in the parameter dtype. More than
  `max_shard_bytes` of tensors are split into `model-0000k-of-0000n.safetensors` files with a
  `model.safetensors.index.json`. Writing goes to a temporary sibling directory that is renamed
  into place at the end, so `directory` never holds a half-written checkpoint. An existing
  non-empty `directory` is an error unless `overwrite=True` (then it is replaced as a whole).
  With several processes, all must call `save` (gathering sharded parameters is a collective);
  process 0 writes.
  """
  target = pathlib.Path(directory).absolute()
  config = config_to_hf(cfg)
  _check_params(cfg, params)
  if tokenizer is not None:
    check_tokenizer(cfg, tokenizer)
    config = config_to_hf(cfg.replace(**_token_ids_with_tokenizer(cfg, tokenizer)))
  if target.exists() and any(target.iterdir()) and not overwrite:
    raise FileExistsError(f"{target} exists and is not empty (pass overwrite=True to replace it)")
  generation_config = generation_config_json(config)
  writer = jax.process_index() == 0
  specs = _specs(cfg)
  itemsize = np.dtype(jax.numpy.dtype(cfg.param_dtype)).itemsize
  plan, size = [[]], 0  # shard plan from shapes: lists of HF names
  for spec in specs:
    nbytes = math.prod(spec.hf_shape()) * itemsize
    for name in spec.hf_names(cfg.n_layers):
      if plan[-1] and size + nbytes > max_shard_bytes:
        plan.append([])
        size = 0
      plan[-1].append(name)
      size += nbytes
  n = len(plan)
  files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                                        for k in range(n)]
  tmp = None
  if writer:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
  try:
    tensors = _tensors(cfg, params, specs)
    weight_map, total = {}, 0
    for file, names in zip(files, plan):
      shard = {}
      for expected_name in names:
        name, array = next(tensors)
        assert name == expected_name, (name, expected_name)
        shard[name] = array
        weight_map[name] = file
        total += array.nbytes
      if writer:
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
      del shard
    if writer:
      if n > 1:
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
      (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
      (tmp / GENERATION_CONFIG_FILE).write_text(generation_config)
      if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
      _replace_dir(tmp, target)
      tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(f"opd_jax.hf.save:{target}")
  return target


# -- adapters in the PEFT layout ------------------------------------------------------------------
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_tensors(cfg: ModelConfig, adapters) -> Iterator[tuple[str, np.ndarray]]:
  """(PEFT name, tensor) of every adapter matrix, e.g.
  `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` = a[i].T ([r, in]) and
  `...lora_B.weight` = b[i].T ([out, r]) (`models.lora`: K_eff = K + scale a @ b is PEFT's
  W + scale B @ A for W = K.T)."""
  from opd_jax.models import lora  # noqa: PLC0415
  by_path = {spec.path: spec for spec in _specs(cfg)}
  np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  for path, module in lora.adapter_modules(adapters):
    spec = by_path.get(path + ("kernel",))
    if spec is None or spec.per_expert or not spec.transpose:
      raise ValueError(f"adapters at {'/'.join(path)}: not an adaptable kernel of {cfg.family}")
    for part, peft in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
      host = _to_host(module[part]).astype(np_dtype, copy=False)
      blocks = list(host) if spec.layered else [host]
      for name, block in zip(spec.hf_names(cfg.n_layers), blocks):
        module_i = name.removesuffix(".weight")
        yield (f"{PEFT_PREFIX}{module_i}.{peft}.weight",
               np.ascontiguousarray(block.T))


def peft_config(cfg: ModelConfig, adapters, lora_cfg, base_model_name_or_path: str = "") -> dict:
  """The `adapter_config.json` of `adapters` (PEFT's LoraConfig fields: r, lora_alpha,
  target_modules as module-name suffixes, no dropout, no bias). `init_lora_weights` is true
  whatever `lora_cfg.init` was: the saved weights are plain LoRA factors relative to the base they
  were trained on (for PiSSA, the residual base), which PEFT must not re-initialise on load."""
  from opd_jax.models import lora  # noqa: PLC0415
  by_path = {spec.path: spec for spec in _specs(cfg)}
  modules = sorted({by_path[p + ("kernel",)].name.removesuffix(".weight").rsplit(".", 1)[-1]
                    for p, _ in lora.adapter_modules(adapters)})
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path or None,
      "r": int(lora_cfg.rank), "lora_alpha": float(lora_cfg.alpha), "lora_dropout": 0.0,
      "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
      "init_lora_weights": True, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
  }


def save_peft_adapter(directory, cfg: ModelConfig, adapters, lora_cfg, *,
                      base_model_name_or_path: str = "", overwrite: bool = False
                      ) -> pathlib.Path:
  """Writes `adapter_config.json` + `adapter_model.safetensors` that
  `peft.PeftModel.from_pretrained(base, directory)` loads onto the transformers model of the
  base the adapters were trained on (`save(..., base)`: for PiSSA the residual base,
  `TrainState.frozen`). Atomic like `save`; with several processes all must call it (gathering
  is a collective), process 0 writes. The merged model is `save(dir, cfg, lora.merge(base,
  adapters, lora_cfg.scale))`."""
  target = pathlib.Path(directory).absolute()
  if target.exists() and any(target.iterdir()) and not overwrite:
    raise FileExistsError(f"{target} exists and is not empty (pass overwrite=True to replace it)")
  tensors = dict(peft_tensors(cfg, adapters))
  config = peft_config(cfg, adapters, lora_cfg, base_model_name_or_path)
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
      save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
      (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
      _replace_dir(tmp, target)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(f"opd_jax.hf.save_peft_adapter:{target}")
  return target
