"""LoRA / PiSSA adapters (`models.lora`): init parity, the merged forward against float64 numpy,
the adapter gradient against the chain rule of the full gradient, a step that moves only the
adapters (Adam moments only for them), every recipe through `loop.run` with adapters, checkpoint
resume, snapshots holding merged params, config refusals, and PEFT parity of the export."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from opd_jax.models import config as model_config
from opd_jax.models import hf
from opd_jax.models import lora
from opd_jax.models import transformer as tf
from opd_jax.optim import factory
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import metrics as metrics_lib
from opd_jax.train import state as state_lib
from opd_jax.train import steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
TWO_STEPS = ["loop.steps=2", "loop.batch_size=4", "loop.checkpoint_every=0",
             "loop.transfer_guard=disallow", "lora.rank=4"]


def _model(seed=0, **kw):
  cfg = model_config.tiny(**kw)
  graphdef, params = tf.init(cfg, seed)
  return cfg, graphdef, params


def _batch(cfg, seed=0, b=2, t=7):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, :2] = False
  return jnp.asarray(tokens), jnp.asarray(mask)


_forward = jax.jit(tf.forward, static_argnums=0)
_merge = jax.jit(lora.merge, static_argnums=2)


def _init(params, lc):
  return jax.jit(lora.init, static_argnums=1)(params, lc)


def _randomize(adapters, seed):
  """Non-zero adapters (a fresh LoRA init has b = 0)."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def _kernels(tree, paths):
  return {p: np.asarray(lora.get_in(tree, p), np.float64) for p in paths}


# -- init parity ----------------------------------------------------------------------------------
def test_lora_init_is_exactly_the_base():
  cfg, graphdef, params = _model()
  lc = lora.LoraConfig(rank=4, alpha=8.0, targets="q_proj|v_proj")
  adapters, base = _init(params, lc)
  assert sorted(adapters["layers"]["attn"]) == ["q_proj", "v_proj"]
  assert set(adapters) == {"layers"}
  a = adapters["layers"]["attn"]["q_proj"]["lora_a"]
  assert a.shape == (cfg.n_layers, cfg.d_model, 4) and np.all(np.asarray(a) != 0)
  assert np.abs(np.asarray(a)).max() <= 1 / np.sqrt(cfg.d_model)  # kaiming-uniform bound
  assert not np.any(np.asarray(adapters["layers"]["attn"]["v_proj"]["lora_b"]))
  merged = _merge(base, adapters, lc.scale)
  for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  tokens, mask = _batch(cfg)
  np.testing.assert_array_equal(np.asarray(_forward(graphdef, merged, tokens, mask)),
                                np.asarray(_forward(graphdef, params, tokens, mask)))


def test_pissa_init_keeps_the_top_singular_part_in_the_adapters():
  cfg, graphdef, params = _model(seed=1)
  lc = lora.LoraConfig(rank=4, alpha=8.0, init="pissa")
  adapters, base = _init(params, lc)
  paths = lora.target_paths(params, lc)
  assert len(paths) == 7  # q k v o gate up down
  for path in paths:
    w = np.asarray(lora.get_in(params, path), np.float64)
    module = lora.get_in(adapters, path[:-1])
    a, b = (np.asarray(module[k], np.float64) for k in ("lora_a", "lora_b"))
    res = np.asarray(lora.get_in(base, path), np.float64)
    # The residual plus the adapter is the base kernel (round-off only) ...
    np.testing.assert_allclose(res + lc.scale * a @ b, w, atol=2e-6, rtol=0)
    # ... and the adapter is the rank-r truncated SVD of the kernel (float64 numpy reference).
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    top = (u[..., :, :4] * s[..., None, :4]) @ vt[..., :4, :]
    np.testing.assert_allclose(lc.scale * a @ b, top, atol=2e-5, rtol=0)
    np.testing.assert_allclose(res, w - top, atol=2e-5, rtol=0)
  tokens, mask = _batch(cfg)
  merged = _merge(base, adapters, lc.scale)
  np.testing.assert_allclose(np.asarray(_forward(graphdef, merged, tokens, mask)),
                             np.asarray(_forward(graphdef, params, tokens, mask)), atol=1e-5,
                             rtol=0)


def test_targets_are_a_regex_over_the_matrix_names():
  _, _, params = _model()
  got = lora.target_paths(params, lora.LoraConfig(rank=2, targets="q_proj|down_proj"))
  assert got == (("layers", "attn", "q_proj", "kernel"), ("layers", "mlp", "down_proj", "kernel"))
  with pytest.raises(lora.LoraTargetError, match="every layer or in none"):
    lora.target_paths(params, lora.LoraConfig(rank=2, targets=r"layers\.0\.attn\.q_proj"))
  with pytest.raises(lora.LoraTargetError, match="'embed' matrix"):
    lora.target_paths(params, lora.LoraConfig(rank=2, targets="embed|q_proj"))
  with pytest.raises(lora.LoraTargetError, match="matches none"):
    lora.target_paths(params, lora.LoraConfig(rank=2, targets="qproj"))
  with pytest.raises(lora.LoraTargetError, match="exceeds"):
    lora.target_paths(params, lora.LoraConfig(rank=65, targets="q_proj"))


def test_adapters_shard_like_the_kernels_they_adapt():
  from jax.sharding import PartitionSpec as P
  cfg = model_config.tiny()
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 4, 2)))
  shard = mesh_lib.adapter_shardings(cfg, lora.LoraConfig(rank=4), mesh)
  q, down = shard["layers"]["attn"]["q_proj"], shard["layers"]["mlp"]["down_proj"]
  # q kernel (layers, embed -> fsdp, heads -> tensor); down kernel (layers, mlp -> tensor,
  # embed -> fsdp); the rank axis is never sharded.
  assert (q["lora_a"].spec, q["lora_b"].spec) == (P(None, "fsdp", None), P(None, None, "tensor"))
  assert (down["lora_a"].spec, down["lora_b"].spec) == (P(None, "tensor", None),
                                                        P(None, None, "fsdp"))


# -- the adapted forward and its gradient against independent references --------------------------
def test_merged_forward_and_adapter_gradient_match_float64_references():
  cfg, graphdef, params = _model(seed=2)
  lc = lora.LoraConfig(rank=3, alpha=6.0, targets="q_proj|o_proj|up_proj")
  adapters, base = _init(params, lc)
  adapters = _randomize(adapters, 0)
  paths = lora.target_paths(params, lc)
  merged = _merge(base, adapters, lc.scale)
  rng = np.random.default_rng(0)
  for path in paths:
    module = {k: np.asarray(v, np.float64) for k, v in lora.get_in(adapters, path[:-1]).items()}
    k = np.asarray(lora.get_in(base, path), np.float64)
    # One layer's output: x @ K_eff against the unmerged form x @ K + s (x @ a) @ b.
    x = rng.normal(size=(5, k.shape[-2]))
    for layer in range(cfg.n_layers):
      want = x @ k[layer] + lc.scale * (x @ module["lora_a"][layer]) @ module["lora_b"][layer]
      got = x @ np.asarray(lora.get_in(merged, path), np.float64)[layer]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The gradient w.r.t. (a, b) through the merge is the chain rule of the full-kernel gradient:
  # dL/da = s dL/dK b^T, dL/db = s a^T dL/dK.
  tokens, mask = _batch(cfg, seed=1)

  def loss_full(p):
    return jnp.sum(jnp.tanh(tf.forward(graphdef, p, tokens, mask)) ** 2)

  g_full = jax.jit(jax.grad(loss_full))(merged)
  g_ad = jax.jit(jax.grad(lambda ad: loss_full(lora.merge(base, ad, lc.scale))))(adapters)
  for path in paths:
    dk = np.asarray(lora.get_in(g_full, path), np.float64)
    module = {k: np.asarray(v, np.float64) for k, v in lora.get_in(adapters, path[:-1]).items()}
    got = lora.get_in(g_ad, path[:-1])
    np.testing.assert_allclose(np.asarray(got["lora_a"]),
                               lc.scale * dk @ np.swapaxes(module["lora_b"], -1, -2),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["lora_b"]),
                               lc.scale * np.swapaxes(module["lora_a"], -1, -2) @ dk,
                               rtol=1e-4, atol=1e-6)


def test_a_step_moves_only_the_adapters_and_adam_holds_adapter_moments_only():
  cfg, graphdef, params = _model(seed=3)
  lc = lora.LoraConfig(rank=4, alpha=8.0)
  adapters, base = _init(params, lc)
  tx = factory.make_optimizer(factory.OptimConfig(lr=1e-2), adapters)
  state = state_lib.create_state(adapters, tx, 0, frozen=base)
  # Optimizer state: Adam's mu and nu for the adapters, nothing of the base's size.
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters))
  full_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert 2 * adapter_bytes <= opt_bytes <= 2 * adapter_bytes + 64  # + count, hyperparameters
  assert opt_bytes < 0.2 * full_bytes
  before = jax.tree.map(np.asarray, (state.params, state.frozen))
  tokens, mask = _batch(cfg, seed=4, b=4, t=8)
  batch = {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": mask}
  # Jitted as the loop does, on an FSDP x tensor mesh of the 8 fake devices, with two
  # micro-batches (the adapter-gradient accumulator is laid out like the adapters).
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 4, 2)))
  s_shard = mesh_lib.state_shardings(tx, mesh_lib.adapter_shardings(cfg, lc, mesh), adapters,
                                     frozen_shardings=mesh_lib.param_shardings(cfg, mesh))
  step = steps.jit_step(steps.sft_step, mesh, s_shard, mesh_lib.batch_sharding(mesh, 2),
                        graphdef=graphdef, tx=tx, lora_scale=lc.scale,
                        cfg=steps.SFTStepConfig(micro_batches=2))
  new, metrics = step(jax.device_put(state, s_shard), batch)
  q_a = new.params["layers"]["attn"]["q_proj"]["lora_a"]
  assert q_a.sharding.spec == s_shard.params["layers"]["attn"]["q_proj"]["lora_a"].spec
  assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/grad_norm"]) > 0
  for x, y in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(before[1])):
    np.testing.assert_array_equal(np.asarray(x), y)  # the base is bit-identical
  # From b = 0, the first gradient reaches b only (dL/da = s dL/dK b^T = 0): every b moved, every
  # a is unchanged.
  for path, module in lora.adapter_modules(new.params):
    old = lora.get_in(before[0], path)
    assert np.any(np.asarray(module["lora_b"]) != old["lora_b"]), path
    np.testing.assert_array_equal(np.asarray(module["lora_a"]), old["lora_a"])
  assert jax.tree.structure(new.params) == jax.tree.structure(adapters)
  with pytest.raises(ValueError, match="no lora_scale"):
    steps.sft_step(state_lib.create_state(adapters, tx, 0, frozen=base), batch,
                   graphdef=graphdef, tx=tx)
  with pytest.raises(ValueError, match="holds no frozen base"):
    steps.sft_step(state_lib.create_state(params, tx, 0), batch, graphdef=graphdef, tx=tx,
                   lora_scale=lc.scale)


# -- config ---------------------------------------------------------------------------------------
def _cfg(spec, overrides):
  return config_lib.from_config_dict(config_lib.load_config(str(ROOT / "configs" / spec),
                                                            overrides))


def test_config_refuses_what_adapters_would_ignore():
  with pytest.raises(config_lib.ConfigError, match=r"lora\.alpha=4\.0 has no effect"):
    _cfg("sft.py:smoke", ["lora.alpha=4.0"])
  with pytest.raises(config_lib.ConfigError, match="subspace_projection"):
    _cfg("sft.py:smoke", ["lora.rank=4", "optim.transforms=('subspace_projection',)"])
  with pytest.raises(config_lib.ConfigError, match=r"subspace\.origin"):
    _cfg("sft.py:smoke", ["lora.rank=4", "subspace.origin=/x", "subspace.at=/y"])
  with pytest.raises(config_lib.ConfigError, match="dropout"):
    _cfg("sft.py:smoke", ["lora.rank=4", "lora.dropout=0.1"])
  with pytest.raises(config_lib.ConfigError, match="init"):
    _cfg("sft.py:smoke", ["lora.rank=4", "lora.init=dora"])
  assert _cfg("sft.py:smoke", ["lora.rank=4", "lora.init=pissa"]).lora.scale == 4.0
  for preset, init in (("lora_tiny", "lora"), ("pissa_tiny", "pissa")):
    cfg = _cfg(f"opd.py:{preset}", [])
    assert (cfg.lora.rank, cfg.lora.scale, cfg.lora.init) == (16, 2.0, init)
    assert config_lib.from_config_dict(config_lib.to_config_dict(cfg)) == cfg


# -- every recipe through the loop ----------------------------------------------------------------
def _train_rows(workdir):
  return [r for r in metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
          if "train/loss" in r]


def test_sft_with_adapters_snapshots_merged_params_and_resumes_exactly(tmp_path):
  over = TWO_STEPS + ["loop.checkpoint_every=1", "loop.snapshot_steps=(0, 2)"]
  cfg = _cfg("sft.py:smoke", over)
  straight = loop.run(cfg, tmp_path / "straight")
  assert straight["step"] == 2
  rows = _train_rows(tmp_path / "straight")
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
  # The checkpoint holds the adapters and the frozen base; load_params merges them.
  ckpt_dir = pathlib.Path(straight["checkpoint_dir"])
  item = ckpt_dir / "2" / ckpt_lib.STATE
  raw = ocp.PyTreeCheckpointer().restore(item)
  adapters, base = raw["params"], raw["frozen"]
  assert set(jax.tree.leaves(jax.tree.map(lambda x: x.ndim, adapters))) == {3}
  opt = raw["opt_state"]
  assert sum(np.asarray(x).size for x in jax.tree.leaves(opt)) < 3 * lora.count(adapters)
  merged = lora.merge(base, adapters, cfg.lora.scale)
  from_ckpt = ckpt_lib.load_params(ckpt_dir / "2")
  snap2 = ckpt_lib.load_params(straight["snapshots"][2])
  snap0 = ckpt_lib.load_params(straight["snapshots"][0])
  for x, y, z in zip(jax.tree.leaves(merged), jax.tree.leaves(from_ckpt), jax.tree.leaves(snap2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
  # LoRA init: the step-0 snapshot is the base itself; only adapted kernels moved since.
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), snap0, snap2)
  assert moved["layers"]["attn"]["q_proj"]["kernel"] and not moved["embed"]["embedding"]
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(snap0)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Export for Hugging Face / PEFT: the base, the adapter, and the merged model.
  paths = ckpt_lib.export_adapters(ckpt_dir / "2", tmp_path / "export")
  _, merged_hf = hf.load(paths["merged"])
  _, base_hf = hf.load(paths["base"])
  for x, y in zip(jax.tree.leaves((merged_hf, base_hf)), jax.tree.leaves((merged, base))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  peft_meta = json.loads((pathlib.Path(paths["adapter"]) / hf.PEFT_CONFIG_FILE).read_text())
  assert (peft_meta["r"], peft_meta["lora_alpha"]) == (cfg.lora.rank, cfg.lora.alpha)
  with pytest.raises(ckpt_lib.CheckpointError, match="not a checkpoint of an adapter run"):
    ckpt_lib.export_adapters(straight["snapshots"][2], tmp_path / "nope")
  # Resume: drop checkpoint 2, continue from checkpoint 1: bit-identical adapters and base at
  # step 2.
  shutil.rmtree(ckpt_dir / "2")
  out = loop.run(cfg, tmp_path / "straight", resume=True)
  assert out["resumed_from"] == 1 and out["step"] == 2
  again = ocp.PyTreeCheckpointer().restore(item)
  for x, y in zip(jax.tree.leaves((again["params"], again["frozen"])),
                  jax.tree.leaves((adapters, base))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("spec,overrides,keys", [
    # With a learned value head (GAE-OPD): the policy's adapters and the head train together.
    ("opd.py:smoke", ["lora.init=pissa", "lora.targets=q_proj|v_proj|down_proj",
                      "credit.kind=gae", "credit.value=learned"],
     ["opd/teacher_gap", "value/loss"]),
    ("rlvr.py:smoke", ["pg.kl_coef=0.1"], ["rlvr/reward_mean", "pg/kl_ref"]),
    ("opd.py:distill_smoke", ["lora.init=pissa"], ["distill/reverse_kl"]),
    # The other initialisation of each method (SFT LoRA: the test above).
    ("opd.py:smoke", [], ["opd/teacher_gap"]),
    ("rlvr.py:smoke", ["lora.init=pissa"], ["rlvr/reward_mean"]),
    ("sft.py:smoke", ["lora.init=pissa"], []),
], ids=["opd_pissa_gae_value", "rlvr_lora_kl", "distill_pissa", "opd_lora", "rlvr_pissa",
        "sft_pissa"])
def test_pg_and_distill_recipes_train_adapters(spec, overrides, keys, tmp_path):
  cfg = _cfg(spec, TWO_STEPS + overrides)
  summary = loop.run(cfg, tmp_path)
  assert summary["step"] == 2
  rows = _train_rows(tmp_path)
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
  for key in keys:
    assert key in rows[-1], (key, sorted(rows[-1]))


# -- export: merged HF checkpoint and the PEFT adapter --------------------------------------------
def test_peft_loads_our_adapter_export_with_the_same_logits(tmp_path):
  import hf_fixtures as F
  import peft

  model = F.torch_model("qwen2", tied=False, seed=5)
  cfg, params = hf.load(F.export(model, tmp_path / "hf"))
  lc = lora.LoraConfig(rank=4, alpha=8.0, init="pissa",
                       targets="q_proj|v_proj|o_proj|down_proj|lm_head")
  initial, base = _init(params, lc)
  adapters = _randomize(initial, 7)  # as if trained
  merged = _merge(base, adapters, lc.scale)
  tokens, mask = F.padded_batch(seed=3, vocab_size=cfg.vocab_size)
  ours = np.asarray(_forward(tf.graphdef_for(cfg), merged, tokens, mask))

  base_dir = hf.save(tmp_path / "base", cfg, base)  # the PiSSA residual base
  adapter_dir = hf.save_peft_adapter(tmp_path / "adapter", cfg, adapters, lc)
  meta = json.loads((adapter_dir / hf.PEFT_CONFIG_FILE).read_text())
  assert (meta["r"], meta["lora_alpha"], meta["peft_type"]) == (4, 8.0, "LORA")
  assert meta["target_modules"] == ["down_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
  with hf.safe_open(str(adapter_dir / hf.PEFT_WEIGHTS_FILE), framework="np") as f:
    names = set(f.keys())
    a0 = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    b1 = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
  assert "base_model.model.lm_head.lora_B.weight" in names
  assert len(names) == 2 * (4 * cfg.n_layers + 1)
  layers = adapters["layers"]
  np.testing.assert_array_equal(a0, np.asarray(layers["attn"]["q_proj"]["lora_a"][0]).T)
  np.testing.assert_array_equal(b1, np.asarray(layers["mlp"]["down_proj"]["lora_b"][1]).T)

  peft_model = peft.PeftModel.from_pretrained(F.load_torch(base_dir), str(adapter_dir)).eval()
  got = F.torch_logits(peft_model, tokens, mask)
  assert np.abs(ours[mask]).max() > 1.0
  np.testing.assert_allclose(got[mask], ours[mask], atol=1e-4, rtol=0)
  # The PiSSA update converted to a rank-2r LoRA adapter on the ORIGINAL base (the checkpoint the
  # run started from): PEFT on that base gives the same logits too.
  converted, conv_cfg = lora.pissa_to_lora(adapters, initial, lc)
  assert (conv_cfg.rank, conv_cfg.scale) == (8, lc.scale)
  conv_dir = hf.save_peft_adapter(tmp_path / "converted", cfg, converted, conv_cfg)
  on_original = peft.PeftModel.from_pretrained(F.load_torch(tmp_path / "hf"), str(conv_dir))
  np.testing.assert_allclose(F.torch_logits(on_original.eval(), tokens, mask)[mask], ours[mask],
                             atol=1e-4, rtol=0)
  # The merged export is a plain transformers checkpoint with the same logits.
  merged_model = F.load_torch(hf.save(tmp_path / "merged", cfg, merged))
  np.testing.assert_allclose(F.torch_logits(merged_model, tokens, mask)[mask], ours[mask],
                             atol=1e-4, rtol=0)
