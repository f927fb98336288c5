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


def test_moe_expert_leaves_split_per_expert():
  """qwen3_moe params: the router is one [D, E] matrix per layer; each [L, E, in, out] expert leaf
  gives L * E named (in, out) matrices, layer-major, with their layer and expert."""
  cfg = config.tiny_moe(vocab_size=96)  # 2 layers, 4 experts of width 32, d_model 64
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                        transformer.abstract_params(cfg))
  ms = matrices.named_matrices(params)
  by = {m.name: m for m in ms}
  types = [m.module_type for m in ms]
  assert {t: types.count(t) for t in ("router", "expert_gate", "expert_up", "expert_down")} == {
      "router": 2, "expert_gate": 8, "expert_up": 8, "expert_down": 8}
  assert "gate" not in types and "up" not in types
  m = by["layers.1.mlp.experts.2.gate_proj"]
  assert (m.module_type, m.layer, m.expert, m.shape) == ("expert_gate", 1, 2, (64, 32))
  leaf = params["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
  np.testing.assert_array_equal(m.array, leaf[1, 2])
  assert np.shares_memory(m.array, leaf)
  d = by["layers.0.mlp.experts.3.down_proj"]
  assert d.side_dims() == {"input": 32, "output": 64} and d.expert == 3 and d.layer == 0
  np.testing.assert_array_equal(
      d.array, params["layers"]["mlp"]["experts"]["down_proj"]["kernel"][0, 3])
  r = by["layers.1.mlp.router"]
  assert (r.module_type, r.shape, r.expert) == ("router", (64, 4), None)
  # Groups: one per leaf; batches are the flattened (layer, expert) members in name order.
  g = next(g for g in matrices.matrix_groups(params) if g.module_type == "expert_up")
  assert g.count == 8 and g.shape == (64, 32)
  assert [(g.member_layer(i), g.member_expert(i)) for i in (0, 3, 4, 7)] == [
      (0, 0), (0, 3), (1, 0), (1, 3)]
  batch = g.batch(3, 6)
  want = params["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
  for j, i in enumerate(range(3, 6)):
    np.testing.assert_array_equal(batch[j], want[i // 4, i % 4])
    assert g.names[i] == f"layers.{i // 4}.mlp.experts.{i % 4}.up_proj"
  assert [m.name for m in matrices.named_matrices(params, types=("router",))] == [
      "layers.0.mlp.router", "layers.1.mlp.router"]
  # An unstacked [E, in, out] experts leaf (a single layer) works too; a 3-D stacked one does not.
  single = {"experts": {"gate_proj": {"kernel": np.zeros((3, 5, 7))}}}
  names = [(m.name, m.layer, m.expert, m.shape) for m in matrices.named_matrices(single)]
  assert names == [(f"experts.{e}.gate_proj", None, e, (5, 7)) for e in range(3)]
  with pytest.raises(ValueError, match="layers/mlp/experts/up_proj/kernel.*stacked experts"):
    matrices.named_matrices({"layers": {"mlp": {"experts": {"up_proj": {
        "kernel": np.zeros((2, 4, 6))}}}}})


def test_moe_endpoint_per_expert_and_per_type(tmp_path):
  """Endpoint metrics on two tiny qwen3_moe trees: one entry per expert matrix, per-type
  aggregates for router / expert_*, and the per-expert sparsity equal to a numpy count."""
  from opd_jax.geometry import endpoint  # noqa: PLC0415

  cfg = config.tiny_moe(vocab_size=96)
  rng = np.random.default_rng(1)
  p0 = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                    transformer.abstract_params(cfg))
  p1 = jax.tree.map(lambda a: np.where(rng.random(a.shape) < 0.3, a + 0.1, a).astype(a.dtype), p0)
  # Expert 1 of layer 0 is untouched in up_proj: its sparsity must be exactly 1.
  p1["layers"]["mlp"]["experts"]["up_proj"]["kernel"][0, 1] = p0["layers"]["mlp"]["experts"][
      "up_proj"]["kernel"][0, 1]
  ep = endpoint.endpoint_metrics(p0, p1, endpoint.EndpointConfig(k=8, mask_rank=4, progress=False))
  per = ep["matrices"]
  assert per["layers.0.mlp.experts.1.up_proj"]["sparsity"] == 1.0
  for name in ("layers.1.mlp.experts.2.down_proj", "layers.0.mlp.router"):
    m0 = {m.name: m for m in matrices.named_matrices(p0)}[name].array
    m1 = {m.name: m for m in matrices.named_matrices(p1)}[name].array
    assert per[name]["changed"] == int(np.sum(m0 != m1))
  down = per["layers.1.mlp.experts.2.down_proj"]
  assert (down["type"], down["layer"]) == ("expert_down", 1)
  by_type = ep["by_type"]
  assert {"router", "expert_gate", "expert_up", "expert_down"} <= set(by_type)
  assert by_type["expert_gate"]["n_matrices"] == 8 and by_type["router"]["n_matrices"] == 2


def test_diagnose_two_transformers_qwen3_moe_checkpoints(tmp_path):
  """`geometry.report.diagnose` on two Qwen3MoeForCausalLM checkpoint dirs written by transformers
  (per-expert safetensors): per-expert metrics and per-type aggregates land in metrics.json and
  summary.md; counts equal a numpy count on the torch weights."""
  import json  # noqa: PLC0415

  import hf_fixtures as F  # noqa: PLC0415
  from opd_jax.geometry import endpoint, report  # noqa: PLC0415

  base = F.torch_model("qwen3_moe", tied=False, seed=31)
  F.export(base, tmp_path / "base")
  router0 = base.model.layers[0].mlp.gate.weight.detach().clone()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # tune: gate rows of layer 1 / expert 2 (fused [E, 2F, D]), layer 0 router
    fused = base.model.layers[1].mlp.experts.gate_up_proj
    hit = torch.rand(fused[2, :32].shape, generator=gen) < 0.25
    fused[2, :32] += 0.05 * hit
    router = base.model.layers[0].mlp.gate.weight
    router += 0.01 * torch.randn(router.shape, generator=gen)
  F.export(base, tmp_path / "tuned")
  # "changed" means changed at bfloat16 precision (endpoint's definition), counted by torch here.
  router_changed = int((router0.bfloat16() != router.detach().bfloat16()).sum())
  assert 200 < router_changed < 64 * 4
  cfg = report.DiagnoseConfig(endpoint=endpoint.EndpointConfig(k=8, mask_rank=4, progress=False),
                              figures=False)
  result = report.diagnose(tmp_path / "base", tmp_path / "tuned", out_dir=tmp_path / "out",
                           cfg=cfg)
  saved = json.loads((tmp_path / "out" / "metrics.json").read_text())["endpoint"]
  per, by_type = saved["matrices"], saved["by_type"]
  assert sum(n.startswith("layers.") and ".experts." in n for n in per) == 2 * 4 * 3
  changed = per["layers.1.mlp.experts.2.gate_proj"]
  assert (changed["type"], changed["layer"], changed["shape"]) == ("expert_gate", 1, [64, 32])
  assert changed["changed"] == int(hit.sum())
  assert per["layers.0.mlp.router"]["changed"] == router_changed
  for name, d in per.items():
    if ".experts." in name and name != "layers.1.mlp.experts.2.gate_proj":
      assert d["sparsity"] == 1.0, name
  assert by_type["expert_gate"]["n_matrices"] == 8
  assert by_type["expert_gate"]["n_changed"] == int(hit.sum())
  assert by_type["expert_up"]["n_changed"] == 0
  assert by_type["router"]["n_changed"] == router_changed
  assert result["overall"]["n_changed"] == int(hit.sum()) + router_changed
  summary = (tmp_path / "out" / "summary.md").read_text()
  for t in ("router", "expert_gate", "expert_up", "expert_down"):
    assert f"| {t} |" in summary
