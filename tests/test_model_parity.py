"""Parity with transformers (torch CPU) on tiny random qwen3 / qwen2 / llama models, via hf.py.

transformers `save_pretrained` -> our `load` -> our logits == torch logits (f32, padded batches);
our `save` -> transformers `from_pretrained` -> identical weights and logits; bf16 and sharded
checkpoints both ways.
"""

import jax
import numpy as np
import pytest
import torch

import hf_fixtures as F
from opd_jax.models import hf
from opd_jax.models import transformer as tf
from opd_jax.models.transformer import rope_frequencies

ATOL = 1e-4


def _ours(cfg, params, tokens, mask):
  return np.asarray(jax.jit(tf.forward, static_argnums=0)(tf.graphdef_for(cfg), params, tokens,
                                                          mask))


def _from_pretrained_strict(directory, dtype=torch.float32):
  model, info = F.transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), dtype=dtype, attn_implementation="eager", local_files_only=True,
      output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  return model.eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", F.FAMILIES)
def test_transformers_roundtrip_logits(family, tied, tmp_path):
  model = F.torch_model(family, tied=tied, seed=11)
  tokens, mask = F.padded_batch(seed=3, vocab_size=model.config.vocab_size)
  ref = F.torch_logits(model, tokens, mask)
  assert np.abs(ref[mask]).max() > 1.0  # logits are O(1): the tolerance below is meaningful

  # transformers save_pretrained -> our load.
  cfg, params = hf.load(F.export(model, tmp_path / "hf"))
  assert (cfg.family, cfg.tie_embeddings, cfg.head_dim) == (
      family, tied, 32 if family == "qwen3" else 16)
  assert cfg.rope_type == ("linear" if family == "llama" else "default")
  ours = _ours(cfg, params, tokens, mask)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=ATOL, rtol=0)

  # our save -> transformers from_pretrained: the very same weights, hence the same logits.
  out = hf.save(tmp_path / "ours", cfg, params)
  back = _from_pretrained_strict(out)
  want, got = F.state_dict_numpy(model), F.state_dict_numpy(back)
  assert sorted(want) == sorted(got)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  np.testing.assert_allclose(F.torch_logits(back, tokens, mask)[mask], ours[mask], atol=ATOL,
                             rtol=0)


def test_bf16_checkpoints_both_ways(tmp_path):
  model = F.torch_model("qwen2", tied=False, seed=5).to(torch.bfloat16)
  F.export(model, tmp_path / "hf")
  cfg, params = hf.load(tmp_path / "hf")
  assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")
  sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  np.testing.assert_array_equal(params["layers"]["attn"]["q_proj"]["bias"][1],
                                sd["model.layers.1.self_attn.q_proj.bias"])
  np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["kernel"][0],
                                sd["model.layers.0.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], sd["lm_head.weight"].T)

  cfg16, params16 = hf.load(tmp_path / "hf", dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  assert params16["embed"]["embedding"].dtype == jax.numpy.bfloat16
  hf.save(tmp_path / "ours", cfg16, params16)
  back = _from_pretrained_strict(tmp_path / "ours", dtype=torch.bfloat16)
  for name, value in back.state_dict().items():
    assert value.dtype == torch.bfloat16, name
    assert torch.equal(value, model.state_dict()[name]), name


def test_sharded_checkpoints_both_ways(tmp_path):
  model = F.torch_model("llama", tied=False, seed=2)
  F.export(model, tmp_path / "hf_sharded", max_shard_size="40KB")
  shards = sorted(p.name for p in (tmp_path / "hf_sharded").glob("*.safetensors"))
  assert len(shards) > 2 and (tmp_path / "hf_sharded" / hf.INDEX_FILE).is_file()
  cfg, params = hf.load(tmp_path / "hf_sharded")
  _, single = hf.load(F.export(model, tmp_path / "hf_single"))
  jax.tree.map(np.testing.assert_array_equal, params, single)

  out = hf.save(tmp_path / "ours", cfg, params, max_shard_bytes=30_000)
  ours = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(ours) > 2 and (out / hf.INDEX_FILE).is_file() and not (out / hf.SINGLE_FILE).exists()
  back = _from_pretrained_strict(out)
  tokens, mask = F.padded_batch(seed=4, vocab_size=cfg.vocab_size)
  np.testing.assert_allclose(F.torch_logits(back, tokens, mask)[mask],
                             F.torch_logits(model, tokens, mask)[mask], atol=0, rtol=0)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
  """Llama 3.1+ RoPE ('llama3'): inverse frequencies equal transformers' own buffer, and logits
  match at positions up to 2x original_max_position_embeddings (f32, tight)."""
  model = F.torch_model("llama", tied=False, seed=7, rope_parameters=dict(F.LLAMA3_ROPE),
                        max_position_embeddings=256)
  cfg, params = hf.load(F.export(model, tmp_path / "hf"))
  assert (cfg.rope_type, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
          cfg.rope_original_max_position) == ("llama3", 8.0, 1.0, 4.0, 64)
  theirs = model.model.rotary_emb.inv_freq.numpy()
  ours = np.asarray(rope_frequencies(cfg))
  np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)
  # The three bands are all present: kept, interpolated, divided by the factor.
  plain = np.asarray(rope_frequencies(cfg.replace(rope_type="default")))
  ratio = plain / ours
  assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], 8.0) and 1.5 < ratio[1] < 7.5

  tokens, mask = F.padded_batch(seed=8, vocab_size=cfg.vocab_size, length=130)
  ref = F.torch_logits(model, tokens, mask)
  got = _ours(cfg, params, tokens, mask)
  np.testing.assert_allclose(got[mask], ref[mask], atol=ATOL, rtol=0)
  # The scaling matters at these positions: without it the logits differ well beyond ATOL.
  unscaled = _ours(cfg.replace(rope_type="default"), params, tokens, mask)
  assert np.abs(unscaled[mask] - ref[mask]).max() > 100 * ATOL

  # our save writes the llama3 parameters back; transformers rebuilds the same frequencies.
  back = _from_pretrained_strict(hf.save(tmp_path / "ours", cfg, params))
  assert back.config.rope_parameters == F.LLAMA3_ROPE
  np.testing.assert_array_equal(back.model.rotary_emb.inv_freq.numpy(), theirs)


# -- qwen3_moe ------------------------------------------------------------------------------------
def _moe_model(seed, **overrides):
  return F.torch_model("qwen3_moe", tied=False, seed=seed, **overrides)


@pytest.mark.parametrize("scan, impl", [(True, "dense"), (False, "dense"), (True, "ragged")],
                         ids=["scan", "unrolled", "ragged"])
def test_qwen3_moe_roundtrip_logits_f32(scan, impl, tmp_path):
  """transformers Qwen3MoeForCausalLM (per-expert safetensors, as save_pretrained writes them) ->
  our load -> logits equal to torch's (f32, 1e-4); our save -> from_pretrained strict -> the very
  same weights."""
  model = _moe_model(seed=21)
  directory = F.export(model, tmp_path / "hf")
  tokens, mask = F.padded_batch(seed=6, vocab_size=model.config.vocab_size, length=12)
  ref = F.torch_logits(model, tokens, mask)
  assert np.abs(ref[mask]).max() > 1.0
  cfg, params = hf.load(directory)
  assert (cfg.family, cfg.num_experts, cfg.experts_per_token, cfg.moe_d_ff, cfg.norm_topk_prob,
          cfg.qk_norm) == ("qwen3_moe", 4, 2, 32, True, True)
  cfg = cfg.replace(scan_layers=scan, moe_impl=impl)
  ours = _ours(cfg, params, tokens, mask)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=ATOL, rtol=0)
  # Layout: the router is transformers' mlp.gate, experts are [L, E, in, out].
  sd = F.state_dict_numpy(model)
  np.testing.assert_array_equal(params["layers"]["mlp"]["router"]["kernel"][1],
                                sd["model.layers.1.mlp.gate.weight"].T)
  fused = sd["model.layers.0.mlp.experts.gate_up_proj"]  # [E, 2F, D]: gate rows, then up rows
  np.testing.assert_array_equal(params["layers"]["mlp"]["experts"]["gate_proj"]["kernel"][0],
                                fused[:, :32].transpose(0, 2, 1))
  np.testing.assert_array_equal(params["layers"]["mlp"]["experts"]["up_proj"]["kernel"][0],
                                fused[:, 32:].transpose(0, 2, 1))
  np.testing.assert_array_equal(params["layers"]["mlp"]["experts"]["down_proj"]["kernel"][1],
                                sd["model.layers.1.mlp.experts.down_proj"].transpose(0, 2, 1))

  out = hf.save(tmp_path / "ours", cfg, params)
  written = sorted(F.load_file(str(out / hf.SINGLE_FILE)))
  assert written == sorted(F.load_file(str(directory / hf.SINGLE_FILE)))  # same tensor names
  back = _from_pretrained_strict(out)
  got = F.state_dict_numpy(back)
  assert sorted(sd) == sorted(got)
  for name in sd:
    np.testing.assert_array_equal(got[name], sd[name], err_msg=name)


def test_qwen3_moe_bf16_logits(tmp_path):
  """bfloat16 weights and compute on both sides; loose, and routing-aware.

  Both sides round every matmul output to bf16 (in different orders), so logits of size ~3 differ
  by ~0.03 (as for the dense qwen3). On top of that, a near-tie between two experts'
  probabilities can route a token differently under different rounding (transformers bf16 itself
  flips routes that transformers f32 takes, changing later logits by ~0.5). So: every token's
  logits are within 0.07 of transformers bf16 *or* of transformers f32 (a legitimate routing),
  and the median token is within 0.05 of transformers bf16 (a route flip changes every later
  token of its row through attention, so a fraction-of-tokens bound would be seed luck).
  """
  model = _moe_model(seed=22).to(torch.bfloat16)
  cfg, params = hf.load(F.export(model, tmp_path / "hf"))
  assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")
  tokens, mask = F.padded_batch(seed=7, vocab_size=cfg.vocab_size, length=12)
  ref = F.torch_logits(model, tokens, mask)[mask]
  ref32 = F.torch_logits(model.float(), tokens, mask)[mask]  # same (bf16-valued) weights, f32
  ours = _ours(cfg, params, tokens, mask)[mask]
  assert np.abs(ref).max() > 1.0
  err = np.abs(ours - ref).max(-1)
  err32 = np.abs(ours - ref32).max(-1)
  tol = 0.07
  assert np.all(np.minimum(err, err32) < tol), np.round(np.minimum(err, err32), 3)
  assert np.median(err) < 0.05, np.round(err, 3)


def test_qwen3_moe_aux_loss_matches_transformers(tmp_path):
  """Our forward_with_aux's load-balancing loss == transformers' aux_loss (output_router_logits),
  padding excluded via the attention mask on both sides."""
  model = _moe_model(seed=23)
  cfg, params = hf.load(F.export(model, tmp_path / "hf"))
  tokens, mask = F.padded_batch(seed=9, vocab_size=cfg.vocab_size, length=10)
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(tokens.astype(np.int64)),
                attention_mask=torch.as_tensor(mask.astype(np.int64)),
                position_ids=torch.as_tensor(positions), output_router_logits=True)
  logits, aux = jax.jit(tf.forward_with_aux, static_argnums=0)(tf.graphdef_for(cfg), params,
                                                              tokens, mask)
  np.testing.assert_allclose(np.asarray(logits)[mask], out.logits.numpy()[mask], atol=ATOL, rtol=0)
  np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=1e-5)
