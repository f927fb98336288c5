"""optim/subspace.py: bases against numpy SVD, projection residuals, pass-through, sharded jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from opd_jax.optim import subspace

K = 3


def _params(rng, d=24, layers=2, vocab=40):
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
  return {"embed": {"embedding": n(vocab, d)},
          "layers": {"attn": {"q_proj": {"kernel": n(layers, d, d)},
                              "k_proj": {"kernel": n(layers, d, 12)}},
                     "mlp": {"down_proj": {"kernel": n(layers, 36, d)}},
                     "input_norm": {"scale": n(layers, d)}},
          "lm_head": {"kernel": n(d, vocab)}}


def _delta(rng, params):
  """Low rank (rank 5, decaying) + noise: a clear gap after the 3rd singular value."""
  def one(x):
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    a = rng.standard_normal(lead + (m, 5)) * np.array([8.0, 6.0, 4.0, 0.5, 0.3])
    return jnp.asarray(a @ rng.standard_normal(lead + (5, n)) + 0.01 * rng.standard_normal(
        x.shape), jnp.float32)
  return jax.tree.map(lambda x: one(x) if x.ndim >= 2 else x, params)


def _layers(x):
  x = np.asarray(x, np.float64)
  return x.reshape((-1,) + x.shape[-2:])


def test_capture_bases_are_the_top_k_singular_vectors():
  rng = np.random.default_rng(0)
  params = _params(rng)
  delta = _delta(rng, params)
  for side in ("input", "output"):
    bases = subspace.capture_bases(delta, K, side=side)
    assert bases["embed"]["embedding"] is None and bases["layers"]["input_norm"]["scale"] is None
    for path in (("layers", "attn", "q_proj"), ("layers", "attn", "k_proj"),
                 ("layers", "mlp", "down_proj"), ("lm_head",)):
      d = delta
      b = bases
      for key in path + ("kernel",):
        d, b = d[key], b[key]
      axis = -2 if side == "input" else -1
      assert b.shape == d.shape[:-2] + (d.shape[axis], K) and b.dtype == jnp.float32
      for dl, bl in zip(_layers(d), _layers(b)):
        u, _, vt = np.linalg.svd(dl)
        want = u[:, :K] if side == "input" else vt[:K].T  # input side: rows of the (in, out) kernel
        np.testing.assert_allclose(bl.T @ bl, np.eye(K), atol=1e-6)
        np.testing.assert_allclose(np.sum((bl.T @ want) ** 2) / K, 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="k_proj"):
    subspace.capture_bases(delta, 13)
  with pytest.raises(ValueError, match="selects no leaf"):
    subspace.capture_bases({"w": jnp.ones((3, 3))}, 1)


def test_projection_in_span_passthrough_pre_and_post():
  rng = np.random.default_rng(1)
  params = _params(rng)
  bases = subspace.capture_bases(_delta(rng, params), K)
  grads = _delta(rng, params)  # any gradient
  tx = subspace.project_onto_subspace(bases)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for path in (("layers", "attn", "q_proj"), ("layers", "mlp", "down_proj"), ("lm_head",)):
    g, o, b = grads, out, bases
    for key in path + ("kernel",):
      g, o, b = g[key], o[key], b[key]
    for gl, ol, vl in zip(_layers(g), _layers(o), _layers(b)):
      want = vl @ (vl.T @ gl)
      np.testing.assert_allclose(ol, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
      resid = ol - vl @ (vl.T @ ol)
      assert np.linalg.norm(resid) <= 1e-6 * np.linalg.norm(ol)
  # Unmasked leaves are passed through untouched (the very same values, bit for bit).
  for key in (("embed", "embedding"), ("layers", "input_norm", "scale")):
    np.testing.assert_array_equal(np.asarray(out[key[0]][key[1]] if len(key) == 2 else
                                             out[key[0]][key[1]][key[2]]),
                                  np.asarray(grads[key[0]][key[1]] if len(key) == 2 else
                                             grads[key[0]][key[1]][key[2]]))
  # 'post': after Adam, the final update is in the subspace; 'pre' only projects Adam's input.
  for order, in_span in (("post", True), ("pre", False)):
    parts = [subspace.project_onto_subspace(bases), optax.adam(0.1)]
    chain = optax.chain(*(parts[::-1] if order == "post" else parts))
    upd, _ = chain.update(grads, chain.init(params), params)
    u = _layers(upd["layers"]["attn"]["q_proj"]["kernel"])
    v = _layers(bases["layers"]["attn"]["q_proj"]["kernel"])
    resid = max(np.linalg.norm(ul - vl @ (vl.T @ ul)) / np.linalg.norm(ul)
                for ul, vl in zip(u, v))
    assert (resid <= 1e-6) == in_span, (order, resid)
  # mask= restricts further; selecting a leaf without a basis is an error.
  only_q = jax.tree.map(lambda _: False, params)
  only_q["layers"]["attn"]["q_proj"]["kernel"] = True
  tq = subspace.project_onto_subspace(bases, mask=only_q)
  out_q, _ = tq.update(grads, tq.init(params))
  np.testing.assert_array_equal(out_q["lm_head"]["kernel"], grads["lm_head"]["kernel"])
  np.testing.assert_allclose(out_q["layers"]["attn"]["q_proj"]["kernel"],
                             out["layers"]["attn"]["q_proj"]["kernel"], rtol=1e-6, atol=1e-6)
  bad = jax.tree.map(lambda _: True, params)
  with pytest.raises(ValueError, match="no basis"):
    subspace.project_onto_subspace(bases, mask=bad).init(params)
  wrong = subspace.capture_bases(_delta(rng, params), K, side="output")
  with pytest.raises(ValueError, match="k_proj.*side='input'"):
    subspace.project_onto_subspace(wrong).init(params)


def test_inject_hyperparams_and_sgd_match_manual_projection():
  rng = np.random.default_rng(2)
  params = _params(rng, layers=1)
  bases = subspace.capture_bases(_delta(rng, params), K)
  grads = _delta(rng, params)
  tx = optax.inject_hyperparams(
      lambda learning_rate: optax.chain(subspace.project_onto_subspace(bases),
                                        optax.sgd(learning_rate)))(learning_rate=0.5)
  upd, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert float(state.hyperparams["learning_rate"]) == 0.5
  v = np.asarray(bases["lm_head"]["kernel"], np.float64)
  g = np.asarray(grads["lm_head"]["kernel"], np.float64)
  np.testing.assert_allclose(upd["lm_head"]["kernel"], -0.5 * v @ (v.T @ g), rtol=1e-5,
                             atol=1e-6)


def test_under_optax_masked_only_the_selected_leaves_are_projected():
  rng = np.random.default_rng(3)
  params = _params(rng, layers=1)
  bases = subspace.capture_bases(_delta(rng, params), K)
  grads = _delta(rng, params)
  leaves = jax.tree.map(lambda _: False, params)
  leaves["lm_head"]["kernel"] = True
  tx = optax.masked(subspace.project_onto_subspace(bases), leaves)
  upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  v = np.asarray(bases["lm_head"]["kernel"], np.float64)
  g = np.asarray(grads["lm_head"]["kernel"], np.float64)
  np.testing.assert_allclose(upd["lm_head"]["kernel"], v @ (v.T @ g), rtol=1e-5, atol=1e-6)
  q = grads["layers"]["attn"]["q_proj"]["kernel"]   # has a basis, left out by the mask
  np.testing.assert_array_equal(upd["layers"]["attn"]["q_proj"]["kernel"], q)


def test_sharded_bases_under_jit_on_a_fake_8_device_mesh_compile_once():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rng = np.random.default_rng(3)
  params = _params(rng, d=16, layers=2, vocab=32)
  params["layers"]["attn"]["k_proj"]["kernel"] = params["layers"]["attn"]["k_proj"]["kernel"][
      ..., :8]
  specs = {"embed": {"embedding": P("tensor", "fsdp")},
           "layers": {"attn": {"q_proj": {"kernel": P(None, "fsdp", "tensor")},
                               "k_proj": {"kernel": P(None, "fsdp", "tensor")}},
                      "mlp": {"down_proj": {"kernel": P(None, "tensor", "fsdp")}},
                      "input_norm": {"scale": P(None, "fsdp")}},
           "lm_head": {"kernel": P("fsdp", "tensor")}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, P))
  params = jax.device_put(params, shardings)
  delta = jax.device_put(_delta(rng, params), shardings)
  bases = subspace.capture_bases(delta, K)
  def spec_is(x, *spec):
    return x.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), x.ndim)

  assert spec_is(bases["layers"]["attn"]["q_proj"]["kernel"], None, "fsdp", None)
  assert spec_is(bases["layers"]["mlp"]["down_proj"]["kernel"], None, "tensor", None)
  assert spec_is(bases["lm_head"]["kernel"], "fsdp", None)
  tx = optax.chain(subspace.project_onto_subspace(bases), optax.sgd(1.0))
  state = tx.init(params)
  assert spec_is(state[0].bases["lm_head"]["kernel"], "fsdp", None)

  @jax.jit
  def step(params, state, grads):
    upd, state = tx.update(grads, state, params)
    return optax.apply_updates(params, upd), state

  for i in range(2):
    grads = jax.device_put(_delta(np.random.default_rng(10 + i), params), shardings)
    new, state = step(params, state, grads)
    d = _layers(new["layers"]["mlp"]["down_proj"]["kernel"]) - _layers(
        params["layers"]["mlp"]["down_proj"]["kernel"])
    v = _layers(bases["layers"]["mlp"]["down_proj"]["kernel"])
    for dl, vl in zip(d, v):
      assert np.linalg.norm(dl - vl @ (vl.T @ dl)) <= 1e-5 * np.linalg.norm(dl)
    np.testing.assert_array_equal(new["layers"]["input_norm"]["scale"],
                                  params["layers"]["input_norm"]["scale"]
                                  - grads["layers"]["input_norm"]["scale"])
  assert step._cache_size() == 1  # no recompilation on the second call
