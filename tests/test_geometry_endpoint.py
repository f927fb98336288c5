"""geometry/endpoint.py against the float64 numpy/scipy reference (tests/geometry_reference.py)."""

import math

import ml_dtypes
import numpy as np
import pytest

import geometry_reference as ref
from opd_jax.geometry import endpoint, matrices

K, R, ALPHA = 10, 3, 0.4


def _params(rng, vocab=50, d=24, layers=2):
  """Our layout with the shapes of a tiny qwen2 (d=24, 4 heads / 2 kv heads of width 6, d_ff=24,
  untied), as in the HF test below, so that the jitted kernels compile once for both."""
  def n(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  return {
      "embed": {"embedding": n(vocab, d)},
      "layers": {
          "attn": {"q_proj": {"kernel": n(layers, d, d), "bias": n(layers, d, scale=0.1)},
                   "k_proj": {"kernel": n(layers, d, 12), "bias": n(layers, 12, scale=0.1)},
                   "v_proj": {"kernel": n(layers, d, 12), "bias": n(layers, 12, scale=0.1)},
                   "o_proj": {"kernel": n(layers, d, d)}},
          "mlp": {"gate_proj": {"kernel": n(layers, d, d)}, "up_proj": {"kernel": n(layers, d, d)},
                  "down_proj": {"kernel": n(layers, d, d, scale=0.5)}},
          "input_norm": {"scale": 1 + n(layers, d, scale=0.1)},
          "post_attn_norm": {"scale": 1 + n(layers, d, scale=0.1)}},
      "final_norm": {"scale": 1 + n(d, scale=0.1)},
      # rank 4 < K: k must be capped at the rank
      "lm_head": {"kernel": (n(d, 4) @ n(4, vocab)).astype(np.float32)},
  }


def _update(rng, x, path):
  """Structured update: low rank (rank 2) + sparse, sized so that ~half the bf16 codes change;
  the value projection is left untouched."""
  if "v_proj" in path and path[-1] == "kernel":
    return x.copy()
  if x.ndim >= 2 and path[-1] in ("kernel", "embedding"):
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    low = rng.standard_normal(lead + (m, 2)) @ rng.standard_normal(lead + (2, n))
    sparse = rng.standard_normal(x.shape) * (rng.random(x.shape) < 0.3)
    scale = np.abs(x).mean()
    return (x + 2e-3 * scale * low + 2e-2 * scale * sparse).astype(np.float32)
  return (x + 1e-2 * (rng.random(x.shape) < 0.3)).astype(np.float32)


def _pair(seed=0, **kw):
  import jax

  rng = np.random.default_rng(seed)
  p0 = _params(rng, **kw)
  p1 = jax.tree_util.tree_map_with_path(
      lambda p, x: _update(rng, x, tuple(getattr(k, "key", k) for k in p)), p0)
  return p0, p1


def _reference(p0, p1):
  out = {}
  for m0, m1 in zip(matrices.named_matrices(p0, include_1d=True),
                    matrices.named_matrices(p1, include_1d=True)):
    if m0.is_matrix:
      out[m0.name] = ref.matrix_metrics(m0.array, m1.array, k=K, r=R, alpha=ALPHA)
    else:
      out[m0.name] = ref.vector_metrics(m0.array, m1.array)
    out[m0.name]["type"] = m0.module_type
  return out


def _compare(got, want, name):
  for key in ("n", "changed"):
    assert got[key] == want[key], (name, key)
  np.testing.assert_allclose(got["sparsity"], want["sparsity"], rtol=1e-12, err_msg=name)
  if "nss" not in want:
    return
  assert got["k"] == want["k"], name
  for key in ("max_angle_in_deg", "max_angle_out_deg", "max_angle_deg"):
    assert abs(got[key] - want[key]) < 1e-6, (name, key, got[key], want[key])
  np.testing.assert_allclose(got["nss"], want["nss"], rtol=1e-6, atol=1e-15, err_msg=name)
  for key in ("overlap_principal", "overlap_low", "frac_principal", "frac_low"):
    if math.isnan(want[key]):
      assert math.isnan(got[key]), (name, key)
    else:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, err_msg=f"{name} {key}")


@pytest.fixture(scope="module")
def pair_and_result():
  p0, p1 = _pair()
  cfg = endpoint.EndpointConfig(k=K, mask_rank=R, alpha=ALPHA, progress=False)
  return p0, p1, endpoint.endpoint_metrics(p0, p1, cfg), _reference(p0, p1)


def test_per_matrix_metrics_match_reference(pair_and_result):
  _, _, got, want = pair_and_result
  assert list(got["matrices"]) == list(want)
  for name in want:
    _compare(got["matrices"][name], want[name], name)
  # The structure under test: rank capped for lm_head, v untouched, real changes elsewhere.
  assert got["matrices"]["lm_head"]["k"] == 4
  v = got["matrices"]["layers.0.attn.v_proj"]
  assert v["changed"] == 0 and math.isnan(v["overlap_low"]) and v["max_angle_deg"] < 1e-6
  q = got["matrices"]["layers.1.attn.q_proj"]
  assert 0.2 < q["density"] < 0.8 and q["max_angle_deg"] > 1e-3 and q["nss"] > 0


def test_aggregates_weighting_and_representative(pair_and_result):
  _, _, got, want = pair_and_result
  n = sum(d["n"] for d in want.values())
  changed = sum(d["changed"] for d in want.values())
  np.testing.assert_allclose(got["overall"]["sparsity"], 1 - changed / n, rtol=1e-12)
  np.testing.assert_allclose(got["overall"]["density"], changed / n, rtol=1e-12)
  unweighted = np.mean([d["sparsity"] for d in want.values()])
  assert abs(got["overall"]["sparsity"] - unweighted) > 1e-3  # the weighting matters here
  mats = {k: d for k, d in want.items() if "nss" in d}
  for key in ("max_angle_deg", "nss", "overlap_principal", "overlap_low", "frac_low"):
    np.testing.assert_allclose(got["overall"][key], ref.nanmean([d[key] for d in mats.values()]),
                               rtol=1e-6)
  for t in ("q", "down", "norm", "bias"):
    sub = {k: d for k, d in want.items() if d["type"] == t}
    agg = got["by_type"][t]
    assert agg["n_params"] == sum(d["n"] for d in sub.values())
    np.testing.assert_allclose(
        agg["sparsity"], 1 - sum(d["changed"] for d in sub.values()) / agg["n_params"],
        rtol=1e-12)
    if t in ("q", "down"):
      np.testing.assert_allclose(agg["nss"], np.mean([d["nss"] for d in sub.values()]),
                                 rtol=1e-6)
  rep = got["representative"]
  assert rep["name"] == "layers.1.attn.q_proj"
  w = want[rep["name"]]
  np.testing.assert_allclose(rep["angles_in_deg"], w["angles_in_deg"], atol=1e-6, rtol=0)
  np.testing.assert_allclose(rep["angles_out_deg"], w["angles_out_deg"], atol=1e-6, rtol=0)
  assert len(rep["sigma0"]) == 24


def test_chunked_long_matrices_and_tied_bf16_values():
  rng = np.random.default_rng(1)
  # A long embedding (chunked under a small budget) with bf16-quantised values, so that many
  # entries tie at the low-magnitude threshold: ties are all included in the mask.
  e0 = rng.standard_normal((1200, 24)).astype(ml_dtypes.bfloat16).astype(np.float32)
  e1 = (e0 + 0.02 * rng.standard_normal(e0.shape) * (rng.random(e0.shape) < 0.5)
        ).astype(np.float32)
  p0, p1 = {"embed": {"embedding": e0}}, {"embed": {"embedding": e1}}
  base = dict(k=K, mask_rank=R, alpha=0.5, progress=False)
  small = endpoint.endpoint_metrics(p0, p1, endpoint.EndpointConfig(max_batch_bytes=1 << 18,
                                                                     **base))
  assert endpoint._plan(matrices.matrix_groups(p0)[0], 1 << 18).n_chunks == 3
  want = ref.matrix_metrics(e0, e1, k=K, r=R, alpha=0.5)
  _compare(small["matrices"]["embed"], want, "embed")
  assert small["matrices"]["embed"]["frac_low"] > 0.5  # ties at the threshold
  big = endpoint.endpoint_metrics(p0, p1, endpoint.EndpointConfig(**base))
  _compare(big["matrices"]["embed"], want, "embed unchunked")


def test_bad_inputs_name_the_problem():
  p0, p1 = _pair(seed=2, layers=1)
  cfg = endpoint.EndpointConfig(progress=False)
  q = dict(p1)
  q["layers"] = dict(p1["layers"], mlp={"gate_proj": p1["layers"]["mlp"]["gate_proj"]})
  with pytest.raises(ValueError, match="up_proj"):
    endpoint.endpoint_metrics(p0, q, cfg)
  with pytest.raises(ValueError, match="representative"):
    endpoint.endpoint_metrics(p0, p1, endpoint.EndpointConfig(representative="nope"))
  with pytest.raises(ValueError, match="alpha"):
    endpoint.EndpointConfig(alpha=1.5)


def _torch_key(name: str) -> str:
  """Our matrix / vector name -> the transformers state-dict key."""
  fixed = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight",
           "final_norm.scale": "model.norm.weight"}
  if name in fixed:
    return fixed[name]
  parts = name.split(".")  # layers.<l>.<block>.<module>[.<leaf>]
  module = {"attn": "self_attn", "input_norm": "input_layernorm",
            "post_attn_norm": "post_attention_layernorm"}
  rest = [module.get(p, p) for p in parts[2:]]
  if rest[-1] in ("scale",):
    rest = rest[:-1]
  leaf = "bias" if rest[-1] == "bias" else "weight"
  rest = rest[:-1] if rest[-1] == "bias" else rest
  return ".".join(["model", "layers", parts[1]] + rest + [leaf])


def test_hf_checkpoint_pair_from_directories_matches_torch_weights(tmp_path):
  """Layout: diagnostics of a transformers checkpoint pair read from its directories equal the
  float64 reference on the torch tensors in PyTorch's own (out, in) convention, and equal the
  diagnostics of the same weights converted by hand into our params."""
  import hf_fixtures
  import torch

  def model(seed):
    return hf_fixtures.torch_model("qwen2", tied=False, seed=seed, vocab_size=50, hidden_size=24,
                                   intermediate_size=24, num_attention_heads=4,
                                   num_key_value_heads=2)

  m0, m1 = model(0), model(0)
  rng = np.random.default_rng(5)
  with torch.no_grad():
    for name, p in m1.named_parameters():
      if "v_proj.weight" in name:
        continue
      x = p.numpy()
      path = ("kernel",) if x.ndim == 2 else ("scale",)
      p.copy_(torch.from_numpy(_update(rng, x, path)))
  d0 = hf_fixtures.export(m0, tmp_path / "base")
  d1 = hf_fixtures.export(m1, tmp_path / "tuned")
  cfg = endpoint.EndpointConfig(k=K, mask_rank=R, alpha=ALPHA, progress=False)
  got = endpoint.endpoint_metrics(str(d0), str(d1), cfg)

  sd0, sd1 = hf_fixtures.state_dict_numpy(m0), hf_fixtures.state_dict_numpy(m1)
  assert len(got["matrices"]) == len(sd0)
  for name, d in got["matrices"].items():
    key = _torch_key(name)
    if d["type"] in matrices.VECTOR_TYPES:
      want = ref.vector_metrics(sd0[key], sd1[key])
    else:
      # PyTorch Linear weights are (out, in): the input side is axis 1; the embedding is read
      # as stored, [V, D] = (in, out) (see geometry/matrices.py).
      want = ref.matrix_metrics(sd0[key], sd1[key], k=K, r=R, alpha=ALPHA,
                                input_axis=0 if d["type"] == "embed" else 1)
    _compare(d, want, name)
  assert got["matrices"]["layers.1.attn.k_proj"]["shape"] == [24, 12]  # (in, out)

  def ours(sd):
    lin = lambda key: np.stack([sd[f"model.layers.{l}.{key}.weight"].T for l in range(2)])  # noqa
    vec = lambda key: np.stack([sd[f"model.layers.{l}.{key}"] for l in range(2)])  # noqa
    return {
        "embed": {"embedding": sd["model.embed_tokens.weight"]},
        "layers": {
            "attn": {p: {"kernel": lin(f"self_attn.{p}"), "bias": vec(f"self_attn.{p}.bias")}
                     for p in ("q_proj", "k_proj", "v_proj")}
            | {"o_proj": {"kernel": lin("self_attn.o_proj")}},
            "mlp": {p: {"kernel": lin(f"mlp.{p}")} for p in ("gate_proj", "up_proj",
                                                              "down_proj")},
            "input_norm": {"scale": vec("input_layernorm.weight")},
            "post_attn_norm": {"scale": vec("post_attention_layernorm.weight")}},
        "final_norm": {"scale": sd["model.norm.weight"]},
        "lm_head": {"kernel": sd["lm_head.weight"].T},
    }

  direct = endpoint.endpoint_metrics(ours(sd0), ours(sd1), cfg)
  assert direct["matrices"] == got["matrices"]
  assert direct["representative"] == got["representative"]
