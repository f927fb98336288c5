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


def _random_text(rng, n: int) -> str:
  """Random text: the alphabet, characters outside it, and now and then a special token's spelling."""
  alphabet = list(T.DEFAULT_ALPHABET) + ["\u00e9", "\r", "\x0b", "<", ">", "|", "\u2192"]
  parts = ["".join(rng.choice(alphabet, size=int(rng.integers(0, n)))) for _ in range(3)]
  if rng.random() < 0.4:
    parts.insert(1, str(rng.choice(list(T.SPECIAL_TOKENS))))
  return "".join(parts)


@pytest.mark.parametrize("add_bos", [True, False])
def test_task_tokenizer_matches_the_transformers_tokenizer_on_random_inputs(add_bos):
  """`TaskTokenizer` (no transformers) against `PreTrainedTokenizerFast` over the same backend:
  every call the library makes gives the same answer."""
  tt = T.build_task_tokenizer(add_bos=add_bos)
  hf = tt.to_transformers()
  assert isinstance(hf, PreTrainedTokenizerFast)
  assert T.tokenizer_difference(hf, tt) is None and T.tokenizer_difference(tt, hf) is None
  assert T.control_tokens(tt) == T.control_tokens(hf)
  assert (tt.all_special_ids, tt.all_special_tokens) == (hf.all_special_ids, hf.all_special_tokens)
  assert (len(tt), tt.vocab_size, tt.chat_template) == (len(hf), hf.vocab_size, hf.chat_template)
  for name in ("pad", "eos", "bos", "unk"):
    assert getattr(tt, f"{name}_token_id") == getattr(hf, f"{name}_token_id")
  rng = np.random.default_rng(int(add_bos))
  for _ in range(150):
    text = _random_text(rng, 20)
    assert tt.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    assert tt(text, return_offsets_mapping=True) == dict(
        hf(text, add_special_tokens=False, return_offsets_mapping=True))
    batch = [text, text[::-1], ""]
    assert tt(batch, add_special_tokens=False) == dict(hf(batch, add_special_tokens=False))
    assert T.find_untokenizable(tt, text) == T.find_untokenizable(hf, text)
    ids = rng.integers(0, len(tt), size=int(rng.integers(0, 25))).tolist()
    for skip in (True, False):
      assert tt.decode(ids, skip_special_tokens=skip) == hf.decode(
          ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert tt.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    tokens = hf.convert_ids_to_tokens(ids) + ["\u00e9", "<nope>"]
    assert tt.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    assert tt.convert_tokens_to_ids(T.EOS) == hf.convert_tokens_to_ids(T.EOS)
    assert tt.batch_decode([ids, ids[::-1]], skip_special_tokens=True) == hf.batch_decode(
        [ids, ids[::-1]], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    roles = ["system", "user", "assistant"]
    messages = [{"role": str(rng.choice(roles)), "content": _random_text(rng, 8)}
                for _ in range(int(rng.integers(1, 5)))]
    for gen in (True, False):
      assert tt.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == (
          hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))
      assert tt.apply_chat_template(messages, add_generation_prompt=gen) == list(
          hf.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False))
  with pytest.raises(AttributeError, match="to_transformers"):
    tt.chat_template = "{{ messages }}"
  tt.pad_token = T.EOS  # settable, as in transformers: the ids and special lists follow
  hf = tt.to_transformers()
  assert (tt.pad_token_id, tt.all_special_ids, tt.all_special_tokens) == (
      hf.pad_token_id, hf.all_special_ids, hf.all_special_tokens)
  assert T.tokenizer_difference(hf, tt) is None
  with pytest.raises(ValueError, match="empty conversation"):
    hf.apply_chat_template([], tokenize=False)
  with pytest.raises(ValueError, match="empty conversation"):
    tt.apply_chat_template([], tokenize=False)
  with pytest.raises(ValueError, match="unknown role tool"):
    tt.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_a_run_on_the_task_tokenizer_does_not_import_transformers():
  """Importing the training loop and building the task tokenizer leaves transformers unloaded
  (about a second of every launch: the explorer's warm start)."""
  import subprocess
  import sys
  code = ("import sys\n"
          "from opd_jax.train import config, loop, run_plan\n"
          "from opd_jax.data import tokenizer\n"
          "tok = tokenizer.build_task_tokenizer()\n"
          "tokenizer.encode_prompts(tok, ['1+2:'])\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


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


def _one_line_mismatch(teacher, student) -> str:
  from opd_jax.errors import UserError
  with pytest.raises(T.TokenizerMismatchError) as e:
    T.check_same_tokenizer(teacher, student, where="t/ vs s/")
  msg = str(e.value)
  assert isinstance(e.value, UserError) and "\n" not in msg and "(t/ vs s/)" in msg
  return msg


def test_check_same_tokenizer_names_the_first_differing_token_and_its_ids(tok):
  assert T.tokenizer_difference(tok, T.build_task_tokenizer()) is None
  # A smaller alphabet: ids agree up to the first missing character.
  other = T.build_task_tokenizer(alphabet="0123456789+=: ")
  first = T.DEFAULT_ALPHABET.index("a")  # '0'..'9' come first, then 'a'
  assert first == 10
  msg = _one_line_mismatch(tok, other)
  assert f"vocabulary differs at id {7 + first}: token 'a' has teacher id {7 + first}" in msg
  assert "student id absent (student's id 17 is '+')" in msg, msg
  # Same vocabulary, different pad token.
  swapped = T.build_task_tokenizer()
  swapped.pad_token = T.EOS
  assert "pad token differs: teacher '<pad>' (id 0) vs student '<eos>' (id 1)" in (
      _one_line_mismatch(tok, swapped))
  # Same size, two characters exchanged: the first one named with both ids.
  alpha = T.DEFAULT_ALPHABET
  perm = T.build_task_tokenizer(alphabet=alpha[1] + alpha[0] + alpha[2:])
  msg = _one_line_mismatch(tok, perm)
  assert f"vocabulary differs at id 7: token {alpha[0]!r} has teacher id 7, student id 8" in msg
  # Same vocabulary; a chat-template control token is ordinary text on one side.
  from tokenizers import Regex, Tokenizer, decoders, models as tk_models, pre_tokenizers as pre
  from transformers import PreTrainedTokenizerFast
  chars = list(dict.fromkeys(T.DEFAULT_ALPHABET))
  backend = Tokenizer(tk_models.WordLevel(
      vocab={t: i for i, t in enumerate(list(T.SPECIAL_TOKENS) + chars)}, unk_token=T.UNK))
  backend.pre_tokenizer = pre.Split(Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens(list(T.SPECIAL_TOKENS[:-1]))
  backend.add_tokens([T.SYSTEM])
  no_ctl = PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token=T.PAD, eos_token=T.EOS, bos_token=T.BOS,
      unk_token=T.UNK, additional_special_tokens=[T.USER, T.ASSISTANT])
  assert no_ctl.get_vocab() == tok.get_vocab()
  msg = _one_line_mismatch(tok, no_ctl)
  assert ("control token '<|system|>' differs: teacher id 6 vs student id 6 (not a control "
          "token)") in msg, msg


def test_tokenizer_difference_against_a_reference_on_random_vocabularies():
  """Random alphabets and swaps vs a direct reference: the lowest id whose token differs."""
  rng = np.random.default_rng(0)
  base = list(T.DEFAULT_ALPHABET)
  for _ in range(20):
    a = list(base)
    i, j = sorted(rng.choice(len(a), 2, replace=False))
    b = list(a)
    b[i], b[j] = b[j], b[i]
    if rng.random() < 0.5:
      b = b[:int(rng.integers(j + 1, len(b) + 1))]  # and maybe a shorter alphabet
    ta, tb = T.build_task_tokenizer("".join(a)), T.build_task_tokenizer("".join(b))
    va, vb = ta.get_vocab(), tb.get_vocab()
    ids = sorted(set(va.values()) | set(vb.values()))
    inv_a, inv_b = {v: k for k, v in va.items()}, {v: k for k, v in vb.items()}
    first = next(k for k in ids if inv_a.get(k) != inv_b.get(k))
    diff = T.tokenizer_difference(ta, tb)
    assert diff.startswith(f"vocabulary differs at id {first}: token {inv_a[first]!r} ")


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


def test_run_plan_refuses_a_teacher_whose_own_tokenizer_differs(tok, tmp_path):
  """`run_plan.resolve` compares a Hugging Face teacher's own tokenizer with the run's."""
  import pathlib

  from opd_jax.train import config as config_lib
  from opd_jax.train import run_plan
  root = pathlib.Path(__file__).resolve().parent.parent
  same, other = tmp_path / "same", tmp_path / "other"
  tok.save_pretrained(same)
  T.build_task_tokenizer(alphabet="0123456789+=: ").save_pretrained(other)

  def cfg(path):
    return config_lib.from_config_dict(config_lib.load_config(
        str(root / "configs" / "opd.py") + ":smoke",
        ["teacher.source=hf", f"teacher.path={path}"]))

  assert run_plan.teacher_tokenizer_dir(cfg(same)) == str(same)
  run_plan.resolve(cfg(same))  # the task tokenizer, saved: identical
  with pytest.raises(T.TokenizerMismatchError, match=r"teacher\.path=.*other vs data\.tokenizer="
                     r".*vocabulary differs at id 17: token '\+' has teacher id 17, student id "
                     f"{7 + T.DEFAULT_ALPHABET.index('+')}"):
    run_plan.resolve(cfg(other))
  run_plan.resolve(cfg(other), shapes_only=True)  # `plan` reads no tokenizer
  assert run_plan.teacher_tokenizer_dir(cfg(tmp_path)) is None  # no tokenizer files there
