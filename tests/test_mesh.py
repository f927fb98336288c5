"""train/mesh.py (mesh, shardings, sharded init, resharding, multi-process helpers); `plan` is in
test_plan.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from opd_jax.models import config, transformer
from opd_jax.optim import factory
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import state as state_lib

CFG = config.tiny(vocab_size=128, n_layers=1)


def _mesh(shape=(2, 2, 2)):
  return mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=shape))


def test_mesh_config_and_make_mesh():
  assert mesh_lib.MeshConfig(shape=(1, -1, 2)).resolved_shape(8) == (1, 4, 2)
  m = _mesh((1, -1, 1))
  assert dict(m.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  assert m.devices.size == 8
  assert _mesh((1, 1, 1)).devices.size == 1
  with pytest.raises(ValueError, match="needs 16 devices"):
    _mesh((2, 4, 2))
  with pytest.raises(ValueError, match="at most one -1"):
    mesh_lib.MeshConfig(shape=(-1, -1, 1))
  with pytest.raises(ValueError, match="axes"):
    mesh_lib.MeshConfig(shape=(2, 2))
  with pytest.raises(ValueError, match="unknown logical axis"):
    mesh_lib.MeshConfig(rules=(("batchh", "data"),))


def test_param_shardings_follow_logical_rules_and_fall_back_when_indivisible():
  m = _mesh((1, 2, 4))
  cfg = config.tiny(vocab_size=130, n_layers=1)  # 130 rows: not divisible by tensor=4
  s = mesh_lib.param_shardings(cfg, m)
  assert s["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert s["layers"]["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert s["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert s["layers"]["input_norm"]["scale"].spec == P(None, None)
  assert s["embed"]["embedding"].spec == P(None, "fsdp")  # vocab replicated, embed over fsdp
  assert mesh_lib.param_shardings(CFG, m)["embed"]["embedding"].spec == P("tensor", "fsdp")


def test_init_sharded_params_equals_unsharded_init():
  m = _mesh()
  graphdef, params = mesh_lib.init_sharded_params(CFG, m, seed=3)
  _, ref = transformer.init(CFG, 3)
  expected = mesh_lib.param_shardings(CFG, m)
  for (path, x), s, r in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(expected), jax.tree.leaves(ref)):
    assert x.sharding == s, jax.tree_util.keystr(path)
    # Same random draws; jit may fuse the init scale differently from eager mode (1 ulp).
    np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=1e-6, atol=1e-9)
  assert graphdef == transformer.graphdef_for(CFG)


def test_opt_state_and_state_shardings_mirror_params():
  m = _mesh()
  abstract = transformer.abstract_params(CFG)
  p_shard = mesh_lib.param_shardings(CFG, m)
  tx = factory.make_optimizer(factory.OptimConfig(weight_decay=0.1), abstract)
  ss = mesh_lib.state_shardings(tx, p_shard, abstract)
  adam = ss.opt_state.inner_state[1]
  assert jax.tree.map(lambda s: s.spec, adam.mu) == jax.tree.map(lambda s: s.spec, p_shard)
  assert jax.tree.map(lambda s: s.spec, adam.nu) == jax.tree.map(lambda s: s.spec, p_shard)
  assert adam.count.spec == P() and ss.step.spec == P() and ss.rng.spec == P()
  assert ss.opt_state.hyperparams["learning_rate"].spec == P()
  # The state is created directly in that layout.
  _, params = mesh_lib.init_sharded_params(CFG, m)
  state = mesh_lib.init_sharded_state(params, tx, 0, ss)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(ss)):
    assert x.sharding == s
  assert int(state.step) == 0
  assert "TrainState(step=0" in repr(state)


def test_batch_sharding_global_batch_and_reshard():
  m = _mesh()
  assert mesh_lib.batch_sharding(m, 2).spec == P(("data", "fsdp"), None)
  assert mesh_lib.batch_sharding(m, 3).spec == P(("data", "fsdp"), None, None)
  rng = np.random.default_rng(0)
  local = {"tokens_BxT": rng.integers(0, 9, (8, 5)).astype(np.int32),
           "mask_BxT": rng.random((8, 5)) > 0.5}
  batch = mesh_lib.global_batch(local, m)
  for k, v in batch.items():
    np.testing.assert_array_equal(np.asarray(v), local[k])
    assert v.sharding.spec == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="answer_B"):
    mesh_lib.global_batch({"answer_B": np.array(["1", "2"])}, m)
  assert mesh_lib.process_rows(8) == slice(0, 8)
  # reshard params from the training layout to a different mesh / layout (sampling layout).
  _, params = mesh_lib.init_sharded_params(CFG, m)
  other = mesh_lib.param_shardings(CFG, _mesh((1, 1, 4)))
  moved = mesh_lib.reshard(params, other)
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(moved), jax.tree.leaves(other)):
    assert b.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_maybe_initialize_distributed_single_process_and_errors(monkeypatch):
  for var in ("OPD_COORDINATOR", "OPD_NUM_PROCESSES", "OPD_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.maybe_initialize_distributed() is False
  monkeypatch.setenv("OPD_NUM_PROCESSES", "1")
  assert mesh_lib.maybe_initialize_distributed() is False
  monkeypatch.setenv("OPD_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="OPD_COORDINATOR"):
    mesh_lib.maybe_initialize_distributed()
  with pytest.raises(ValueError, match="outside"):
    mesh_lib.maybe_initialize_distributed("127.0.0.1:1", 2, 5)


def test_multi_process_cpu_collectives_time_out_unless_xla_flags_say_otherwise(monkeypatch):
  """A multi-process run bounds how long a CPU collective waits for its peers (XLA's default is
  30 minutes); a timeout already in XLA_FLAGS is kept, other flags are kept."""
  flag = "--xla_cpu_collective_timeout_seconds"
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  mesh_lib._bound_cpu_collective_waits()  # noqa: SLF001
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=8", f"{flag}={mesh_lib.CPU_COLLECTIVE_TIMEOUT_S}"]
  monkeypatch.setenv("XLA_FLAGS", f"{flag}=5")
  mesh_lib._bound_cpu_collective_waits()  # noqa: SLF001
  assert os.environ["XLA_FLAGS"] == f"{flag}=5"
  monkeypatch.delenv("XLA_FLAGS")
  mesh_lib._bound_cpu_collective_waits()  # noqa: SLF001
  assert os.environ["XLA_FLAGS"] == f"{flag}={mesh_lib.CPU_COLLECTIVE_TIMEOUT_S}"


def test_step_rng_folds_in_step():
  tx = factory.make_optimizer(factory.OptimConfig(), {"w": jnp.zeros((2, 2))})
  s = state_lib.create_state({"w": jnp.zeros((2, 2))}, tx, 7)
  k0 = jax.random.key_data(state_lib.step_rng(s))
  k1 = jax.random.key_data(state_lib.step_rng(s.replace(step=s.step + 1)))
  np.testing.assert_array_equal(k0, jax.random.key_data(jax.random.fold_in(jax.random.key(7), 0)))
  assert not np.array_equal(k0, k1)


def test_subspace_bases_in_optimizer_state_follow_their_params():
  from opd_jax.optim import subspace
  m = _mesh()
  _, params = mesh_lib.init_sharded_params(CFG, m)
  _, other = transformer.init(CFG, 1)
  delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, other)
  bases = subspace.capture_bases(delta, k=4)
  cfg = factory.OptimConfig(transforms=(("subspace_projection", "pre", {}),))
  abstract = transformer.abstract_params(CFG)
  tx = factory.make_optimizer(cfg, abstract, subspace_bases=bases)
  ss = mesh_lib.state_shardings(tx, mesh_lib.param_shardings(CFG, m), abstract)
  proj_state = ss.opt_state.inner_state[1]
  assert proj_state.bases["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", None)
  assert proj_state.bases["layers"]["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", None)
  assert ss.opt_state.inner_state[2].mu["layers"]["attn"]["q_proj"]["kernel"].spec == P(
      None, "fsdp", "tensor")


def test_process_rows_mismatch_refuses_shared_rows_and_split_groups(monkeypatch):
  """Each process loads its own rows, laid in order into the blocks its devices hold: no row on
  two processes, and non-adjacent blocks of whole groups. 2 processes x 2 devices, 8 rows in 4
  blocks of 2 (or replicated)."""
  class Device(tuple):
    process_index = property(lambda self: self[1])

  def layout(blocks):   # blocks[i]: the process whose device holds block i (None: replicated)
    class Sharding:
      def devices_indices_map(self, shape):
        if blocks is None:
          return {Device((i, i // 2)): (slice(None),) for i in range(4)}
        return {Device((i, p)): (slice(2 * i, 2 * i + 2),) for i, p in enumerate(blocks)}
    monkeypatch.setattr(mesh_lib, "batch_sharding", lambda *a, **k: Sharding())

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  layout([0, 0, 1, 1])
  assert mesh_lib.process_rows_mismatch(None, 8, group=4) is None
  # Host-interleaved (as TPU pods' device meshes are): process 0 holds blocks 0 and 2. Sound
  # while blocks hold whole groups of consecutive rows.
  layout([0, 1, 0, 1])
  assert mesh_lib.process_rows_mismatch(None, 8, group=2) is None
  assert mesh_lib.process_rows_mismatch(None, 8, group=4) == (
      "process 0's devices hold non-adjacent blocks of 2 batch rows, which split the groups of 4 "
      "consecutive rows")
  layout(None)           # the batch replicated over the processes
  assert mesh_lib.process_rows_mismatch(None, 8) == (
      "batch row 0 is on the devices of processes 0 and 1: the batch axes do not split the "
      "batch over the processes, which each load their own rows")
