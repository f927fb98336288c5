"""train/checkpoint.py: bit-exact save/restore (params, opt_state, rng, step) onto the same and
another mesh, keep-N, metadata, snapshots and `load_params` from every accepted path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax.models import config, transformer
from opd_jax.optim import factory
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import state as state_lib

CFG = config.tiny(vocab_size=128, n_layers=1)
OPTIM = factory.OptimConfig(lr=1e-2, weight_decay=0.1)


def _bits(x):
  x = jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return np.asarray(x)


def _assert_bit_identical(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for (path, x), y in zip(la, lb):
    assert x.dtype == y.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=jax.tree_util.keystr(path))


def _setup(shape):
  m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=shape))
  abstract = transformer.abstract_params(CFG)
  tx = factory.make_optimizer(OPTIM, abstract)
  shardings = mesh_lib.state_shardings(tx, mesh_lib.param_shardings(CFG, m), abstract)
  return m, tx, shardings, mesh_lib.abstract_state(tx, abstract, shardings)


@pytest.fixture(scope="module")
def trained_state():
  """A state on a (2, 2, 2) mesh with random (non-trivial) params, optimizer moments and
  hyperparameters, a non-zero step and a folded key (built on the host, then placed)."""
  _, tx, shardings, _ = _setup((2, 2, 2))
  _, params = transformer.init(CFG, 1)
  state = state_lib.create_state(params, tx, 11)
  rng = np.random.default_rng(0)

  def randomize(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.fold_in(x, 5)
    if jnp.issubdtype(x.dtype, jnp.floating):
      return rng.standard_normal(x.shape).astype(x.dtype)
    return np.asarray(x) + 3

  state = jax.tree.map(randomize, state)
  return jax.device_put(state, shardings)


def test_save_restore_bit_identical_same_and_other_mesh(tmp_path, trained_state):
  with ckpt_lib.Checkpointer(tmp_path / "ckpt", keep=2, model_cfg=CFG) as ck:
    assert ck.restore_latest(_setup((2, 2, 2))[3]) is None
    ck.save(3, trained_state, {"data": {"epoch": 1, "index": [3, 4]}, "config": {"lr": 0.01}})
    ck.wait_until_finished()
    for shape in [(2, 2, 2), (1, 4, 1), (1, 1, 1)]:
      _, _, shardings, target = _setup(shape)
      restored, meta = ck.restore_latest(target)
      _assert_bit_identical(trained_state, restored)
      for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert x.sharding == s
      assert meta["data"] == {"epoch": 1, "index": [3, 4]} and meta["step"] == 3
      assert ckpt_lib.model_config_from_dict(meta["model_config"]) == CFG
    assert int(restored.step) == 3
    assert ck.restore_meta()["config"] == {"lr": 0.01}


def test_keep_n_and_latest(tmp_path, trained_state):
  with ckpt_lib.Checkpointer(tmp_path / "ckpt", keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, trained_state, {"i": step})
    ck.wait_until_finished()
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    assert ck.restore_meta() == {"i": 3, "step": 3}
  with pytest.raises(ValueError, match="JSON"):
    ckpt_lib.Checkpointer(tmp_path / "other").save(1, trained_state, {"bad": object()})


def test_snapshots_and_load_params_from_every_path(tmp_path, trained_state):
  params = trained_state.params
  path = ckpt_lib.save_snapshot(tmp_path / "snaps", 7, params, CFG)
  ckpt_lib.save_snapshot(tmp_path / "snaps", 3, jax.tree.map(jnp.zeros_like, params), CFG)
  assert path == (tmp_path / "snaps" / "7")
  with ckpt_lib.Checkpointer(tmp_path / "ckpt", model_cfg=CFG) as ck:
    ck.save(9, trained_state)
  # An unfinished (temporary) step directory with a higher number is never picked.
  (tmp_path / "snaps" / "8.orbax-checkpoint-tmp-123").mkdir()
  for p in [tmp_path / "snaps", path, tmp_path / "ckpt", tmp_path / "ckpt" / "9"]:
    loaded, cfg = ckpt_lib.load_params_and_config(p)
    assert cfg == CFG
    _assert_bit_identical(params, loaded)
    assert isinstance(loaded["embed"]["embedding"], jax.Array)
  # Onto given shardings.
  m, *_ = _setup((1, 4, 1))
  shardings = mesh_lib.param_shardings(CFG, m)
  loaded = ckpt_lib.load_params(tmp_path / "ckpt", shardings=shardings)
  _assert_bit_identical(params, loaded)
  assert loaded["embed"]["embedding"].sharding == shardings["embed"]["embedding"]
  zeros = ckpt_lib.load_params(tmp_path / "snaps" / "3")
  assert not np.any(np.asarray(zeros["embed"]["embedding"]))
  with pytest.raises(FileNotFoundError):
    ckpt_lib.load_params(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="step directory"):
    ckpt_lib.load_params(tmp_path / "empty")


def test_rewriting_a_step_beside_its_unfinished_write_never_races(tmp_path, trained_state):
  """A kill mid-write leaves `<step>.orbax-checkpoint-tmp-*`; the resumed run rewrites that step.
  Orbax's own cleanup ran in a background thread while `delete(step)` removed the same directory
  (FileNotFoundError in about 1 of 20 rewrites). Now the leftovers are gone before any manager
  exists, for snapshots and for checkpoints, every time."""
  params = trained_state.params
  for i in range(12):
    snaps, ckpts = tmp_path / f"snaps{i}", tmp_path / f"ckpt{i}"
    ckpt_lib.save_snapshot(snaps, 8, params, CFG)
    with ckpt_lib.Checkpointer(ckpts, keep=2) as ck:
      ck.save(8, trained_state)
    for root in (snaps, ckpts):
      (root / f"8.orbax-checkpoint-tmp-{i}" / "params").mkdir(parents=True)
      (root / f"8.orbax-checkpoint-tmp-{i}" / "params" / "_partial").write_bytes(b"\0" * 64)
    ckpt_lib.save_snapshot(snaps, 8, params, CFG)
    with ckpt_lib.Checkpointer(ckpts, keep=2) as ck:
      ck.save(8, trained_state)
    for root in (snaps, ckpts):
      assert sorted(p.name for p in root.iterdir()) == ["8"]
    _assert_bit_identical(params, ckpt_lib.load_params(snaps / "8"))
