"""Prompt sets from local JSONL / Parquet files (e.g. dapo-math-17k, MATH), as `Example`s.

A `Layout` names where the prompt and the answer live in a row, as dotted paths through nested
objects and lists (`prompt.0.content`, `reward_model.ground_truth`). Built-in layouts:

  dapo_math_17k  prompt = `prompt.0.content` (the first chat message), answer =
                 `reward_model.ground_truth`; no worked solution (Example.solution = '').
  math           prompt = `problem`; solution = `solution`; answer = the content of the LAST
                 `\\boxed{...}` (or `\\fbox{...}`) in the solution, braces balanced.

Malformed rows. Each row either becomes an Example or is malformed for exactly one reason:
  bad_json         the line is not valid JSON (JSONL only)
  not_an_object    the row is not a JSON object
  missing_field    a path component is absent (or null)
  wrong_type       the prompt/solution is not a string, or the answer is not a string or a number
  empty_prompt     the prompt is empty or whitespace
  empty_answer     the answer is empty or whitespace
  no_boxed_answer  (answer_from_boxed layouts) the solution has no \\boxed{...}
  prompt_too_long  longer than `max_prompt_chars` characters of prompt text, or than
                   `max_prompt_tokens` tokens of the chat-formatted prompt (needs a tokenizer); the
                   message says which limit was hit
With `on_error='error'` (default) the first malformed row raises `MalformedRowError` naming the
file, the line (JSONL: 1-based line number; Parquet: 'row N', the 0-based row index), the field path
and the reason. With `on_error='skip'` malformed rows are skipped and counted per reason in the
returned `LoadReport` (also logged once at the end). Blank JSONL lines are not rows and are ignored.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from typing import Any, Iterator

from opd_jax.data.tasks import Example

log = logging.getLogger(__name__)

ON_ERROR = ("error", "skip")
REASONS = ("bad_json", "not_an_object", "missing_field", "wrong_type", "empty_prompt",
           "empty_answer", "no_boxed_answer", "prompt_too_long")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a row keeps its fields (dotted paths; integer components index lists)."""

  prompt: str
  answer: str
  solution: str | None = None
  answer_from_boxed: bool = False  # answer path holds a solution; take its last \boxed{} content


LAYOUTS: dict[str, Layout] = {
    "dapo_math_17k": Layout(prompt="prompt.0.content", answer="reward_model.ground_truth"),
    "math": Layout(prompt="problem", answer="solution", solution="solution",
                   answer_from_boxed=True),
}


class MalformedRowError(ValueError):
  """A row that cannot be turned into an Example; `location`, `field`, `reason` say why."""

  def __init__(self, location: str, field: str, reason: str, detail: str):
    self.location, self.field, self.reason, self.detail = location, field, reason, detail
    super().__init__(f"{location}: field {field!r}: {reason}: {detail}")


@dataclasses.dataclass
class LoadReport:
  """What `load_prompt_set` read: rows seen, kept, and skipped per reason (with a few examples)."""

  path: str
  rows: int = 0
  kept: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: list[str] = dataclasses.field(default_factory=list)  # first few skip messages

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    s = f"{self.path}: {self.rows} rows, kept {self.kept}, skipped {self.num_skipped}"
    if self.skipped:
      s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
    return s


class _Missing(Exception):
  pass


def _resolve(row: Any, path: str) -> Any:
  cur = row
  for part in path.split("."):
    if isinstance(cur, dict):
      if part not in cur or cur[part] is None:
        raise _Missing(f"key {part!r} missing or null")
      cur = cur[part]
    elif isinstance(cur, (list, tuple)):
      if not re.fullmatch(r"-?\d+", part):
        raise _Missing(f"{part!r} is not a list index (value is a list of {len(cur)})")
      i = int(part)
      if not -len(cur) <= i < len(cur):
        raise _Missing(f"list index {i} out of range (length {len(cur)})")
      cur = cur[i]
      if cur is None:
        raise _Missing(f"list element {i} is null")
    else:
      raise _Missing(f"cannot look up {part!r} in a {type(cur).__name__}")
  return cur


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} / \\fbox{...} in `text` (balanced braces), or None."""
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
  for start in reversed(starts):
    depth, i = 1, start
    while i < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
    if depth == 0:
      return text[start:i - 1]
  return None


def _rows(path: str) -> Iterator[tuple[str, Any]]:
  """(location, parsed row or a MalformedRowError) for every row of a .jsonl or .parquet file."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq
    for i, row in enumerate(pq.read_table(path).to_pylist()):
      yield f"{path}:row {i}", row
    return
  if not path.endswith(".jsonl"):
    raise ValueError(f"{path}: unsupported prompt-set format; expected .jsonl (JSON lines) or "
                     ".parquet")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      loc = f"{path}:{n}"
      try:
        yield loc, json.loads(line)
      except json.JSONDecodeError as e:
        yield loc, MalformedRowError(loc, "<row>", "bad_json", f"{e.msg} at column {e.colno}")


def _example(loc: str, row: Any, layout: Layout, max_prompt_chars: int | None,
             max_prompt_tokens: int | None, tokenizer) -> Example:
  if isinstance(row, MalformedRowError):
    raise row
  if not isinstance(row, dict):
    raise MalformedRowError(loc, "<row>", "not_an_object", f"got {type(row).__name__}")

  def get(field: str, types: tuple[type, ...]) -> Any:
    try:
      v = _resolve(row, field)
    except _Missing as e:
      raise MalformedRowError(loc, field, "missing_field", str(e)) from None
    if not isinstance(v, types) or isinstance(v, bool):
      want = " or ".join(t.__name__ for t in types)
      raise MalformedRowError(loc, field, "wrong_type", f"expected {want}, got {type(v).__name__}")
    return v

  prompt = get(layout.prompt, (str,))
  if not prompt.strip():
    raise MalformedRowError(loc, layout.prompt, "empty_prompt", "prompt is empty")
  solution = get(layout.solution, (str,)) if layout.solution else ""
  if layout.answer_from_boxed:
    answer = last_boxed(get(layout.answer, (str,)))
    if answer is None:
      raise MalformedRowError(loc, layout.answer, "no_boxed_answer", "no \\boxed{...} found")
  else:
    answer = get(layout.answer, (str, int, float))
    answer = str(answer)
  if not answer.strip():
    raise MalformedRowError(loc, layout.answer, "empty_answer", "answer is empty")
  if max_prompt_chars is not None and len(prompt) > max_prompt_chars:
    raise MalformedRowError(loc, layout.prompt, "prompt_too_long",
                            f"{len(prompt)} characters > max_prompt_chars={max_prompt_chars}")
  if max_prompt_tokens is not None:
    from opd_jax.data.tokenizer import encode_prompt
    n = len(encode_prompt(tokenizer, prompt))
    if n > max_prompt_tokens:
      raise MalformedRowError(loc, layout.prompt, "prompt_too_long",
                              f"{n} tokens (chat template applied) > max_prompt_tokens="
                              f"{max_prompt_tokens}")
  return Example(prompt=prompt, solution=solution, answer=answer.strip())


def load_prompt_set(path: str | os.PathLike, layout: str | Layout = "dapo_math_17k", *,
                    on_error: str = "error", max_prompt_chars: int | None = None,
                    max_prompt_tokens: int | None = None, tokenizer=None,
                    limit: int | None = None) -> tuple[list[Example], LoadReport]:
  """Read a prompt set. Returns (examples in file order, report). See the module docstring.

  layout: a name in LAYOUTS or a Layout with your own field paths.
  max_prompt_tokens: counts tokens of the chat-formatted prompt; requires `tokenizer`.
  limit: stop after this many kept examples.
  """
  path = os.fspath(path)
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  if isinstance(layout, str):
    if layout not in LAYOUTS:
      raise ValueError(f"unknown prompt-set layout {layout!r}; valid: {sorted(LAYOUTS)}")
    layout = LAYOUTS[layout]
  if max_prompt_tokens is not None and tokenizer is None:
    raise ValueError("max_prompt_tokens needs a tokenizer")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompt set {path!r} does not exist")
  report = LoadReport(path=path)
  skipped: collections.Counter = collections.Counter()
  out: list[Example] = []
  for loc, row in _rows(path):
    if limit is not None and len(out) >= limit:
      break
    report.rows += 1
    try:
      out.append(_example(loc, row, layout, max_prompt_chars, max_prompt_tokens, tokenizer))
    except MalformedRowError as e:
      if on_error == "error":
        raise
      skipped[e.reason] += 1
      if len(report.examples) < 5:
        report.examples.append(str(e))
  report.kept = len(out)
  report.skipped = dict(skipped)
  if skipped:
    log.warning("%s", report.summary())
  return out, report
