"""hf.py without torch: config conversion, save/load round trips, sharded placement on a fake
8-device mesh, atomic saves, and one test per bad-checkpoint case checking the message."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from opd_jax.models import config as mc
from opd_jax.models import hf
from opd_jax.models import transformer as tf
from opd_jax.models.sharding import DEFAULT_RULES, axis_rules, logical_to_spec

CONFIGS = {
    "qwen3_tied_hd32": mc.tiny(vocab_size=97, family="qwen3", head_dim=32, rope_theta=1e6),
    "qwen2_untied": mc.tiny(vocab_size=97, family="qwen2", tie_embeddings=False, rms_eps=1e-5),
    "llama3_rope": mc.tiny(vocab_size=97, family="llama", tie_embeddings=False,
                           rope_type="llama3", rope_factor=32.0, rope_theta=5e5,
                           rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                           rope_original_max_position=8192, max_position=131072),
    "qwen3_moe": mc.tiny_moe(vocab_size=97, tie_embeddings=False, norm_topk_prob=True,
                             router_aux_loss_coef=0.01),
    "llama_linear": mc.tiny(vocab_size=97, family="llama", tie_embeddings=False,
                            rope_type="linear", rope_factor=4.0, rope_theta=5e5, n_kv_heads=4,
                            max_position=512),
}


def _random_params(cfg, seed):
  """Random numpy params, every leaf (norm scales and biases included) far from its init value.

  (numpy rather than jax.random: no per-shape compilation.)"""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (rng.normal(0.1, 0.3, x.shape)).astype(x.dtype),
                      tf.abstract_params(cfg))


def _tokenizer(n, eos="t1", pad="t2"):
  tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0",
                                              eos_token=eos, pad_token=pad)


def _tensors(path):
  with safe_open(str(path), framework="np") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """An untied qwen2 checkpoint written by `hf.save` (the template for bad checkpoints)."""
  cfg = CONFIGS["qwen2_untied"]
  params = _random_params(cfg, 0)
  directory = hf.save(tmp_path_factory.mktemp("ckpt") / "qwen2", cfg, params)
  return cfg, params, directory


def _variant(saved, tmp_path, edit=None, config_edit=None):
  """A copy of the saved checkpoint with its tensors (dict) and/or config (dict) edited."""
  _, _, src = saved
  tensors = _tensors(src / hf.SINGLE_FILE)
  config = json.loads((src / "config.json").read_text())
  if edit:
    edit(tensors)
  if config_edit:
    config_edit(config)
  out = tmp_path / "variant"
  out.mkdir()
  save_file(tensors, str(out / hf.SINGLE_FILE), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(config))
  return out


# -- config conversion ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_roundtrip_through_transformers(name, tmp_path):
  cfg = CONFIGS[name]
  d = hf.config_to_hf(cfg)
  assert hf.config_from_hf(d) == cfg
  # transformers' own config class builds the same thing, and writes a config.json we read back.
  hf_cfg = transformers.AutoConfig.for_model(d["model_type"],
                                             **{k: v for k, v in d.items() if k != "model_type"})
  assert hf.config_from_hf(hf_cfg) == cfg
  hf_cfg.save_pretrained(str(tmp_path))
  assert hf.config_from_hf(tmp_path) == cfg
  assert hf.config_from_hf(tmp_path / "config.json", dtype="bfloat16") == cfg.replace(
      dtype="bfloat16")


def test_config_from_hf_defaults_and_legacy_fields():
  base = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=8)
  llama = hf.config_from_hf({"model_type": "llama", **base, "rope_theta": 5e5,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                             "dtype": "bfloat16"})
  assert (llama.head_dim, llama.n_kv_heads, llama.qk_norm, llama.qkv_bias) == (16, 8, False, False)
  assert (llama.rope_type, llama.rope_factor, llama.rope_theta) == ("linear", 8.0, 5e5)
  assert (llama.param_dtype, llama.dtype) == ("float32", "bfloat16")
  llama3 = hf.config_from_hf({"model_type": "llama", **base, "max_position_embeddings": 131072,
                              "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                               "rope_theta": 5e5, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 8192}})
  assert (llama3.rope_type, llama3.rope_factor, llama3.rope_low_freq_factor,
          llama3.rope_high_freq_factor, llama3.rope_original_max_position) == (
              "llama3", 32.0, 1.0, 4.0, 8192)
  qwen3 = hf.config_from_hf({"model_type": "qwen3", **base, "num_key_value_heads": 2})
  assert (qwen3.head_dim, qwen3.n_kv_heads, qwen3.qk_norm) == (128, 2, True)  # transformers default
  assert qwen3.tie_embeddings is False and qwen3.dtype == "float32"
  qwen2 = hf.config_from_hf({"model_type": "qwen2", **base, "tie_word_embeddings": True,
                             "num_key_value_heads": 4})
  assert (qwen2.qkv_bias, qwen2.qk_norm, qwen2.head_dim, qwen2.tie_embeddings) == (
      True, False, 16, True)
  # transformers' Qwen2Config defaults num_key_value_heads to 32 (not to the head count).
  with pytest.raises(ValueError, match=r"config dict: ModelConfig\.n_kv_heads=32: must divide"):
    hf.config_from_hf({"model_type": "qwen2", **base})


@pytest.mark.parametrize("config, match", [
    ({"model_type": "gpt2"}, r"unsupported model_type 'gpt2'; supported model types: qwen3, "
     r"qwen2, llama, qwen3_moe"),
    ({"model_type": "qwen3", "architectures": ["Qwen3ForSequenceClassification"]},
     r"architectures=.*unsupported architecture 'Qwen3ForSequenceClassification'"),
    ({"model_type": "qwen3", "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                 "rope_theta": 1e6,
                                                 "original_max_position_embeddings": 4096}},
     r"rope_parameters=.*unsupported rope_type 'yarn'"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                 "rope_theta": 5e5}},
     r"unsupported rope_type 'dynamic'"),
    ({"model_type": "qwen3_moe", "decoder_sparse_step": 2},
     r"decoder_sparse_step=2: only 1 \(a sparse MLP in every layer\) is supported"),
    ({"model_type": "qwen3_moe", "mlp_only_layers": [0]},
     r"mlp_only_layers=\[0\]: only \[\] \(a sparse MLP in every layer\)"),
    ({"model_type": "qwen3_moe", "num_experts": 0}, r"num_experts=0: qwen3_moe without experts"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64},
     r"use_sliding_window=True: sliding-window attention is not supported"),
    ({"model_type": "llama", "attention_bias": True}, r"attention_bias=True"),
    ({"model_type": "qwen3", "attention_bias": True}, r"attention_bias=True"),
    ({"model_type": "llama", "mlp_bias": True}, r"mlp_bias=True"),
    ({"model_type": "llama", "hidden_act": "gelu"}, r"hidden_act='gelu'"),
])
def test_config_from_hf_rejects_unsupported(config, match):
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf(config)


def test_config_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.config_from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  with pytest.raises(ValueError, match=f"{tmp_path}.*'mistral'"):
    hf.config_from_hf(tmp_path)
  with pytest.raises(ValueError, match="qk_norm=False.*qwen3 needs qk_norm=True"):
    hf.config_to_hf(mc.tiny(family="qwen3", qk_norm=False))


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_save_load_roundtrip_is_exact(param_dtype, tmp_path):
  cfg = CONFIGS["llama_linear"].replace(param_dtype=param_dtype)
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(param_dtype)), _random_params(cfg, 1))
  out = hf.save(tmp_path / "ckpt", cfg, params)
  config = json.loads((out / "config.json").read_text())
  assert config["dtype"] == param_dtype and config["architectures"] == ["LlamaForCausalLM"]
  tensors = _tensors(out / hf.SINGLE_FILE)
  np.testing.assert_array_equal(tensors["model.layers.1.self_attn.o_proj.weight"],
                                np.asarray(params["layers"]["attn"]["o_proj"]["kernel"][1]).T)
  cfg2, params2 = hf.load(out, cfg=cfg)
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params2, params)
  assert {x.dtype for x in jax.tree.leaves(params2)} == {jnp.dtype(param_dtype)}


def test_sharded_save_and_index(tmp_path):
  cfg = CONFIGS["qwen3_tied_hd32"]
  params = _random_params(cfg, 2)
  out = hf.save(tmp_path / "ckpt", cfg, params, max_shard_bytes=20_000)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  sizes = {f: (out / f).stat().st_size for f in files}
  assert max(sizes.values()) < 20_000 + 40_000  # a shard exceeds the limit by <= one tensor
  assert index["metadata"]["total_size"] == sum(
      x.nbytes for f in files for x in _tensors(out / f).values())
  _, params2 = hf.load(out)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_tied_checkpoint_with_equal_lm_head_loads(saved, tmp_path):
  cfg = CONFIGS["qwen3_tied_hd32"]
  params = _random_params(cfg, 3)
  out = hf.save(tmp_path / "tied", cfg, params)
  tensors = _tensors(out / hf.SINGLE_FILE)
  assert "lm_head.weight" not in tensors
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(16, np.float32)  # old buffer
  save_file(tensors, str(out / hf.SINGLE_FILE))
  _, params2 = hf.load(out)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_tokenizer_saved_and_checked(tmp_path):
  cfg = CONFIGS["qwen3_tied_hd32"]
  params = _random_params(cfg, 4)
  out = hf.save(tmp_path / "ckpt", cfg, params, tokenizer=_tokenizer(90))
  config = json.loads((out / "config.json").read_text())
  assert (config["eos_token_id"], config["pad_token_id"]) == (1, 2)
  assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == 90
  hf.load(out, tokenizer=_tokenizer(97))  # equal sizes are fine
  with pytest.raises(ValueError, match=r"len\(tokenizer\)=98 .* > model vocab_size=97"):
    hf.load(out, tokenizer=_tokenizer(98))
  with pytest.raises(ValueError, match=r"len\(tokenizer\)=120 .* vocab_size=97"):
    hf.save(tmp_path / "other", cfg, params, tokenizer=_tokenizer(120))
  assert not (tmp_path / "other").exists()


# -- placement on a mesh --------------------------------------------------------------------------
def test_load_onto_fake_mesh_matches_single_device(tmp_path, monkeypatch):
  cfg = mc.tiny(vocab_size=128, family="qwen2", tie_embeddings=False, n_kv_heads=2)
  params = _random_params(cfg, 5)
  out = hf.save(tmp_path / "ckpt", cfg, params)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  reads = []  # shapes of the blocks read from disk
  original_slice = hf._Checkpoint.slice

  def recording_slice(self, name):
    tensor = original_slice(self, name)

    class Recorder:
      def __getitem__(self, index):
        block = tensor[index]
        reads.append((name, block.shape))
        return block

      def __getattr__(self, attr):  # get_shape, get_dtype
        return getattr(tensor, attr)
    return Recorder()

  monkeypatch.setattr(hf._Checkpoint, "slice", recording_slice)
  _, sharded = hf.load(out, mesh=mesh, rules=DEFAULT_RULES)
  monkeypatch.undo()
  # Each device reads only its own (fsdp x tensor) block of a (F, D) = (128, 64) weight.
  assert {s for n, s in reads if n == "model.layers.1.mlp.gate_proj.weight"} == {(64, 32)}
  axes = tf.logical_axes(cfg)
  flat_axes = dict(jax.tree_util.tree_leaves_with_path(
      axes, is_leaf=lambda x: isinstance(x, tuple)))
  for path, x in jax.tree_util.tree_leaves_with_path(sharded):
    want = logical_to_spec(flat_axes[path], DEFAULT_RULES)
    assert x.sharding.mesh == mesh and x.sharding.spec == want, (path, x.sharding.spec, want)
  kernel = sharded["layers"]["mlp"]["gate_proj"]["kernel"]  # [L, D/fsdp, F/tensor] per device
  assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(2, 32, 64)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded, params)

  tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, cfg.vocab_size)
  mask = jnp.ones((4, 8), bool).at[1, :3].set(False)
  forward = jax.jit(tf.forward, static_argnums=0)
  graphdef = tf.graphdef_for(cfg)
  single = forward(graphdef, params, tokens, mask)
  with jax.set_mesh(mesh), axis_rules(DEFAULT_RULES):
    on_mesh = forward(graphdef, sharded, tokens, mask)
  np.testing.assert_allclose(np.asarray(on_mesh), np.asarray(single), atol=1e-5, rtol=1e-5)

  # The mesh in context is used by default; an indivisible dimension is replicated, not an error.
  cfg97 = cfg.replace(vocab_size=97)
  out97 = hf.save(tmp_path / "v97", cfg97, _random_params(cfg97, 6))
  with jax.set_mesh(mesh):
    _, p97 = hf.load(out97)
  assert p97["embed"]["embedding"].sharding.spec == jax.P(None, "fsdp")
  assert p97["lm_head"]["kernel"].sharding.spec == jax.P("fsdp", None)
  assert p97["layers"]["attn"]["q_proj"]["kernel"].sharding.spec == jax.P(None, "fsdp", "tensor")


# -- bad checkpoints ------------------------------------------------------------------------------
def test_missing_tensors_are_named(saved, tmp_path):
  def drop(t):
    del t["model.layers.1.mlp.up_proj.weight"], t["lm_head.weight"]
  with pytest.raises(ValueError, match=r"missing tensors \(2\): model\.layers\.1\.mlp\.up_proj"
                     r"\.weight, lm_head\.weight"):
    hf.load(_variant(saved, tmp_path, drop))


def test_unexpected_tensors_are_named(saved, tmp_path):
  def add(t):
    t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  with pytest.raises(ValueError, match=r"unexpected tensors \(2\): model\.layers\.0\.self_attn"
                     r"\.o_proj\.bias, model\.layers\.2\.mlp\.up_proj\.weight"):
    hf.load(_variant(saved, tmp_path, add))


def test_misshaped_tensors_are_named(saved, tmp_path):
  def shrink(t):
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    t["model.norm.weight"] = np.zeros((65,), np.float32)
  with pytest.raises(ValueError, match=r"mis-shaped tensors \(2\): model\.norm\.weight: expected "
                     r"\(64,\), got \(65,\), model\.layers\.0\.self_attn\.k_proj\.weight: "
                     r"expected \(32, 64\), got \(16, 64\)"):
    hf.load(_variant(saved, tmp_path, shrink))


def test_integer_tensor_is_named(saved, tmp_path):
  def to_int(t):
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
  with pytest.raises(ValueError, match=r"non-float tensors \(1\): model\.norm\.weight: I32"):
    hf.load(_variant(saved, tmp_path, to_int))


def test_unsupported_architecture_in_checkpoint(saved, tmp_path):
  def arch(c):
    c["architectures"] = ["Qwen2ForTokenClassification"]
  with pytest.raises(ValueError, match=r"config\.json: architectures=.*'Qwen2ForTokenClassification"
                     r"'; supported: Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM, "
                     r"Qwen3MoeForCausalLM"):
    hf.load(_variant(saved, tmp_path, config_edit=arch))


def test_tied_lm_head_that_differs_is_an_error(saved, tmp_path):
  def tie(c):
    c["tie_word_embeddings"] = True
  with pytest.raises(ValueError, match=r"tie_word_embeddings=True but lm_head\.weight differs "
                     r"from model\.embed_tokens\.weight"):
    hf.load(_variant(saved, tmp_path, config_edit=tie))


def test_cfg_disagreeing_with_config_json(saved):
  cfg, _, directory = saved
  with pytest.raises(ValueError, match=r"cfg disagrees with .*config\.json on d_ff: given 256, "
                     r"config\.json 128"):
    hf.load(directory, cfg=cfg.replace(d_ff=256))


def test_missing_files_are_named(saved, tmp_path):
  cfg, _, src = saved
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((src / "config.json").read_text())
  (empty / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index"
                     r"\.json \(found pickle files \['pytorch_model\.bin'\]"):
    hf.load(empty)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf.load(tmp_path / "nowhere")

  sharded = hf.save(tmp_path / "sharded", cfg, _random_params(cfg, 7), max_shard_bytes=20_000)
  index = json.loads((sharded / hf.INDEX_FILE).read_text())
  victim = index["weight_map"]["model.norm.weight"]
  (sharded / victim).unlink()
  with pytest.raises(FileNotFoundError, match=rf"shard {victim} is missing; it should hold .*"
                     r"model\.norm\.weight"):
    hf.load(sharded)


def test_index_listing_absent_tensor(saved, tmp_path):
  cfg, params, _ = saved
  out = hf.save(tmp_path / "sharded", cfg, params, max_shard_bytes=20_000)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  index["weight_map"]["model.layers.0.mlp.extra.weight"] = index["weight_map"]["model.norm.weight"]
  (out / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"lists tensors that .* does not contain: \(1\): "
                     r"model\.layers\.0\.mlp\.extra\.weight"):
    hf.load(out)


# -- saving ---------------------------------------------------------------------------------------
def test_save_is_atomic(saved, tmp_path, monkeypatch):
  cfg, params, _ = saved
  calls = []

  def failing_save_file(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full")
    save_file(tensors, path, metadata=metadata)

  monkeypatch.setattr(hf, "save_file", failing_save_file)
  with pytest.raises(OSError, match="disk full"):
    hf.save(tmp_path / "ckpt", cfg, params, max_shard_bytes=20_000)
  assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor a temporary directory

  monkeypatch.setattr(hf, "save_file", save_file)
  first = hf.save(tmp_path / "ckpt", cfg, params)
  with pytest.raises(FileExistsError, match="not empty"):
    hf.save(tmp_path / "ckpt", cfg, params)
  other = _random_params(cfg, 8)
  monkeypatch.setattr(hf, "save_file", failing_save_file)
  calls.clear()
  with pytest.raises(OSError, match="disk full"):
    hf.save(first, cfg, other, overwrite=True, max_shard_bytes=20_000)
  _, kept = hf.load(first)  # the old checkpoint is intact
  jax.tree.map(np.testing.assert_array_equal, kept, params)
  monkeypatch.setattr(hf, "save_file", save_file)
  hf.save(first, cfg, other, overwrite=True)
  _, replaced = hf.load(first)
  jax.tree.map(np.testing.assert_array_equal, replaced, other)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_rejects_params_that_do_not_match(saved, tmp_path):
  cfg, params, _ = saved
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((2, 64, 100))
  del bad["final_norm"]
  with pytest.raises(ValueError, match=r"params\['final_norm'\]\['scale'\] missing; "
                     r"params\['layers'\]\['mlp'\]\['up_proj'\]\['kernel'\]: expected shape "
                     r"\(2, 64, 128\), got \(2, 64, 100\)"):
    hf.save(tmp_path / "x", cfg, bad)
  assert not (tmp_path / "x").exists()


def test_config_object_and_named_file(tmp_path):
  with pytest.raises(ValueError, match=r"config object GPT2Config: unsupported model_type 'gpt2'"):
    hf.config_from_hf(transformers.GPT2Config())
  cfg = CONFIGS["qwen2_untied"]
  (tmp_path / "student.json").write_text(json.dumps(hf.config_to_hf(cfg)))
  assert hf.config_from_hf(tmp_path / "student.json") == cfg


def test_qwen3_moe_save_load_per_expert_tensors(tmp_path):
  """qwen3_moe: per-expert tensors on disk (transformers' names), exact round trip, expert-sharded
  placement on the fake mesh with the ('expert', 'fsdp') rule."""
  cfg = CONFIGS["qwen3_moe"]
  params = _random_params(cfg, 9)
  out = hf.save(tmp_path / "ckpt", cfg, params, max_shard_bytes=30_000)
  index = json.loads((out / hf.INDEX_FILE).read_text())
  names = set(index["weight_map"])
  assert {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(4)
          for p in ("gate", "up", "down")} <= names
  assert "model.layers.0.mlp.gate.weight" in names and not any(".mlp.up_proj" in n for n in names)
  tensors = {}
  for f in set(index["weight_map"].values()):
    tensors.update(_tensors(out / f))
  experts = params["layers"]["mlp"]["experts"]
  np.testing.assert_array_equal(tensors["model.layers.1.mlp.experts.2.gate_proj.weight"],
                                experts["gate_proj"]["kernel"][1, 2].T)
  np.testing.assert_array_equal(tensors["model.layers.0.mlp.experts.3.down_proj.weight"],
                                experts["down_proj"]["kernel"][0, 3].T)
  np.testing.assert_array_equal(tensors["model.layers.1.mlp.gate.weight"],
                                params["layers"]["mlp"]["router"]["kernel"][1].T)
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)

  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = tuple(r for r in DEFAULT_RULES if r[0] != "expert") + (("expert", "fsdp"),)
  _, sharded = hf.load(out, mesh=mesh, rules=rules)
  gate = sharded["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]  # [L, E, D, F]
  assert gate.sharding.spec == jax.P(None, "fsdp", None, "tensor")
  assert {s.data.shape for s in gate.addressable_shards} == {(2, 2, 64, 16)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               sharded, params)
  # The MoE forward (and its load-balancing loss) on the mesh with experts over fsdp == one device.
  tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, cfg.vocab_size)
  mask = jnp.ones((4, 8), bool).at[1, :3].set(False)
  fwd = jax.jit(tf.forward_with_aux, static_argnums=0)
  single = fwd(tf.graphdef_for(cfg), params, tokens, mask)
  with jax.set_mesh(mesh), axis_rules(rules):
    on_mesh = fwd(tf.graphdef_for(cfg), sharded, tokens, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5,
                                                       rtol=1e-5), on_mesh, single)
  _, default = hf.load(out, mesh=mesh, rules=DEFAULT_RULES)  # expert -> nothing by default
  assert default["layers"]["mlp"]["experts"]["gate_proj"]["kernel"].sharding.spec == jax.P(
      None, None, "fsdp", "tensor")

  # A missing expert is named.
  single = hf.save(tmp_path / "single", cfg, params)
  t = _tensors(single / hf.SINGLE_FILE)
  del t["model.layers.0.mlp.experts.3.up_proj.weight"]
  save_file(t, str(single / hf.SINGLE_FILE), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.0\.mlp\.experts\.3"
                     r"\.up_proj\.weight"):
    hf.load(single)


# -- special-token ids ----------------------------------------------------------------------------
def _token_ids(obj):
  return obj.bos_token_id, obj.eos_token_id, obj.pad_token_id


def _read_back(directory):
  """(AutoConfig, GenerationConfig) as transformers reads a saved directory."""
  return (transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True),
          transformers.GenerationConfig.from_pretrained(str(directory), local_files_only=True))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_token_ids_survive_load_save_without_tokenizer(family, tmp_path):
  """A transformers checkpoint with bos/eos/pad = 90/91/92 (neither family's default), loaded and
  saved again without a tokenizer (as `checkpoint.export_adapters` does), keeps its ids in
  config.json and in a generation_config.json equal to the one transformers wrote; the tensors
  come back byte-exact."""
  import hf_fixtures as F  # noqa: PLC0415 (torch, only here)
  model = F.torch_model(family, tied=family == "qwen3", seed=0, bos_token_id=90, eos_token_id=91,
                        pad_token_id=92)
  src = F.export(model, tmp_path / "src")
  cfg, params = hf.load(src)
  assert _token_ids(cfg) == (90, 91, 92)
  out = hf.save(tmp_path / "out", cfg, params)
  config, generation = _read_back(out)
  assert _token_ids(config) == (90, 91, 92)
  assert _token_ids(generation) == (90, 91, 92)
  assert (json.loads((out / hf.GENERATION_CONFIG_FILE).read_text()) ==
          json.loads((src / hf.GENERATION_CONFIG_FILE).read_text()))
  before, after = _tensors(src / hf.SINGLE_FILE), _tensors(out / hf.SINGLE_FILE)
  assert set(after) == set(before)
  for name, x in before.items():
    assert after[name].dtype == x.dtype and after[name].tobytes() == x.tobytes(), name
  # Through a training checkpoint's meta (JSON) and back, as `export_adapters` reads the config.
  from opd_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415
  meta_cfg = ckpt_lib.model_config_from_dict(
      json.loads(json.dumps(ckpt_lib.model_config_to_dict(cfg))))
  assert meta_cfg == cfg and _token_ids(meta_cfg) == (90, 91, 92)
  again = hf.save(tmp_path / "again", meta_cfg, params)
  assert _token_ids(_read_back(again)[0]) == (90, 91, 92)


def _transformers_checkpoint(tmp_path, family, **ids):
  """config.json written by transformers (with `ids`) next to tensors written by `hf.save`."""
  cfg = CONFIGS["llama_linear"] if family == "llama" else CONFIGS["qwen3_tied_hd32"]
  params = _random_params(cfg, 10)
  weights = hf.save(tmp_path / "weights", cfg, params)
  d = hf.config_to_hf(cfg)
  hf_cfg = transformers.AutoConfig.for_model(
      family, **{k: v for k, v in d.items() if k != "model_type"}, **ids)
  src = tmp_path / "src"
  hf_cfg.save_pretrained(str(src))
  (src / hf.SINGLE_FILE).write_bytes((weights / hf.SINGLE_FILE).read_bytes())
  return cfg, params, src


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_eos_list_and_tokenizer_precedence(family, tmp_path, caplog):
  cfg, params, src = _transformers_checkpoint(tmp_path, family, bos_token_id=90,
                                              eos_token_id=[91, 93], pad_token_id=92)
  loaded, params2 = hf.load(src)
  assert _token_ids(loaded) == (90, (91, 93), 92) and loaded == cfg
  out = hf.save(tmp_path / "plain", loaded, params2)
  for read in _read_back(out):
    assert _token_ids(read) == (90, [91, 93], 92)
  # A given cfg without ids takes config.json's; one with ids keeps its own.
  assert _token_ids(hf.load(src, cfg=cfg)[0]) == (90, (91, 93), 92)
  assert _token_ids(hf.load(src, cfg=cfg.replace(eos_token_id=7))[0]) == (90, 7, 92)
  # A tokenizer wins for the ids it defines (eos 1, pad 2; it has no bos), with a warning ...
  with caplog.at_level("WARNING", logger=hf.__name__):
    out = hf.save(tmp_path / "tok", loaded, params2, tokenizer=_tokenizer(97))
  assert "eos_token_id=1 replaces the model config's (91, 93)" in caplog.text
  assert "pad_token_id=2 replaces the model config's 92" in caplog.text
  for read in _read_back(out):
    assert _token_ids(read) == (90, 1, 2)
  # ... except that a config list of eos ids that contains the tokenizer's eos is kept.
  out = hf.save(tmp_path / "tok93", loaded, params2, tokenizer=_tokenizer(97, eos="t93", pad="t92"))
  for read in _read_back(out):
    assert _token_ids(read) == (90, [91, 93], 92)
  # Without ids anywhere, transformers' defaults apply (llama 1 / 2 / None, qwen3 None x 3).
  out = hf.save(tmp_path / "none", cfg, params)
  default = (1, 2, None) if family == "llama" else (None, None, None)
  for read in _read_back(out):
    assert _token_ids(read) == default


def test_token_id_fields_are_metadata():
  cfg = mc.tiny(eos_token_id=[3, 4], bos_token_id=np.int64(5))
  assert cfg.eos_token_id == (3, 4) and type(cfg.bos_token_id) is int
  assert cfg == mc.tiny() and hash(cfg) == hash(mc.tiny())  # shares jit / lru caches
  assert cfg.replace(d_model=32).eos_token_id == (3, 4)
  for bad in ({"eos_token_id": "3"}, {"pad_token_id": [1, 2]}, {"bos_token_id": True}):
    with pytest.raises(ValueError, match="expected None or an int"):
      mc.tiny(**bad)
  with pytest.raises(ValueError, match=r"config dict: .*pad_token_id"):  # transformers checks
    hf.config_from_hf({**hf.config_to_hf(mc.tiny()), "pad_token_id": "x"})
