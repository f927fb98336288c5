"""Tokenizers: the task's own char-level tokenizer, local Hugging Face tokenizers, encode helpers.

The task tokenizer is built with `tokenizers` (one token per character of printable ASCII plus
special tokens) and wrapped as a `TaskTokenizer`, with a minimal chat template:

    <bos><|user|>{prompt}<|assistant|>{response}<eos>

so a prompt costs len(prompt) + 3 tokens and a response len(response) + 1 (EOS). Special ids are
fixed: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <|user|>=4, <|assistant|>=5, <|system|>=6, then the
characters.

`TaskTokenizer` answers the part of the transformers tokenizer interface that opd_jax and its
users call (encode / decode / call / the chat template / special tokens / vocabulary /
save_pretrained), with results identical to the transformers fast tokenizer over the same backend
(`to_transformers()`, tested token for token). It exists so that a run on the task tokenizer does
not import transformers (about a second of every launch); `to_transformers()` gives the real one
to a caller that needs it (TRL, an HF export).

Any Hugging Face tokenizer directory (e.g. a Qwen3 checkpoint's) is loaded with `load_tokenizer`
(local files only, never remote code). Prompts always go through the tokenizer's chat template
with the generation prompt added; a response is tokenized separately and followed by EOS, which is
exactly the token sequence the sampler produces (prompt ids, then generated ids ending in EOS).

Untokenizable text (`find_untokenizable`). A prompt or response is untokenizable iff encoding it
ALONE (no chat template, `add_special_tokens=False`) yields the id of a special token
(`control_tokens`: the named special tokens, <unk> included, and every added token marked special):
  * <unk>: a character outside the vocabulary (char-level task tokenizer: any character not in its
    alphabet, e.g. 'é' or a carriage return; tab and newline are in the default alphabet) or a
    word (an HF tokenizer with an unk token: WordPiece, SentencePiece without byte fallback);
  * any other special id: the text spells a control token ('<eos>', '<|im_end|>', ...) that would
    be read as structure, not as text.
Byte-level tokenizers (Qwen, Llama 3, GPT-2) have no <unk> and encode every string, so for them only
the second case applies. Decode round-trips are deliberately not compared: normalising tokenizers
(NFKC, lowercasing, prefix spaces) legitimately do not round-trip. The answer is the offending span,
its character offset and the token it became, so a loader can say where it is.

Teacher and student must share one tokenizer (opd_jax does not do cross-tokenizer distillation):
`check_same_tokenizer` raises a one-line `TokenizerMismatchError` naming the first differing token
(special tokens, chat-template control tokens, then the vocabulary, by id) and its ids on both
sides.
"""

from __future__ import annotations

import os
import string
from typing import TYPE_CHECKING, Any, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from opd_jax.errors import UserError

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, USER, ASSISTANT, SYSTEM)

# Printable ASCII without the exotic whitespace (\r, \x0b, \x0c): covers every task prompt and
# most plain-text prompt sets.
DEFAULT_ALPHABET = "".join(c for c in string.printable if c not in "\r\x0b\x0c")


def _chat_template(add_bos: bool) -> str:
  bos = BOS if add_bos else ""
  return (
      "{%- for m in messages -%}"
      "{%- if loop.first %}" + bos + "{% endif -%}"
      "{%- if m['role'] == 'system' %}" + SYSTEM + "{{ m['content'] }}"
      "{%- elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
      "{%- elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS +
      "{%- else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif -%}"
      "{%- endfor -%}"
      "{%- if add_generation_prompt %}" + ASSISTANT + "{% endif -%}")


def _render_chat(messages: Sequence[dict[str, str]], add_bos: bool,
                 add_generation_prompt: bool) -> str:
  """What `_chat_template(add_bos)` renders (the template's text joined, no whitespace of its own)."""
  marks = {"system": (SYSTEM, ""), "user": (USER, ""), "assistant": (ASSISTANT, EOS)}
  out = [BOS] if add_bos and messages else []
  for m in messages:
    if m["role"] not in marks:
      raise ValueError(f"unknown role {m['role']}")
    head, tail = marks[m["role"]]
    out += [head, str(m["content"]), tail]
  if add_generation_prompt:
    out.append(ASSISTANT)
  return "".join(out)


class TaskTokenizer:
  """The task tokenizer without transformers (module docstring): a `tokenizers.Tokenizer` plus the
  special tokens and chat template that `PreTrainedTokenizerFast` would add around it."""

  name_or_path = ""
  padding_side = "right"

  def __init__(self, backend: Tokenizer, *, add_bos: bool, model_max_length: int):
    self.backend = backend
    self.add_bos = add_bos
    self.model_max_length = model_max_length
    # Settable, as in transformers (e.g. pad = EOS); the ids follow the tokens.
    self.pad_token, self.eos_token, self.bos_token, self.unk_token = PAD, EOS, BOS, UNK

  @property
  def chat_template(self) -> str:
    return _chat_template(self.add_bos)

  @chat_template.setter
  def chat_template(self, value: str):
    raise AttributeError("TaskTokenizer renders its own chat template only; for another one use "
                         "tok.to_transformers() and set it there")

  pad_token_id = property(lambda self: self.backend.token_to_id(self.pad_token))
  eos_token_id = property(lambda self: self.backend.token_to_id(self.eos_token))
  bos_token_id = property(lambda self: self.backend.token_to_id(self.bos_token))
  unk_token_id = property(lambda self: self.backend.token_to_id(self.unk_token))

  @property
  def all_special_tokens(self) -> list[str]:
    # transformers' order: bos, eos, unk, pad, then the additional special tokens; no repeats.
    named = [self.bos_token, self.eos_token, self.unk_token, self.pad_token]
    return list(dict.fromkeys(named + [USER, ASSISTANT, SYSTEM]))

  @property
  def all_special_ids(self) -> list[int]:
    return [self.backend.token_to_id(t) for t in self.all_special_tokens]

  def __repr__(self) -> str:
    return (f"TaskTokenizer(vocab={len(self)}, add_bos={self.add_bos}, "
            f"model_max_length={self.model_max_length})")

  def __len__(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=False)

  def get_vocab(self) -> dict[str, int]:
    return self.backend.get_vocab(with_added_tokens=True)

  @property
  def added_tokens_decoder(self) -> dict[int, Any]:
    return dict(sorted(self.backend.get_added_tokens_decoder().items()))

  def convert_ids_to_tokens(self, ids):
    if isinstance(ids, int):
      return self.backend.id_to_token(ids)
    return [self.backend.id_to_token(int(i)) for i in ids]

  def convert_tokens_to_ids(self, tokens):
    if isinstance(tokens, str):
      i = self.backend.token_to_id(tokens)
      return self.unk_token_id if i is None else i
    return [self.convert_tokens_to_ids(t) for t in tokens]

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    # No post-processor: special tokens are never added around a text, so the flag changes nothing
    # (as in the transformers wrapper of this backend).
    del add_special_tokens
    return list(self.backend.encode(text, add_special_tokens=False).ids)

  def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True,
               return_offsets_mapping: bool = False) -> dict[str, list]:
    del add_special_tokens
    batched = not isinstance(text, str)
    encs = self.backend.encode_batch(list(text), add_special_tokens=False) if batched else [
        self.backend.encode(text, add_special_tokens=False)]
    out: dict[str, list] = {"input_ids": [list(e.ids) for e in encs],
                            "attention_mask": [[1] * len(e.ids) for e in encs]}
    if return_offsets_mapping:
      out["offset_mapping"] = [list(e.offsets) for e in encs]
    return out if batched else {k: v[0] for k, v in out.items()}

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False,
             clean_up_tokenization_spaces: bool = False) -> str:
    del clean_up_tokenization_spaces  # the task tokenizer never cleans up (as built)
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False,
                   clean_up_tokenization_spaces: bool = False) -> list[str]:
    return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

  def apply_chat_template(self, conversation: Sequence[dict[str, str]], tokenize: bool = True,
                          add_generation_prompt: bool = False, **kwargs) -> str | list[int]:
    if kwargs:
      raise TypeError(f"TaskTokenizer.apply_chat_template: unsupported arguments {sorted(kwargs)} "
                      "(use to_transformers() for the full interface)")
    if not conversation:  # as transformers does
      raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one "
                       "message.")
    text = _render_chat(conversation, self.add_bos, add_generation_prompt)
    return self.encode(text) if tokenize else text

  def to_transformers(self) -> "PreTrainedTokenizerFast":
    """The same tokenizer as a transformers `PreTrainedTokenizerFast` (imports transformers)."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (about a second to import)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(self.backend.to_str()), pad_token=self.pad_token,
        eos_token=self.eos_token, bos_token=self.bos_token, unk_token=self.unk_token,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        chat_template=self.chat_template, clean_up_tokenization_spaces=False,
        model_max_length=self.model_max_length)

  def save_pretrained(self, path: str | os.PathLike, **kwargs):
    """Writes the transformers fast tokenizer files (`load_tokenizer` reads them back)."""
    return self.to_transformers().save_pretrained(path, **kwargs)


def build_task_tokenizer(alphabet: str = DEFAULT_ALPHABET, *, add_bos: bool = True,
                         model_max_length: int = 4096) -> TaskTokenizer:
  """A character-level tokenizer over `alphabet` (plus the special tokens), with a chat template.

  add_bos: start every chat with <bos> (an attention sink for tiny models; costs one token).
  Characters outside the alphabet encode to <unk>; `encode_prompt`/`encode_example` reject them.
  Returns a `TaskTokenizer` (no transformers import); `.to_transformers()` gives the
  `PreTrainedTokenizerFast` of the same tokenizer.
  """
  chars = list(dict.fromkeys(alphabet))
  if not chars:
    raise ValueError("build_task_tokenizer: alphabet is empty")
  vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
  backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens(list(SPECIAL_TOKENS))
  return TaskTokenizer(backend, add_bos=add_bos, model_max_length=model_max_length)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
  """Any Hugging Face tokenizer saved in a local directory (no hub, no remote code).

  If the tokenizer defines no pad token, EOS is used as pad (pads are always masked out)."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"load_tokenizer: {path!r} is not a directory")
  # Imported here: transformers' auto classes import torch (seconds) when it is installed, which a
  # run on the embedded task tokenizer never needs.
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  if tok.eos_token_id is None:
    raise ValueError(f"load_tokenizer: tokenizer in {path!r} defines no eos_token")
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok


class TokenizerMismatchError(UserError, ValueError):
  """Teacher and student tokenizers differ (one line naming the first difference)."""


_SPECIAL_NAMES = ("eos", "pad", "bos", "unk")


def tokenizer_difference(teacher: PreTrainedTokenizerBase,
                         student: PreTrainedTokenizerBase) -> str | None:
  """The first difference between two tokenizers as one line, or None if they are identical for
  distillation. Checked in this order: the named special tokens (eos / pad / bos / unk: token and
  id; a different EOS or pad silently corrupts masks), the control tokens by id
  (`control_tokens`: the chat template's <|im_start|> / <|im_end|> and every other added token
  marked special), then the vocabulary (every token -> id, added tokens included) by id: the
  lowest id whose token differs. A token is named with its id on both sides ('absent' where one
  side lacks it)."""
  def id_in(vocab, token):
    i = vocab.get(token)
    return "absent" if i is None else str(i)

  for name in _SPECIAL_NAMES:
    t_tok, s_tok = getattr(teacher, f"{name}_token"), getattr(student, f"{name}_token")
    t_id, s_id = getattr(teacher, f"{name}_token_id"), getattr(student, f"{name}_token_id")
    if (t_tok, t_id) != (s_tok, s_id):
      return (f"{name} token differs: teacher {t_tok!r} (id {t_id}) vs student {s_tok!r} "
              f"(id {s_id})")
  t_ctl, s_ctl = control_tokens(teacher), control_tokens(student)
  for i in sorted(set(t_ctl) | set(s_ctl)):
    if t_ctl.get(i) != s_ctl.get(i):
      t, s = t_ctl.get(i), s_ctl.get(i)
      name = t if t is not None else s
      t_note = "" if t is not None else " (not a control token)"
      s_note = "" if s is not None else " (not a control token)"
      return (f"control token {name!r} differs: teacher id {id_in(teacher.get_vocab(), name)}"
              f"{t_note} vs student id {id_in(student.get_vocab(), name)}{s_note}")
  tv, sv = teacher.get_vocab(), student.get_vocab()
  if tv != sv:
    t_by_id = {i: t for t, i in tv.items()}
    s_by_id = {i: t for t, i in sv.items()}
    for i in sorted(set(t_by_id) | set(s_by_id)):
      t, s = t_by_id.get(i), s_by_id.get(i)
      if t != s:
        name = t if t is not None else s
        return (f"vocabulary differs at id {i}: token {name!r} has teacher id "
                f"{id_in(tv, name)}, student id {id_in(sv, name)}"
                + (f" (student's id {i} is {s!r})" if t is not None and s is not None else "")
                + f"; vocabulary sizes {len(tv)} / {len(sv)}")
  return None


def check_same_tokenizer(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                         where: str = "") -> None:
  """Raise `TokenizerMismatchError` (one line, naming the first differing token and its ids;
  `tokenizer_difference`) unless the tokenizers are identical for distillation (opd_jax does not
  do cross-tokenizer distillation). `where` names the tokenizers' sources in the message."""
  diff = tokenizer_difference(teacher, student)
  if diff is not None:
    raise TokenizerMismatchError(
        f"teacher and student tokenizers differ{f' ({where})' if where else ''}: {diff} "
        "(cross-tokenizer distillation is not supported: use one tokenizer for both)")


def control_tokens(tok: PreTrainedTokenizerBase) -> dict[int, str]:
  """id -> text of every special token: the named ones (`all_special_ids`, <unk> included) and
  every added token marked special (e.g. Qwen's <|im_start|>, which transformers need not name).
  Added tokens not marked special (Qwen3's <think>) are ordinary text."""
  out = {int(i): t for i, t in zip(tok.all_special_ids, tok.all_special_tokens)}
  for i, added in tok.added_tokens_decoder.items():
    if added.special:
      out[int(i)] = added.content
  if tok.unk_token_id is not None:
    out[int(tok.unk_token_id)] = tok.unk_token
  return out


def _short(text: str, n: int = 40) -> str:
  return repr(text if len(text) <= n else text[:n] + "...")


def find_untokenizable(tok: PreTrainedTokenizerBase, text: str) -> str | None:
  """None if `text` is tokenizable (see the module docstring), else a one-line description of the
  first offending span: what it is, its 0-based character offset, the token it encodes to."""
  special = control_tokens(tok)
  try:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
  except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
    ids, offsets = tok.encode(text, add_special_tokens=False), None
  for k, i in enumerate(ids):
    if i not in special:
      continue
    name = special[i]
    if offsets is None:
      return f"token {k} encodes to the special token {name!r} (id {i})"
    a, b = offsets[k]
    span = text[a:b]
    if i == tok.unk_token_id and span != tok.unk_token:
      what = (f"character {span!r} (U+{ord(span):04X})" if len(span) == 1
              else f"text {_short(span)}")
      return f"{what} at offset {a} is not in the tokenizer's vocabulary (encodes to {name})"
    return f"{_short(span)} at offset {a} spells the special token {name!r} (id {i})"
  return None


def _check_known(tok: PreTrainedTokenizerBase, ids: Sequence[int], text: str, what: str) -> None:
  """Raise ValueError if `text` (whose encoding contains `ids`) is untokenizable. Cheap unless
  an <unk> id is present or the text contains a special token's spelling."""
  unk = tok.unk_token_id
  if (unk is not None and unk in ids) or any(t and t in text for t in control_tokens(tok).values()):
    problem = find_untokenizable(tok, text)
    if problem:
      raise ValueError(f"{what} contains text the tokenizer cannot encode: {problem}")


def prompt_text(tok: PreTrainedTokenizerBase, prompt: str) -> str:
  """The prompt as the model sees it: chat template applied, generation prompt added."""
  if not tok.chat_template:
    raise ValueError(f"tokenizer {tok.name_or_path!r} has no chat template; prompts need one")
  return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                 add_generation_prompt=True)


def encode_prompt(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
  """Token ids of the chat-formatted prompt, ending with the generation prompt."""
  ids = tok.encode(prompt_text(tok, prompt), add_special_tokens=False)
  _check_known(tok, ids, prompt, "prompt")
  return ids


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
  """`encode_prompt` over many prompts (one batched tokenizer call)."""
  if not prompts:
    return []
  texts = [prompt_text(tok, p) for p in prompts]
  all_ids = tok(texts, add_special_tokens=False)["input_ids"]
  for ids, p in zip(all_ids, prompts):
    _check_known(tok, ids, p, "prompt")
  return [list(ids) for ids in all_ids]


def encode_response(tok: PreTrainedTokenizerBase, response: str) -> list[int]:
  """Response ids followed by EOS (the targets of SFT)."""
  ids = tok.encode(response, add_special_tokens=False)
  _check_known(tok, ids, response, "response")
  return list(ids) + [tok.eos_token_id]


def encode_example(tok: PreTrainedTokenizerBase, prompt: str,
                   response: str) -> tuple[list[int], list[bool]]:
  """(ids, loss_mask): chat prompt then response + EOS; the loss mask is True exactly on the
  response tokens and the EOS."""
  p, r = encode_prompt(tok, prompt), encode_response(tok, response)
  return p + r, [False] * len(p) + [True] * len(r)


def decode_response(tok: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
  """Text of generated ids: stops at the first EOS, drops special tokens (pads included)."""
  ids = [int(i) for i in ids]
  if tok.eos_token_id in ids:
    ids = ids[:ids.index(tok.eos_token_id)]
  return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
