"""Task tokenizer, local HF tokenizers, chat encoding helpers, teacher/student tokenizer check."""

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import PreTrainedTokenizerFast

from opd_jax.data import tasks
from opd_jax.data import tokenizer as T


@pytest.fixture(scope="module")
def tok():
  return T.build_task_tokenizer()


def test_char_level_ids_follow_the_documented_vocabulary(tok):
  vocab = tok.get_vocab()
  for i, s in enumerate(T.SPECIAL_TOKENS):
    assert vocab[s] == i
  expected_char_id = {c: len(T.SPECIAL_TOKENS) + i for i, c in enumerate(T.DEFAULT_ALPHABET)}
  rng = np.random.default_rng(0)
  for _ in range(20):
    text = "".join(rng.choice(list(T.DEFAULT_ALPHABET), size=int(rng.integers(1, 40))))
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [expected_char_id[c] for c in text]
    assert tok.decode(ids) == text
  assert len(tok) == len(T.SPECIAL_TOKENS) + len(T.DEFAULT_ALPHABET)
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


def test_prompt_and_example_encoding(tok):
  v = tok.get_vocab()
  ex = tasks.generate(tasks.preset("default"), "train", 30, seed=0)
  for e in ex:
    p = T.encode_prompt(tok, e.prompt)
    assert p == [v[T.BOS], v[T.USER]] + [v[c] for c in e.prompt] + [v[T.ASSISTANT]]
    ids, loss = T.encode_example(tok, e.prompt, e.solution)
    assert ids[:len(p)] == p
    assert ids[len(p):] == [v[c] for c in e.solution] + [tok.eos_token_id]
    assert loss == [False] * len(p) + [True] * (len(e.solution) + 1)
    # What the sampler would return after the prompt: response, EOS, then pads.
    assert T.decode_response(tok, ids[len(p):] + [tok.pad_token_id] * 3) == e.solution
  prompts = [e.prompt for e in ex]
  assert T.encode_prompts(tok, prompts) == [T.encode_prompt(tok, p) for p in prompts]
  assert T.encode_prompts(tok, []) == []
  no_bos = T.build_task_tokenizer(add_bos=False)
  assert T.encode_prompt(no_bos, "1+2=")[0] == v[T.USER]


def test_decode_stops_at_first_eos(tok):
  ids = tok.encode("12 =3", add_special_tokens=False)
  more = tok.encode("99", add_special_tokens=False)
  assert T.decode_response(tok, ids + [tok.eos_token_id] + more) == "12 =3"
  assert T.decode_response(tok, np.asarray(ids, np.int32)) == "12 =3"  # no EOS (truncated)


def test_unknown_characters_are_rejected(tok):
  with pytest.raises(ValueError, match="cannot encode"):
    T.encode_prompt(tok, "caf\u00e9")
  with pytest.raises(ValueError, match="response"):
    T.encode_response(tok, "\u2192 3")


def test_save_load_roundtrip_and_same_tokenizer_check(tok, tmp_path):
  tok.save_pretrained(tmp_path)
  loaded = T.load_tokenizer(tmp_path)
  T.check_same_tokenizer(tok, loaded)
  assert loaded.chat_template == tok.chat_template
  pair = ("3 1 4:", "3 4 8 =8")
  assert T.encode_example(loaded, *pair) == T.encode_example(tok, *pair)
  with pytest.raises(FileNotFoundError):
    T.load_tokenizer(tmp_path / "missing")


def test_check_same_tokenizer_reports_vocab_and_special_mismatches(tok):
  other = T.build_task_tokenizer(alphabet="0123456789+=: ")
  with pytest.raises(ValueError, match="vocabulary size") as e:
    T.check_same_tokenizer(tok, other)
  assert "cross-tokenizer" in str(e.value)
  # Same vocabulary, different pad id.
  swapped = T.build_task_tokenizer()
  swapped.pad_token = T.EOS
  with pytest.raises(ValueError, match="pad_token_id: teacher 0 != student 1"):
    T.check_same_tokenizer(tok, swapped)
  # Same size, one entry renumbered.
  perm = T.build_task_tokenizer(alphabet=T.DEFAULT_ALPHABET[1:] + T.DEFAULT_ALPHABET[0])
  with pytest.raises(ValueError, match="differing vocabulary entries"):
    T.check_same_tokenizer(tok, perm)


def _qwen_like_tokenizer(path):
  """A small byte-level BPE with Qwen-style specials and chat template, saved to `path`."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tk_decoders.ByteLevel()
  corpus = ["What is 12 plus 30? The answer is 42.", "Compute the sum of the digits of 2024.",
            "Let x be a real number such that x^2 = 4. Answer: 2"] * 20
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(corpus, trainer)
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                               chat_template=template)
  hf.save_pretrained(path)


def test_load_any_local_hf_tokenizer(tmp_path):
  _qwen_like_tokenizer(tmp_path)
  tok = T.load_tokenizer(tmp_path)
  assert tok.pad_token_id == tok.eos_token_id  # no pad defined: EOS is used
  prompt, response = "What is 12 plus 30?", "The answer is 42."
  assert T.prompt_text(tok, prompt) == (f"<|im_start|>user\n{prompt}<|im_end|>\n"
                                        "<|im_start|>assistant\n")
  ids, loss = T.encode_example(tok, prompt, response)
  p = T.encode_prompt(tok, prompt)
  assert ids[:len(p)] == p and not any(loss[:len(p)]) and all(loss[len(p):])
  assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
  assert T.decode_response(tok, ids[len(p):] + [tok.pad_token_id]) == response
  # A tokenizer without a chat template cannot format prompts.
  plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<u>": 1},
                                                                              unk_token="<u>")),
                                  eos_token="a")
  with pytest.raises(ValueError, match="no chat template"):
    T.encode_prompt(plain, "a")


def test_untokenizable_rule_for_the_task_tokenizer(tok):
  assert T.find_untokenizable(tok, "What is 12 + 30?\n\tok") is None
  assert T.find_untokenizable(tok, "le caf\u00e9") == (
      "character '\u00e9' (U+00E9) at offset 6 is not in the tokenizer's vocabulary "
      "(encodes to <unk>)")
  assert T.find_untokenizable(tok, "a\r\n").startswith("character '\\r' (U+000D) at offset 1 ")
  # Spelling a control token (even <unk> itself) is untokenizable: it would be read as structure.
  for special in T.SPECIAL_TOKENS:
    assert T.find_untokenizable(tok, f"x {special}") == (
        f"'{special}' at offset 2 spells the special token '{special}' "
        f"(id {T.SPECIAL_TOKENS.index(special)})")
  with pytest.raises(ValueError, match="cannot encode: '<eos>' at offset 3 spells"):
    T.encode_prompt(tok, "hi <eos>")
  with pytest.raises(ValueError, match="response contains text the tokenizer cannot encode"):
    T.encode_response(tok, "1<|user|>")


def test_untokenizable_rule_for_hf_tokenizers(tmp_path):
  # Byte-level BPE (Qwen-like): every string encodes; only special-token spellings are rejected,
  # including specials transformers does not name (<|im_start|>, <|endoftext|>).
  _qwen_like_tokenizer(tmp_path)
  qwen = T.load_tokenizer(tmp_path)
  assert T.find_untokenizable(qwen, "caf\u00e9 \u2192 \U0001F600 \r\n") is None
  assert T.find_untokenizable(qwen, "ab<|im_start|>") == (
      "'<|im_start|>' at offset 2 spells the special token '<|im_start|>' (id 1)")
  assert "<|endoftext|>" in T.find_untokenizable(qwen, "<|endoftext|>")
  with pytest.raises(ValueError, match="<|im_end|>"):
    T.encode_prompt(qwen, "stop<|im_end|>now")
  # A word-level tokenizer with an unk token: the unknown word is located.
  wl = Tokenizer(models.WordLevel({"<u>": 0, "</s>": 1, "what": 2, "is": 3, "two": 4},
                                  unk_token="<u>"))
  wl.pre_tokenizer = pre_tokenizers.Whitespace()
  word = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<u>", eos_token="</s>")
  assert T.find_untokenizable(word, "what is two") is None
  assert T.find_untokenizable(word, "what is three") == (
      "text 'three' at offset 8 is not in the tokenizer's vocabulary (encodes to <u>)")
