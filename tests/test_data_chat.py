"""Chat-format SFT: rendering and assistant-only loss masks against hand-built references, the
Dolci-Think loader's malformed-row accounting, packed SFT losses equal to unpacked ones, and a
packed chat SFT run through `loop.run`."""

import functools
import json
import pathlib

import jax
import numpy as np
import optax
import pytest

from opd_jax.data import chat
from opd_jax.data import datasets
from opd_jax.data import pipeline as P
from opd_jax.data import tokenizer as T
from opd_jax.models import config as mc
from opd_jax.models import transformer
from opd_jax.objectives import reduce
from opd_jax.objectives import sft
from opd_jax.train import config as config_lib
from opd_jax.train import loop
from opd_jax.train import state as state_lib
from opd_jax.train import steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SAMPLE = FIXTURES / "dolci_think_sample.jsonl"

CHATML = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Renders every assistant turn but the last without its <think> part, as Qwen3's template does
# for turns before the last user message: not prefix-stable for multi-turn reasoning rows.
DROPS_OLD_THINKING = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# Refuses conversations whose roles do not alternate user / assistant, as Llama-2's and Mistral's
# templates do (their `raise_exception`).
ALTERNATING = (
    "{%- for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chatml_tokenizer(template=CHATML):
  tok = T.build_task_tokenizer().to_transformers()
  tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
  tok.chat_template = template
  return tok


def _rows(path=SAMPLE):
  return [json.loads(line) for line in open(path)]


def _char_ids(tok, text):
  return [tok.convert_tokens_to_ids(c) for c in text]


def _reference_task(tok, messages):
  """The task template written out by hand: <bos>, then role token + content (+ <eos> after an
  assistant turn); the targets are the assistant contents and their <eos>."""
  role = {"system": T.SYSTEM, "user": T.USER, "assistant": T.ASSISTANT}
  ids, mask = [tok.bos_token_id], [False]
  for m in messages:
    ids.append(tok.convert_tokens_to_ids(role[m["role"]]))
    mask.append(False)
    body = _char_ids(tok, m["content"])
    target = m["role"] == "assistant"
    if target:
      body = body + [tok.eos_token_id]
    ids += body
    mask += [target] * len(body)
  return ids, mask


def _reference_chatml(tok, messages):
  """ChatML by hand: <|im_start|>role\\ncontent<|im_end|>\\n per message; the targets are the
  assistant contents and their <|im_end|> (not the newline after it)."""
  start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
  nl = _char_ids(tok, "\n")
  ids, mask = [], []
  for m in messages:
    head = [start] + _char_ids(tok, m["role"] + "\n")
    body = _char_ids(tok, m["content"]) + [end]
    target = m["role"] == "assistant"
    ids += head + body + nl
    mask += [False] * len(head) + [target] * len(body) + [False]
  return ids, mask


@pytest.mark.parametrize("which", ["task", "chatml"])
def test_loss_mask_is_exactly_the_assistant_turns(which):
  tok = T.build_task_tokenizer() if which == "task" else _chatml_tokenizer()
  reference = _reference_task if which == "task" else _reference_chatml
  examples, report = chat.load_chat_set(SAMPLE, "dolci_think", tokenizer=tok)
  rows = _rows()
  assert report.kept == len(rows) == 8
  for ex, row in zip(examples, rows):
    want_ids, want_mask = reference(tok, row["messages"])
    assert list(ex.ids) == want_ids
    assert list(ex.loss_mask) == want_mask
    # Every assistant turn is a target (multi-turn rows included), nothing else is.
    targets = tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m])
    end = tok.eos_token if which == "task" else "<|im_end|>"
    assert targets == "".join(m["content"] + end for m in row["messages"]
                              if m["role"] == "assistant")
  # A one-turn conversation is exactly encode_example's (prompt, response + EOS) layout.
  if which == "task":
    msgs = [chat.Message("user", "What is 2 + 2?"), chat.Message("assistant", "4")]
    assert chat.render_chat(tok, msgs) == T.encode_example(tok, "What is 2 + 2?", "4")


def test_parquet_and_jsonl_fixtures_agree():
  tok = T.build_task_tokenizer()
  a, _ = chat.load_chat_set(SAMPLE, tokenizer=tok)
  b, _ = chat.load_chat_set(FIXTURES / "dolci_think_sample.parquet", tokenizer=tok)
  assert a == b


def test_malformed_rows_raise_one_line_or_are_counted(tmp_path):
  tok = T.build_task_tokenizer()
  path = FIXTURES / "malformed_chat.jsonl"
  with pytest.raises(datasets.MalformedRowError) as err:
    chat.load_chat_set(path, tokenizer=tok)
  assert str(err.value) == (f"{path}:2: field 'messages': missing_field: key 'messages' missing "
                            "or null")
  examples, report = chat.load_chat_set(path, tokenizer=tok, on_error="skip")
  assert len(examples) == 2 and report.rows == 12
  assert report.skipped == {"missing_field": 2, "wrong_type": 2, "bad_role": 1, "bad_order": 1,
                            "empty_turn": 1, "no_assistant_turn": 1, "untokenizable": 1,
                            "bad_json": 1}
  assert report.samples["wrong_type"][1] == (f"{path}:5: field 'messages.0.content': wrong_type: "
                                             "expected str, got int")
  assert report.samples["untokenizable"][0].startswith(f"{path}:10: field 'messages.1.content': "
                                                       "untokenizable: '<eos>' at offset 4")
  metrics = report.to_metrics()
  assert metrics["data/skipped/bad_role"] == 1 and metrics["data/skipped/total"] == 10
  assert all("\n" not in s for v in report.samples.values() for s in v)
  # A character outside the task tokenizer's alphabet (<unk>), in an assistant turn.
  unk = tmp_path / "unk.jsonl"
  unk.write_text(json.dumps({"messages": [{"role": "user", "content": "Coffee?"},
                                          {"role": "assistant", "content": "un caf\u00e9"}]})
                 + "\n" + json.dumps(_rows()[0]) + "\n")
  kept, report = chat.load_chat_set(unk, tokenizer=tok, on_error="skip")
  assert len(kept) == 1 and report.skipped == {"untokenizable": 1}
  assert report.samples["untokenizable"][0].startswith(
      f"{unk}:1: field 'messages.1.content': untokenizable: character '\u00e9' (U+00E9) at "
      "offset 6")


def test_template_mismatch_too_long_and_dedup(tmp_path):
  # A template that rewrites earlier turns is refused per row (the multi-turn rows 2 and 5).
  tok = _chatml_tokenizer(DROPS_OLD_THINKING)
  examples, report = chat.load_chat_set(SAMPLE, tokenizer=tok, on_error="skip")
  assert report.skipped == {"template_mismatch": 2} and len(examples) == 6
  assert report.samples["template_mismatch"][0].startswith(f"{SAMPLE}:3: field 'messages'")
  # A conversation the template itself refuses (its raise_exception) is refused for that row.
  path = tmp_path / "alternate.jsonl"
  turns = lambda *roles: {"messages": [{"role": r, "content": f"turn {i}"}  # noqa: E731
                                       for i, r in enumerate(roles)]}
  path.write_text("".join(json.dumps(r) + "\n" for r in (
      turns("user", "assistant"), turns("user", "user", "assistant"),
      turns("user", "assistant", "user", "assistant"))))
  examples, report = chat.load_chat_set(path, tokenizer=_chatml_tokenizer(ALTERNATING),
                                        on_error="skip")
  assert len(examples) == 2 and report.skipped == {"template_mismatch": 1}
  assert report.samples["template_mismatch"][0] == (
      f"{path}:2: field 'messages': template_mismatch: the chat template refuses the "
      "conversation: Conversation roles must alternate user/assistant/user/assistant")
  # too_long counts rendered tokens.
  task = T.build_task_tokenizer()
  lengths = [len(e.ids) for e in chat.load_chat_set(SAMPLE, tokenizer=task)[0]]
  limit = sorted(lengths)[3]
  kept, report = chat.load_chat_set(SAMPLE, tokenizer=task, max_tokens=limit, on_error="skip")
  assert len(kept) == sum(n <= limit for n in lengths)
  assert report.skipped == {"too_long": sum(n > limit for n in lengths)}
  # Duplicates: same roles and whitespace-normalised contents.
  rows = _rows()
  dup = json.loads(json.dumps(rows[0]))
  dup["messages"][1]["content"] = "  What is 12 +\t30? "
  path = tmp_path / "dup.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + [dup]))
  kept, report = chat.load_chat_set(path)
  assert len(kept) == 2 and report.duplicates == 1
  assert report.duplicate_samples == [f"{path}:3: duplicate of {path}:1"]
  assert len(chat.load_chat_set(path, dedup=False)[0]) == 3


# -- packed SFT loss == unpacked ------------------------------------------------------------------
CFG = mc.tiny(vocab_size=T.build_task_tokenizer().vocab_size + 2)


def _packed_and_unpacked(seed=0):
  """The chat fixture's examples as one packed global batch and one example per row."""
  tok = T.build_task_tokenizer()
  pairs = [chat.encode_chat(tok, e) for e in chat.load_chat_set(SAMPLE, tokenizer=tok)[0]]
  seqs, masks = [p[0] for p in pairs], [p[1] for p in pairs]
  packed = P.sft_pipeline_from_ids(
      seqs, masks, P.PipelineConfig(global_batch_size=4, bucket_lengths=(256,), pack=True,
                                    shuffle=True, seed=seed, num_epochs=1),
      pad_id=0, shard_index=0, shard_count=1)
  assert packed.num_steps == 1  # all 8 examples fit 4 rows of 256
  unpacked = P.sft_pipeline_from_ids(
      seqs, masks, P.PipelineConfig(global_batch_size=8, bucket_lengths=(256,), shuffle=False,
                                    num_epochs=1), pad_id=0, shard_index=0, shard_count=1)
  return next(packed.iterator()), next(unpacked.iterator())


def test_packed_sft_step_equals_unpacked():
  # The sequence-mean mode: per-example aggregation is what packing could break; the token-mean
  # NLL and the target count ride along as metrics.
  packed, unpacked = _packed_and_unpacked()
  assert packed["segment_ids_BxT"].max() >= 2  # rows really hold several examples
  _, params = transformer.init(CFG, 3)
  tx = optax.sgd(0.5)
  step = jax.jit(functools.partial(steps.sft_step, graphdef=transformer.graphdef_for(CFG), tx=tx,
                                   cfg=steps.SFTStepConfig(mode="seq_mean_token_mean",
                                                           chunk_size=256)))
  out = {}
  for name, batch in (("packed", packed), ("unpacked", unpacked)):
    fields = steps.SFT_FIELDS + (("segment_ids_BxT",) if name == "packed" else ())
    out[name] = step(state_lib.create_state(params, tx, 0), {k: batch[k] for k in fields})
  (sp, mp), (su, mu) = out["packed"], out["unpacked"]
  assert float(mp["train/denominator"]) == float(mu["train/denominator"]) == 8.0
  assert float(mp["sft/tokens"]) == float(mu["sft/tokens"])
  np.testing.assert_allclose(float(mp["train/loss"]), float(mu["train/loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(mp["sft/nll"]), float(mu["sft/nll"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sp.params), jax.tree.leaves(su.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.parametrize("mode", reduce.AGGREGATION_MODES)
def test_sft_loss_of_packed_rows_equals_one_example_per_row(mode):
  rng = np.random.default_rng(7)
  t = 24
  segment_ids = np.zeros((3, t), np.int32)
  examples = []  # (row, start, length)
  for r in range(3):
    o, k = 0, 0
    while True:
      n = int(rng.integers(2, 9))
      if o + n > t - int(rng.integers(0, 3)):
        break
      k += 1
      segment_ids[r, o:o + n] = k
      examples.append((r, o, n))
      o += n
  logp = rng.normal(size=(3, t)).astype(np.float32)
  loss_mask = (rng.random((3, t)) < 0.6) & (segment_ids > 0)
  loss_mask[examples[0][0], examples[0][1]:examples[0][1] + examples[0][2]] = False  # an empty one
  total, denom, metrics = sft.sft_loss(logp, loss_mask, mode, segment_ids)
  # Reference: every example on a row of its own, the plain (unsegmented) aggregation.
  rows_logp = np.zeros((len(examples), t), np.float32)
  rows_mask = np.zeros((len(examples), t), bool)
  for i, (r, o, n) in enumerate(examples):
    rows_logp[i, :n], rows_mask[i, :n] = logp[r, o:o + n], loss_mask[r, o:o + n]
  want_total, want_denom, want_metrics = sft.sft_loss(rows_logp, rows_mask, mode)
  np.testing.assert_allclose(float(total), float(want_total), rtol=1e-6)
  assert float(denom) == float(want_denom)
  np.testing.assert_allclose(float(metrics["sft/nll"]), float(want_metrics["sft/nll"]), rtol=1e-6)


# -- config and the loop --------------------------------------------------------------------------
def _chat_cfg(overrides=(), method="sft"):
  ov = ["data.source=file", f"data.path={SAMPLE}", "data.layout=dolci_think",
        "data.sft_buckets=(192,)", "loop.steps=2", "loop.batch_size=2", "loop.eval_every=0",
        "loop.snapshot_steps=(0,)", "data.eval_examples=0", *overrides]
  cd = config_lib.load_config(str(ROOT / "configs" / f"{method}.py") + ":smoke", ov)
  return config_lib.from_config_dict(cd)


def test_pack_is_refused_where_nothing_packs():
  from opd_jax.train import recipes
  with pytest.raises(config_lib.ConfigError, match=r"config.data.pack=True has no effect with "
                     r"method='opd'"):
    recipes.get("opd").validate(config_lib.from_config_dict(config_lib.load_config(
        str(ROOT / "configs" / "opd.py") + ":smoke", ["data.pack=True"])))
  with pytest.raises(config_lib.ConfigError, match="carry no answers"):
    recipes.get("sft").validate(_chat_cfg([f"data.eval_path={SAMPLE}"]))
  with pytest.raises(config_lib.ConfigError, match="data.max_prompt_tokens=10"):
    recipes.get("sft").validate(_chat_cfg(["data.max_prompt_tokens=10"]))


def test_packed_chat_sft_run_through_the_loop(tmp_path):
  summary = loop.run(_chat_cfg(["data.pack=True"]), tmp_path)
  assert summary["step"] == 2
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r for r in rows if "train/loss" in r]
  assert len(losses) == 2 and all(np.isfinite(r["train/loss"]) for r in losses)
  # 2 packed rows of 192 tokens hold more than 2 conversations' targets (each has < 50).
  assert all(r["sft/tokens"] > 100 for r in losses)
