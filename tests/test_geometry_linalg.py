"""geometry/linalg.py against numpy / scipy float64 references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

from opd_jax.geometry import linalg

ETA = 1e-3


def relative_changed(x0, x1):
  """The paper's definition: cast to bf16, changed iff |b1 - b0| > eta max(|b0|, |b1|)."""
  b0 = np.asarray(x0, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  b1 = np.asarray(x1, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
  return ~(np.abs(b1 - b0) <= ETA * np.maximum(np.abs(b0), np.abs(b1)))


def ulp_bf16(x):
  """The bf16 spacing at the (bf16-representable, normal) value x."""
  e = np.floor(np.log2(np.abs(x)))
  return 2.0 ** (e - 7)


def test_bf16_changed_crafted_cases_match_relative_definition():
  base = np.array([1.0, 1.0 + 2 ** -7, -3.0, 1.5e30, 2.0 ** -120, 0.15625], np.float64)
  x0, x1 = [], []
  for b in base:
    u = ulp_bf16(b)
    for frac in (0.25, 0.4999, 0.5, 0.5001, 0.75, 1.0, 1.5):  # below, at and above half a ULP
      x0.append(b)
      x1.append(b + frac * u)
      x0.append(b)
      x1.append(b - frac * u)
  # Zeros and subnormals: +0 vs -0, values that round to zero, bf16 subnormal spacing 2^-133.
  x0 += [0.0, 0.0, -0.0, 0.0, 1e-40, 1e-40, 1e-40, -1e-45, 3e38, 1e-38]
  x1 += [-0.0, 1e-45, 0.0, 2e-41, 1.2e-40, 1.5e-40, -1e-40, 1e-45, 3.0001e38, 1.001e-38]
  x0 = np.array(x0, np.float32)
  x1 = np.array(x1, np.float32)
  want = relative_changed(x0, x1)
  got = np.asarray(linalg.bf16_changed(jnp.asarray(x0), jnp.asarray(x1)))
  np.testing.assert_array_equal(got, want)
  # Both outcomes occur, including exact ties resolved to even in both directions.
  assert want.any() and (~want).any()
  i_even = 2 * 2      # 1.0 + 0.5 ulp: tie to even (1.0) -> unchanged
  i_odd = 14 + 2 * 2  # (1 + 2^-7) + 0.5 ulp: tie to even (1 + 2^-6) -> changed
  assert not want[i_even] and want[i_odd]
  # bf16 input is compared bitwise, with -0 == +0.
  got_bf16 = linalg.bf16_changed(jnp.asarray(x0, jnp.bfloat16), jnp.asarray(x1, jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(got_bf16), want)


def test_bf16_changed_random_matches_relative_definition():
  rng = np.random.default_rng(0)
  x0 = (rng.standard_normal(200_000) * np.exp(rng.uniform(-30, 30, 200_000))).astype(np.float32)
  x1 = (x0 * (1 + rng.standard_normal(x0.shape) * 10.0 ** rng.uniform(-5, -1, x0.shape))
        ).astype(np.float32)
  want = relative_changed(x0, x1)
  got = np.asarray(linalg.bf16_changed(jnp.asarray(x0), jnp.asarray(x1)))
  np.testing.assert_array_equal(got, want)
  assert 0.2 < want.mean() < 0.8


def test_float64_is_locally_scoped_and_required():
  a = jnp.ones((1, 3, 4), jnp.float32)
  with pytest.raises(RuntimeError, match="float64"):
    linalg.pair_grams(a, a, "input")
  with linalg.float64():
    g00, _, _ = linalg.pair_grams(a, a, "input")
    assert g00.dtype == jnp.float64
  assert not jax.config.jax_enable_x64
  assert jnp.ones(2, jnp.float32).astype(float).dtype == jnp.float32


def _ref_pair(w0, w1, k):
  """numpy/scipy float64: NSS and the largest input/output-side angle (degrees)."""
  u0, s0, v0t = np.linalg.svd(w0, full_matrices=False)
  u1, s1, v1t = np.linalg.svd(w1, full_matrices=False)
  nss = np.linalg.norm(s1 - s0) / np.linalg.norm(s0)
  a_in = np.degrees(scipy.linalg.subspace_angles(u0[:, :k], u1[:, :k]))
  a_out = np.degrees(scipy.linalg.subspace_angles(v0t[:k].T, v1t[:k].T))
  return nss, a_in.max(), a_out.max(), s0, s1


def _ours(w0, w1, k, r=3):  # k=10, r=3 and S=24 as in test_geometry_endpoint (shared compiles)
  short = "input" if w0.shape[0] <= w0.shape[1] else "output"
  with linalg.float64():
    grams = linalg.pair_grams(jnp.asarray(w0[None]), jnp.asarray(w1[None]), short)
    sp = linalg.pair_spectra(*grams, k=k, r=r)
    out = jax.tree.map(np.asarray, sp)
  ang = {short: out.max_angle_short[0],
         ("output" if short == "input" else "input"): out.max_angle_long[0]}
  return out, ang


@pytest.mark.parametrize("shape,k", [((24, 40), 10), ((32, 24), 10), ((50, 24), 10)])
def test_pair_spectra_random_and_low_rank_update(shape, k):
  rng = np.random.default_rng(sum(shape))
  w0 = rng.standard_normal(shape).astype(np.float32)
  cases = {
      "random": w0 + 0.05 * rng.standard_normal(shape),
      "rank2": w0 + 0.3 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1]))
      + 0.2 * np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1])),
      "tiny": w0 + 1e-6 * rng.standard_normal(shape),
  }
  for name, w1 in cases.items():
    w1 = w1.astype(np.float32)
    nss, a_in, a_out, s0, s1 = _ref_pair(w0.astype(np.float64), w1.astype(np.float64), k)
    out, ang = _ours(w0, w1, k)
    np.testing.assert_allclose(out.sigma0[0], s0, rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(out.sigma1[0], s1, rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(out.nss[0], nss, rtol=1e-6, err_msg=name)
    assert abs(ang["input"] - a_in) < 1e-6, (name, ang, a_in)
    assert abs(ang["output"] - a_out) < 1e-6, (name, ang, a_out)
    assert a_in > 1e-4 and a_out > 1e-4  # not trivially zero


def test_pair_spectra_rotated_subspaces_with_known_angles():
  rng = np.random.default_rng(7)
  m, n, k = 40, 24, 10
  ua, _ = np.linalg.qr(rng.standard_normal((m, m)))
  vb, _ = np.linalg.qr(rng.standard_normal((n, n)))
  s = np.linspace(10, 1, n)
  w0 = ua[:, :n] * s @ vb.T
  theta = np.radians(np.array([1e-4, 0.01, 0.5, 3.0, 12.0, 25.0, 33.0, 41.0, 2.0, 7.0]))
  u1 = ua.copy()
  for i, t in enumerate(theta):  # rotate the plane (u_i, u_{k+i}): top-k angles are exactly theta
    u1[:, i] = np.cos(t) * ua[:, i] + np.sin(t) * ua[:, k + i]
    u1[:, k + i] = -np.sin(t) * ua[:, i] + np.cos(t) * ua[:, k + i]
  w1 = u1[:, :n] * s @ vb.T
  with linalg.float64():
    grams = linalg.pair_grams(jnp.asarray(w0[None]), jnp.asarray(w1[None]), "output")
    sp = linalg.pair_spectra(*grams, k=k, r=3)
    assert abs(float(sp.max_angle_long[0]) - np.degrees(theta.max())) < 1e-6  # input side
    assert float(sp.max_angle_short[0]) < 1e-6                                # output side
    # Full curves from explicit bases.
    t0, t1 = linalg.top_subspaces(jnp.asarray(w0), k), linalg.top_subspaces(jnp.asarray(w1), k)
    curve = np.asarray(linalg.principal_angles(t0.input, t1.input))
    np.testing.assert_allclose(curve, np.degrees(np.sort(theta)), atol=1e-9, rtol=0)
    assert np.asarray(linalg.principal_angles(t0.output, t1.output)).max() < 1e-9
    np.testing.assert_allclose(np.asarray(t0.sigma), s[:k], rtol=1e-12)


@pytest.mark.parametrize("k", [10, 16])  # short-side sines from rs^T rs (k <= S - k) / z z^T
def test_pair_spectra_large_angles_on_both_sides(k):
  """Angles above 45 degrees (the cosine branch) on both sides, batched with a small update
  (the sine branch) so that both branches run in one call; against scipy."""
  rng = np.random.default_rng(21 + k)
  m, n = 40, 24
  ua, _ = np.linalg.qr(rng.standard_normal((m, m)))
  vb, _ = np.linalg.qr(rng.standard_normal((n, n)))
  s = np.linspace(10, 1, n)
  w0 = ua[:, :n] * s @ vb.T

  def rotate(q, i, j, deg):
    q = q.copy()
    t = np.radians(deg)
    q[:, i], q[:, j] = np.cos(t) * q[:, i] + np.sin(t) * q[:, j], \
        -np.sin(t) * q[:, i] + np.cos(t) * q[:, j]
    return q

  w_big = rotate(ua, 2, k + 3, 80.0)[:, :n] * s @ rotate(vb, 1, k + 2, 62.0).T
  w_small = w0 + 1e-3 * rng.standard_normal((m, n))
  w1 = np.stack([w_big, w_small]).astype(np.float32)
  w0s = np.stack([w0, w0]).astype(np.float32)
  with linalg.float64():
    grams = linalg.pair_grams(jnp.asarray(w0s), jnp.asarray(w1), "output")
    sp = jax.tree.map(np.asarray, linalg.pair_spectra(*grams, k=k, r=3))
  for i in range(2):
    nss, a_in, a_out, _, _ = _ref_pair(w0s[i].astype(np.float64), w1[i].astype(np.float64), k)
    assert abs(sp.max_angle_long[i] - a_in) < 1e-6, (i, sp.max_angle_long[i], a_in)
    assert abs(sp.max_angle_short[i] - a_out) < 1e-6, (i, sp.max_angle_short[i], a_out)
    np.testing.assert_allclose(sp.nss[i], nss, rtol=1e-6)
  assert sp.max_angle_long[0] > 79 and sp.max_angle_short[0] > 61  # the cosine branch ran
  assert sp.max_angle_long[1] < 45 and sp.max_angle_short[1] < 45


def test_principal_angles_known_angles_small_and_near_90():
  rng = np.random.default_rng(3)
  m, k = 40, 6
  basis, _ = np.linalg.qr(rng.standard_normal((m, 2 * k)))
  q0, p = basis[:, :k], basis[:, k:]
  theta = np.radians(np.array([1e-7, 1e-5, 0.3, 44.9, 60.0, 89.99]))
  q1 = q0 * np.cos(theta) + p * np.sin(theta)
  q1 = q1 @ np.linalg.qr(rng.standard_normal((k, k)))[0]  # same span, mixed columns
  with linalg.float64():
    got = np.asarray(linalg.principal_angles(jnp.asarray(q0), jnp.asarray(q1)))
  np.testing.assert_allclose(got, np.degrees(theta), atol=1e-9, rtol=0)
  # scipy as a second reference: its small angles are accurate to a few 1e-6 degrees only, and
  # that varies with the BLAS / CPU (3.7e-6 deg for the 1e-7 deg angle on an AMD EPYC machine);
  # the exact angles above are the tight check.
  ref = np.sort(np.degrees(scipy.linalg.subspace_angles(q0, q1)))
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def _decaying(rng, m, n, decay=0.7, noise=1e-3):
  u, _ = np.linalg.qr(rng.standard_normal((m, m)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  r = min(m, n)
  s = decay ** np.arange(r)
  return (u[:, :r] * s @ v[:, :r].T + noise * rng.standard_normal((m, n)))


def test_top_k_svd_randomized_and_exact_fallback():
  rng = np.random.default_rng(11)
  a = np.stack([_decaying(rng, 24, 24), _decaying(rng, 24, 24, decay=0.8)])
  k = 8  # block 12 as in test_geometry_trajectory (shared compiles)
  with linalg.float64():
    fast = linalg.top_k_svd(jnp.asarray(a), k, oversample=4, tol=1e-12)
    slow = linalg.top_k_svd(jnp.asarray(a), k, oversample=4, max_iters=1, tol=1e-12)
    sims = []
    for top in (fast, slow):
      for i in range(2):
        u, s, vt = np.linalg.svd(a[i])
        np.testing.assert_allclose(np.asarray(top.s[i]), s[:k], rtol=1e-10)
        sims.append(float(linalg.subspace_similarity(top.u[i], jnp.asarray(u[:, :k]))))
        sims.append(float(linalg.subspace_similarity(top.v[i], jnp.asarray(vt[:k].T))))
        # A^T u = s v and ||A v - s u|| small: the stated accuracy.
        res = a[i] @ np.asarray(top.v[i]) - np.asarray(top.u[i]) * np.asarray(top.s[i])
        assert np.abs(res).max() <= 1e-10 * s[0]
  np.testing.assert_allclose(sims, 1.0, atol=1e-9)
  assert fast.converged.all() and (fast.iterations > 1).all()
  assert not slow.converged.any()


def test_spectral_norm_hill_and_similarity_against_numpy():
  rng = np.random.default_rng(5)
  a = np.stack([_decaying(rng, 30, 20), rng.standard_normal((30, 20))])
  with linalg.float64():
    s1, _ = linalg.spectral_norm(jnp.asarray(a), iters=5000, tol=1e-15)
    np.testing.assert_allclose(np.asarray(s1), [np.linalg.norm(x, 2) for x in a], rtol=1e-6)
    s = np.linalg.svd(a[1], compute_uv=False)[:7]
    want = 1.0 / np.mean(np.log(s[:-1] / s[-1]))
    np.testing.assert_allclose(float(linalg.hill_estimate(jnp.asarray(s))), want, rtol=1e-12)
    q0 = np.linalg.qr(rng.standard_normal((30, 5)))[0]
    q1 = np.linalg.qr(rng.standard_normal((30, 5)))[0]
    want = np.sum((q0.T @ q1) ** 2) / 5
    np.testing.assert_allclose(float(linalg.subspace_similarity(jnp.asarray(q0),
                                                                jnp.asarray(q1))), want,
                               rtol=1e-12)
    assert np.isnan(float(linalg.hill_estimate(jnp.asarray([2.0, 0.0]))))


def test_after_is_exact_and_orders_lapack_calls_by_data():
  """`_after` must not change values (also with non-finite deps) and must add a real data edge:
  the jaxpr of x after a dep reads the dep (an optimization barrier would not order the CPU
  runtime; see the linalg module docstring)."""
  rng = np.random.default_rng(3)
  with linalg.float64():
    x = jnp.asarray(rng.standard_normal((3, 4)))
    for dep in (jnp.asarray(rng.standard_normal(5)), jnp.array([jnp.nan, 1.0]),
                jnp.array([jnp.inf])):
      np.testing.assert_array_equal(np.asarray(jax.jit(linalg._after)(x, dep)), np.asarray(x))
    jaxpr = jax.make_jaxpr(linalg._after)(x, jnp.ones(2))
    dep_var = jaxpr.jaxpr.invars[1]
    assert any(v is dep_var for e in jaxpr.jaxpr.eqns for v in e.invars)
    assert "optimization_barrier" not in str(jaxpr)
