"""Chat-format SFT data: rows of `messages` rendered with the tokenizer's chat template, the loss on
assistant turns only.

Layouts. A `ChatLayout` names the field holding the conversation (a dotted path, as in
`datasets.Layout`); built in:

  dolci_think  `messages`: a list of {"role": "system" | "user" | "assistant", "content": str},
               as in allenai's Dolci-Think SFT files (`{"id": ..., "messages": [{"role":
               "system", ...}, {"role": "user", ...}, {"role": "assistant", "content":
               "<think>...</think> answer"}]}`); other keys of a row or of a message are ignored.
  messages     the same field under a generic name.

Rendering (`render_chat`). The whole conversation is rendered once by the chat template
(`apply_chat_template(messages, tokenize=False)`). Assistant turn i is located by rendering the
conversation before it with the generation prompt (P_i = template(messages[:i], add_generation_
prompt=True)) and through it (Q_i = template(messages[:i + 1])): the turn is the text between
len(P_i) and len(Q_i) of the full rendering. The template must be prefix-stable for this (the full
rendering starts with every P_i and Q_i, and Q_i with P_i); a template that renders earlier turns
differently once later ones follow (e.g. Qwen3's, which drops the reasoning of assistant turns
before the last user turn, in a multi-turn conversation with <think> content) is refused for that
row (reason `template_mismatch`, as is a conversation the template itself refuses, e.g. "roles
must alternate"), never silently mis-masked. The rendering is then cut into
alternating pieces (everything up to and including each turn's generation prompt / each assistant
turn) and each piece is tokenized on its own (`add_special_tokens=False`): the same ids the
sampler produces (prompt ids, then generated ids). The loss mask is True on an assistant piece's
tokens up to and including its LAST control token (`tokenizer.control_tokens`: the end-of-turn
token, e.g. the task tokenizer's <eos> or ChatML's <|im_end|>; the whole piece if it has none), so
what a template writes after the end-of-turn token (ChatML's newline) is context, not target.
System and user turns, the generation prompts and everything else are never targets. With the
char-level task tokenizer a one-turn conversation gives exactly `tokenizer.encode_example`'s ids
and loss mask.

Loading (`load_chat_set`) reads JSONL / Parquet with `datasets`' row reader and follows its
conventions: each row becomes a `ChatExample` or is malformed for exactly one reason (in this
order): bad_utf8, bad_json, not_an_object (from the reader), missing_field (the messages field, or
a message's role / content, absent or null), wrong_type (messages not a non-empty list, a message
not an object, role / content not strings), bad_role (a role other than system / user /
assistant), bad_order (an assistant turn before any user turn), empty_turn (a user or assistant
turn whose content is empty or whitespace), no_assistant_turn (nothing to train on),
untokenizable (with a tokenizer: a content that encodes to a special token,
`tokenizer.find_untokenizable`), template_mismatch (see above), too_long (with a tokenizer and
`max_tokens`: more tokens than that). `on_error='error'` raises the first as a one-line
`datasets.MalformedRowError` (`FILE:LINE: field 'messages.2.content': REASON: detail`);
`on_error='skip'` counts them per reason in the returned `ChatLoadReport` (a `datasets.LoadReport`
whose `to_metrics` lists the chat reasons). Deduplication (default on) removes later rows whose
conversation (roles, and contents after `datasets.normalize_prompt`) repeats a kept one.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple, Sequence

import jinja2

from opd_jax.data import datasets
from opd_jax.data import tokenizer as tokenizer_lib
from opd_jax.data.datasets import MalformedRowError, PromptSetError, PromptSetNotFoundError

ROLES = ("system", "user", "assistant")
REASONS = ("bad_utf8", "bad_json", "not_an_object", "missing_field", "wrong_type", "bad_role",
           "bad_order", "empty_turn", "no_assistant_turn", "untokenizable", "template_mismatch",
           "too_long")


@dataclasses.dataclass(frozen=True)
class ChatLayout:
  """Where a row keeps its conversation (a dotted path to a list of {role, content})."""

  messages: str = "messages"


LAYOUTS: dict[str, ChatLayout] = {
    "dolci_think": ChatLayout(messages="messages"),
    "messages": ChatLayout(messages="messages"),
}


class Message(NamedTuple):
  role: str
  content: str


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """One conversation. `ids` / `loss_mask` hold its rendering (`render_chat`) when it was loaded
  with a tokenizer (empty otherwise; `encode_chat` renders on demand)."""

  messages: tuple[Message, ...]
  ids: tuple[int, ...] = ()
  loss_mask: tuple[bool, ...] = ()


class ChatTemplateError(ValueError):
  """The chat template cannot locate the assistant turns of a conversation."""


@dataclasses.dataclass
class ChatLoadReport(datasets.LoadReport):
  """`datasets.LoadReport` over the chat reasons (`REASONS`)."""

  def to_metrics(self, prefix: str = "data") -> dict[str, int]:
    out = {f"{prefix}/rows": self.rows, f"{prefix}/kept": self.kept,
           f"{prefix}/skipped/total": self.num_skipped}
    for reason in REASONS:
      out[f"{prefix}/skipped/{reason}"] = self.skipped.get(reason, 0)
    out[f"{prefix}/dedup/duplicates"] = self.duplicates
    out[f"{prefix}/dedup/conflicting_answers"] = self.conflicting_answers
    return out


# -- rendering ------------------------------------------------------------------------------------
def _render(tok, messages: Sequence[Message], generation_prompt: bool) -> str:
  try:
    return tok.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                   tokenize=False, add_generation_prompt=generation_prompt)
  except jinja2.TemplateError as e:   # the template's own raise_exception, e.g. Llama-2 / Mistral
    # "Conversation roles must alternate", Gemma's "System role not supported"
    raise ChatTemplateError(f"the chat template refuses the conversation: {e}") from None


def chat_pieces(tok, messages: Sequence[Message]) -> list[tuple[str, bool]]:
  """The rendered conversation cut into (text, is_assistant_turn) pieces (module docstring)."""
  if not tok.chat_template:
    raise ValueError(f"tokenizer {tok.name_or_path!r} has no chat template; chat data needs one")
  messages = [Message(*m) for m in messages]
  full = _render(tok, messages, False)
  pieces, pos = [], 0
  for i, m in enumerate(messages):
    if m.role != "assistant":
      continue
    before = _render(tok, messages[:i], True)
    through = _render(tok, messages[:i + 1], False)
    if not (through.startswith(before) and full.startswith(through) and len(before) >= pos):
      raise ChatTemplateError(
          f"the chat template does not render assistant turn {i} the same way in the whole "
          "conversation as in its prefix (not prefix-stable), so the turn cannot be located")
    pieces.append((full[pos:len(before)], False))
    pieces.append((full[len(before):len(through)], True))
    pos = len(through)
  pieces.append((full[pos:], False))
  return [(text, a) for text, a in pieces if text]


def render_chat(tok, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
  """(ids, loss_mask) of a conversation: the loss on every assistant turn through its end-of-turn
  token, nothing else (module docstring). Raises ChatTemplateError for a template that cannot
  locate the turns."""
  pieces = chat_pieces(tok, messages)
  encoded = tok([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
  controls = set(tokenizer_lib.control_tokens(tok))
  ids: list[int] = []
  mask: list[bool] = []
  for (_, assistant), piece in zip(pieces, encoded):
    piece = list(piece)
    ids += piece
    if not assistant:
      mask += [False] * len(piece)
      continue
    ends = [k for k, i in enumerate(piece) if i in controls]
    n = ends[-1] + 1 if ends else len(piece)
    mask += [True] * n + [False] * (len(piece) - n)
  return ids, mask


def encode_chat(tok, example: ChatExample) -> tuple[list[int], list[bool]]:
  """(ids, loss_mask) of an example: its stored rendering, or `render_chat`."""
  if example.ids:
    return list(example.ids), list(example.loss_mask)
  return render_chat(tok, example.messages)


# -- loading --------------------------------------------------------------------------------------
def _messages(loc: str, row: Any, layout: ChatLayout) -> tuple[Message, ...]:
  """Field checks that need no tokenizer (bad_utf8 .. no_assistant_turn)."""
  if isinstance(row, MalformedRowError):
    raise row
  if not isinstance(row, dict):
    raise MalformedRowError(loc, "<row>", "not_an_object", f"got {type(row).__name__}")
  field = layout.messages
  try:
    raw = datasets._resolve(row, field)
  except datasets._Missing as e:
    raise MalformedRowError(loc, field, "missing_field", str(e)) from None
  if not isinstance(raw, list) or not raw:
    what = "an empty list" if isinstance(raw, list) else type(raw).__name__
    raise MalformedRowError(loc, field, "wrong_type", f"expected a non-empty list of messages, "
                            f"got {what}")
  out = []
  for i, m in enumerate(raw):
    where = f"{field}.{i}"
    if not isinstance(m, dict):
      raise MalformedRowError(loc, where, "wrong_type",
                              f"expected a message object, got {type(m).__name__}")
    values = []
    for key in ("role", "content"):
      if m.get(key) is None:
        raise MalformedRowError(loc, f"{where}.{key}", "missing_field",
                                f"key {key!r} missing or null")
      if not isinstance(m[key], str):
        raise MalformedRowError(loc, f"{where}.{key}", "wrong_type",
                                f"expected str, got {type(m[key]).__name__}")
      datasets._check_utf8(loc, f"{where}.{key}", m[key])
      values.append(m[key])
    out.append(Message(*values))
  seen_user = False
  for i, m in enumerate(out):
    if m.role not in ROLES:
      raise MalformedRowError(loc, f"{field}.{i}.role", "bad_role",
                              f"role {m.role!r} is not one of {ROLES}")
    if m.role == "assistant" and not seen_user:
      raise MalformedRowError(loc, f"{field}.{i}.role", "bad_order",
                              "an assistant turn before any user turn")
    seen_user = seen_user or m.role == "user"
    if m.role != "system" and not m.content.strip():
      raise MalformedRowError(loc, f"{field}.{i}.content", "empty_turn",
                              f"the {m.role} turn is empty")
  if not any(m.role == "assistant" for m in out):
    raise MalformedRowError(loc, field, "no_assistant_turn",
                            "no assistant message (nothing to train on)")
  return tuple(out)


def _dedup_key(messages: tuple[Message, ...]) -> tuple:
  return tuple((m.role, datasets.normalize_prompt(m.content)) for m in messages)


def load_chat_set(path: str | os.PathLike, layout: str | ChatLayout = "dolci_think", *,
                  on_error: str = "error", tokenizer=None, max_tokens: int | None = None,
                  limit: int | None = None, dedup: bool = True
                  ) -> tuple[list[ChatExample], ChatLoadReport]:
  """Read a chat SFT set. Returns (examples in file order, report); see the module docstring.

  tokenizer: enables the untokenizable, template_mismatch and too_long checks, and stores each
    example's rendering (`ChatExample.ids` / `loss_mask`).
  max_tokens: rows rendering to more tokens are malformed (too_long); needs a tokenizer.
  limit: stop after this many kept examples. dedup: drop repeated conversations.
  Raises PromptSetError (a UserError) for a bad argument, an unreadable / empty file, or a file
  with no usable row; PromptSetNotFoundError if the file does not exist.
  """
  path = os.fspath(path)
  if on_error not in datasets.ON_ERROR:
    raise PromptSetError(f"on_error must be one of {datasets.ON_ERROR}, got {on_error!r}")
  if isinstance(layout, str):
    if layout not in LAYOUTS:
      raise PromptSetError(f"unknown chat layout {layout!r}; valid: {sorted(LAYOUTS)}")
    layout = LAYOUTS[layout]
  if max_tokens is not None and tokenizer is None:
    raise PromptSetError("max_tokens needs a tokenizer")
  if limit is not None and limit < 1:
    raise PromptSetError(f"limit must be >= 1 (or None for all), got {limit}")
  if not os.path.isfile(path):
    raise PromptSetNotFoundError(f"chat set {path!r} does not exist")
  rows = datasets._rows(path, datasets.Layout(prompt=layout.messages, answer=layout.messages))
  if os.path.getsize(path) == 0:
    raise PromptSetError(f"{path}: chat set is empty (0 bytes)")
  report = ChatLoadReport(path=path, dedup=dedup)
  first: dict[tuple, str] = {}
  problems: dict[str, str | None] = {}  # content -> find_untokenizable (contents repeat)
  out: list[ChatExample] = []
  for loc, row in rows:
    if limit is not None and len(out) >= limit:
      break
    report.rows += 1
    try:
      messages = _messages(loc, row, layout)
      key = _dedup_key(messages) if dedup else None
      if key is not None and key in first:
        report.duplicates += 1
        if len(report.duplicate_samples) < datasets.MAX_SAMPLES:
          report.duplicate_samples.append(f"{loc}: duplicate of {first[key]}")
        continue
      example = ChatExample(messages)
      if tokenizer is not None:
        example = _tokenized(loc, example, layout, tokenizer, max_tokens, problems)
    except MalformedRowError as e:
      if on_error == "error":
        raise
      report._skip(e)
      continue
    if key is not None:
      first[key] = loc
    out.append(example)
  report.kept = len(out)
  if report.rows == 0:
    raise PromptSetError(f"{path}: chat set has no rows (only blank lines, or an empty table)")
  if not out:
    why = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items()))
    sample = next(iter(report.samples.values()))[0]
    raise PromptSetError(f"{path}: no usable rows: all {report.rows} skipped ({why}); first: "
                         f"{sample}")
  if report.skipped or report.duplicates:
    datasets.log.warning("%s", report.summary())
  return out, report


def _tokenized(loc: str, example: ChatExample, layout: ChatLayout, tok, max_tokens: int | None,
               problems: dict[str, str | None]) -> ChatExample:
  """untokenizable / template_mismatch / too_long, and the rendering. A content is searched for
  its problem (`find_untokenizable`, one more encode) only when it spells a control token, the
  rendering holds <unk>, or the template failed; contents repeat, so the answer is cached."""
  try:
    ids, mask = render_chat(tok, example.messages)
    failure = None
  except ChatTemplateError as e:
    ids, mask, failure = None, None, e
  controls = [t for t in tokenizer_lib.control_tokens(tok).values() if t]
  unk_seen = ids is None or (tok.unk_token_id is not None and tok.unk_token_id in set(ids))
  for i, m in enumerate(example.messages):
    if not (unk_seen or any(t in m.content for t in controls)):
      continue
    if m.content not in problems:
      problems[m.content] = tokenizer_lib.find_untokenizable(tok, m.content)
    if problems[m.content]:
      raise MalformedRowError(loc, f"{layout.messages}.{i}.content", "untokenizable",
                              problems[m.content])
  if failure is not None:
    raise MalformedRowError(loc, layout.messages, "template_mismatch", str(failure))
  if max_tokens is not None and len(ids) > max_tokens:
    raise MalformedRowError(loc, layout.messages, "too_long",
                            f"{len(ids)} tokens (chat template applied) > {max_tokens}")
  return dataclasses.replace(example, ids=tuple(ids), loss_mask=tuple(mask))
