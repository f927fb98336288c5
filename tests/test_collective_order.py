"""train/collective_order.py finds a loop holding collectives that no data dependency orders
against another collective, on programs built to have one or not; `sharding.after` and
`sharding.gathered_after` order them for real (in the compiled program) and change no value
or gradient. The recipes' compiled phases are audited in tests/test_plan.py (`_check_totals`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opd_jax.models import sharding
from opd_jax.train import collective_order

RULES = (("batch", "fsdp"), ("embed", "fsdp"), ("vocab", "tensor"))


def _mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))


def _program(order: bool):
  """A layer scan over FSDP-sharded weights (an all-gather inside the loop) and, beside it, the
  sum of a row-sharded mask (an all-reduce) and a gather of an output matrix that read nothing
  from the loop, unless `order`."""
  mesh = _mesh()

  def fn(w_LxDxD, out_DxV, x_BxD, mask_BxT):
    def layer(h, w):
      w = jax.lax.with_sharding_constraint(w, P(None, None))  # gathered inside the loop
      return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(layer, x_BxD, w_LxDxD)
    if order:
      out_DxV = sharding.gathered_after(h, out_DxV, ("embed", "vocab"))
      mask_BxT = sharding.after(h, mask_BxT)
    logits = h @ jax.lax.with_sharding_constraint(out_DxV, P(None, "tensor"))
    return logits, jnp.sum(mask_BxT)

  def arg(shape, *spec):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(*spec)))

  args = (arg((3, 16, 16), None, "fsdp"), arg((16, 32), "fsdp", "tensor"), arg((8, 16), "fsdp"),
          arg((8, 5), "fsdp"))
  with jax.set_mesh(mesh), sharding.axis_rules(RULES), sharding.ordered_collectives():
    return jax.jit(fn).lower(*args).compile().as_text()


def test_finds_the_collectives_beside_a_loop_and_none_once_ordered():
  pairs = collective_order.unordered_loop_collectives(_program(order=False))
  assert pairs, "the unordered program has a gather and a sum beside its layer loop"
  assert {p.other_opcode for p in pairs} <= collective_order.COLLECTIVES | {"while"}
  assert all(p.loop.startswith("while") for p in pairs)
  assert collective_order.unordered_loop_collectives(_program(order=True)) == []


HLO = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]) parameter(0)
  %x = f32[4] get-tuple-element(%p), index=1
  %ag = f32[4] all-gather(%x), channel_id=1, dimensions={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4]) tuple(%i, %ag)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (a: f32[4], b: f32[4]) -> (f32[4], f32[4], f32[4]) {
  %a = f32[4] parameter(0)
  %b = f32[4] parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]) tuple(%zero, %a)
  %loop = (s32[], f32[4]) while(%init), condition=%cond, body=%body
  %out = f32[4] get-tuple-element(%loop), index=1
  %beside = f32[4] all-reduce(%b), channel_id=2, to_apply=%add
  %after = f32[4] all-reduce(%out), channel_id=3, to_apply=%add
  ROOT %r = (f32[4], f32[4], f32[4]) tuple(%out, %beside, %after)
}
"""


def test_pairs_follow_the_data_dependencies_of_hand_written_hlo():
  pairs = collective_order.unordered_loop_collectives(HLO)
  # %beside reads nothing from the loop; %after reads its output; the loop body's own
  # all-gather is ordered by the body's executor.
  assert [(p.computation, p.loop, p.other, p.other_opcode) for p in pairs] == [
      ("main", "loop", "beside", "all-reduce")]
  comps = collective_order.parse_computations(HLO)
  assert [i.name for i in comps["body"]] == ["p", "x", "ag", "i", "t"]
  assert next(i for i in comps["main"] if i.name == "loop").called == ("cond", "body")


def test_after_changes_no_value_or_gradient_and_refuses_integers():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(4,)), jnp.float32)

  def f(w, x):
    return jnp.sum(jnp.sin(sharding.after(x * 2.0, w)) @ x)

  def ref(w, x):
    return jnp.sum(jnp.sin(w) @ x)

  # (`after` adds nothing unless the programs order their collectives)
  with jax.set_mesh(_mesh()), sharding.ordered_collectives():
    assert sharding.orders_collectives()
    np.testing.assert_array_equal(np.asarray(jax.jit(sharding.after)(x, w)), np.asarray(w))
    for argnum in (0, 1):
      np.testing.assert_allclose(jax.jit(jax.grad(f, argnum))(w, x), jax.grad(ref, argnum)(w, x),
                                 rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="floating-point"):
      jax.jit(sharding.after)(x, jnp.arange(3))


def test_gathered_after_lays_weights_out_whole_over_the_batch_axes():
  mesh = _mesh()
  w = jax.device_put(jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32),
                     NamedSharding(mesh, P("fsdp", "tensor")))
  h = jax.device_put(jnp.ones((8, 16), jnp.float32), NamedSharding(mesh, P("fsdp")))
  with jax.set_mesh(mesh), sharding.axis_rules(RULES), sharding.ordered_collectives():
    out = jax.jit(lambda h, w: sharding.gathered_after(h, w, ("embed", "vocab")))(h, w)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(w))
  # fsdp (the batch's axis) dropped, tensor kept.
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tensor")), 2)


def test_only_multi_process_cpu_programs_are_ordered_unless_forced():
  w = jnp.ones((3, 4), jnp.float32)
  x = jnp.ones((4,), jnp.float32)
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("fsdp",))
  with sharding.ordered_collectives():
    assert not sharding.orders_collectives()  # no mesh in context: nothing to order
    assert sharding.after(x, w) is w
    assert sharding.gathered_after(x, w, ("embed", "vocab")) is w
    with jax.set_mesh(one):
      assert not sharding.orders_collectives()
  with jax.set_mesh(_mesh()):
    assert not sharding.orders_collectives()  # one process: programs as written (TPU's too)
    assert sharding.after(x, w) is w
    with sharding.ordered_collectives():
      assert sharding.orders_collectives()  # (the suite runs on CPU)
    with sharding.ordered_collectives(False):
      assert not sharding.orders_collectives()


def test_live_geometry_monitor_ordered_gives_the_same_numbers_with_no_unordered_pair():
  from opd_jax.geometry import live
  from opd_jax.models import config
  from opd_jax.train import mesh as mesh_lib
  cfg = config.tiny(vocab_size=64, n_layers=2)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 8, 1)), jax.devices()[:8])
  _, origin = mesh_lib.init_sharded_params(cfg, mesh, seed=0)
  _, other = mesh_lib.init_sharded_params(cfg, mesh, seed=1)
  params = jax.tree.map(lambda a, b: a + 0.01 * b, origin, other)  # a small update
  geo = live.LiveGeometryConfig(every=1, k=4)
  replicated = mesh_lib.replicated(mesh)
  fresh = lambda: jax.device_put(live.init_bases(origin, geo), replicated)  # noqa: E731
  out = {}
  for ordered in (False, True):
    monitor = live.make_monitor(geo, replicated=replicated)
    with jax.set_mesh(mesh), sharding.ordered_collectives(ordered):
      if ordered:
        text = monitor.lower(origin, params, fresh()).compile().as_text()
        assert collective_order.unordered_loop_collectives(text) == []
      out[ordered] = live.to_host(monitor(origin, params, fresh())[0])
  assert out[True].keys() == out[False].keys() and "geometry/density" in out[True]
  for k in out[True]:
    np.testing.assert_allclose(out[True][k], out[False][k], rtol=1e-4, atol=1e-6, err_msg=k)
