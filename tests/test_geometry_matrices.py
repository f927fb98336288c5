"""geometry/matrices.py: layout -> named matrices, the orientation helper, fused q/k/v."""

import jax
import numpy as np
import pytest
import torch

from opd_jax.geometry import matrices
from opd_jax.models import config, transformer


def _zeros(cfg):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), transformer.abstract_params(cfg))


def test_named_matrices_of_our_layout():
  cfg = config.tiny(vocab_size=96)  # qwen3: tied, qk-norm; H*h = 64, K*h = 32, d_ff = 128
  ms = matrices.named_matrices(_zeros(cfg))
  by = {m.name: m for m in ms}
  assert len(ms) == 2 * 7 + 1 and "lm_head" not in by
  assert by["embed"].shape == (96, 64) and by["embed"].module_type == "embed"
  assert by["layers.1.attn.q_proj"].shape == (64, 64) and by["layers.1.attn.q_proj"].layer == 1
  assert by["layers.0.attn.k_proj"].shape == (64, 32)
  assert by["layers.0.mlp.down_proj"].side_dims() == {"input": 128, "output": 64}
  assert {m.module_type for m in ms} == {"q", "k", "v", "o", "gate", "up", "down", "embed"}
  with_1d = matrices.named_matrices(_zeros(cfg), include_1d=True)
  vec = {m.name: m for m in with_1d if not m.is_matrix}
  assert set(vec) == {f"layers.{l}.{n}.scale" for l in range(2) for n in (
      "attn.q_norm", "attn.k_norm", "input_norm", "post_attn_norm")} | {"final_norm.scale"}
  assert vec["layers.1.attn.k_norm.scale"].shape == (16,)
  untied = config.tiny(vocab_size=96, family="qwen2", tie_embeddings=False)
  ms = matrices.named_matrices(_zeros(untied), include_1d=True)
  assert [m.shape for m in ms if m.module_type == "lm_head"] == [(64, 96)]
  assert sum(m.module_type == "bias" for m in ms) == 6
  assert [m.name for m in matrices.named_matrices(_zeros(untied), types=("o",))] == [
      "layers.0.attn.o_proj", "layers.1.attn.o_proj"]
  # Arrays are per-layer views of the stacked numpy leaf (no copies).
  params = _zeros(cfg)
  q1 = {m.name: m for m in matrices.named_matrices(params)}["layers.1.attn.q_proj"]
  assert np.shares_memory(q1.array, params["layers"]["attn"]["q_proj"]["kernel"])
  assert q1.array.shape == (64, 64)


def test_input_side_is_pytorch_right_singular_vectors():
  """A PyTorch Linear weight W is (out, in) and y = W x; our kernel is K = W^T. The paper's input
  side (right singular vectors of W) must be the left singular vectors of oriented(K, 'input')."""
  rng = np.random.default_rng(0)
  w = torch.from_numpy((rng.standard_normal((7, 3)) @ rng.standard_normal((3, 11))))  # rank 3
  kernel = w.numpy().T                                                               # (in, out)
  _, _, vh = np.linalg.svd(w.numpy())
  torch_in = vh[:3].T                                          # right singular vectors of W
  u, _, _ = np.linalg.svd(matrices.oriented(kernel, "input"))
  ours_in = u[:, :3]
  np.testing.assert_allclose(ours_in @ ours_in.T, torch_in @ torch_in.T, atol=1e-10)
  # Functionally: an input orthogonal to that side is annihilated, in PyTorch and in our layout.
  x = rng.standard_normal(11)
  x -= ours_in @ (ours_in.T @ x)
  np.testing.assert_allclose(torch.nn.functional.linear(torch.from_numpy(x), w).numpy(), 0,
                             atol=1e-10)
  np.testing.assert_allclose(x @ kernel, 0, atol=1e-10)
  # The output side is the other one; batched (stacked) arrays orient their last two axes.
  assert matrices.oriented(np.zeros((2, 11, 7)), "output").shape == (2, 7, 11)
  assert matrices.short_side((11, 7)) == "output" and matrices.short_side((7, 7)) == "input"
  with pytest.raises(ValueError, match="side"):
    matrices.oriented(kernel, "left")


def test_split_fused_qkv_both_layouts():
  rng = np.random.default_rng(1)
  heads, kv, hd, d = 4, 2, 3, 8
  q = rng.standard_normal((2, d, heads * hd))
  k = rng.standard_normal((2, d, kv * hd))
  v = rng.standard_normal((2, d, kv * hd))
  qb, kb, vb = (rng.standard_normal(x.shape[0:1] + x.shape[2:]) for x in (q, k, v))
  tree = {"layers": {"attn": {"qkv_proj": {"kernel": np.concatenate([q, k, v], -1),
                                           "bias": np.concatenate([qb, kb, vb], -1)},
                              "o_proj": {"kernel": q}}}}
  out = matrices.split_fused_qkv(tree, n_heads=heads, n_kv_heads=kv, head_dim=hd)
  attn = out["layers"]["attn"]
  assert set(attn) == {"q_proj", "k_proj", "v_proj", "o_proj"}
  for name, want, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
    np.testing.assert_array_equal(attn[name]["kernel"], want)
    np.testing.assert_array_equal(attn[name]["bias"], bias)
  assert [m.module_type for m in matrices.named_matrices(out)] == [
      "k", "k", "o", "o", "q", "q", "v", "v"]
  # GPT-NeoX layout: per head [q_h | k_h | v_h].
  k2 = rng.standard_normal((d, heads * hd))
  v2 = rng.standard_normal((d, heads * hd))
  q2 = rng.standard_normal((d, heads * hd))
  inter = np.stack([x.reshape(d, heads, hd) for x in (q2, k2, v2)], axis=2).reshape(d, -1)
  got = matrices.split_fused_qkv_array(inter, n_heads=heads, n_kv_heads=heads, head_dim=hd,
                                       layout="interleaved")
  for g, want in zip(got, (q2, k2, v2)):
    np.testing.assert_array_equal(g, want)
  with pytest.raises(ValueError, match="n_heads == n_kv_heads"):
    matrices.split_fused_qkv_array(inter[:, :24], n_heads=4, n_kv_heads=2, head_dim=3,
                                   layout="interleaved")
  with pytest.raises(ValueError, match="last axis"):
    matrices.split_fused_qkv_array(q, n_heads=heads, n_kv_heads=kv, head_dim=hd)


def test_bad_layouts_and_sources_are_named():
  with pytest.raises(ValueError, match="qkv_proj.*split_fused_qkv"):
    matrices.named_matrices({"layers": {"attn": {"qkv_proj": {"kernel": np.zeros((2, 4, 6))}}}})
  with pytest.raises(ValueError, match="layers/attn/q_proj/kernel.*stacked"):
    matrices.named_matrices({"layers": {"attn": {"q_proj": {"kernel": np.zeros((4, 6))}}}})
  with pytest.raises(ValueError, match="w.*not part of our layout"):
    matrices.named_matrices({"w": np.zeros((4, 6))})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    matrices.resolve_params("/nonexistent/checkpoint")
  with pytest.raises(ValueError, match="types"):
    matrices.named_matrices({"w": np.zeros((4, 6))}, types=("attention",))
