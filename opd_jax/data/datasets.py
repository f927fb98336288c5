"""Prompt sets from local JSONL / Parquet files (e.g. dapo-math-17k, MATH), as `Example`s.

A `Layout` names where the prompt and the answer live in a row, as dotted paths through nested
objects and lists (`prompt.0.content`, `reward_model.ground_truth`). Built-in layouts:

  dapo_math_17k  prompt = `prompt.0.content` (the first chat message), answer =
                 `reward_model.ground_truth`; no worked solution (Example.solution = '').
  math           prompt = `problem`; solution = `solution`; answer = the content of the LAST
                 `\\boxed{...}` (or `\\fbox{...}`) in the solution, braces balanced.
  deepcoder      DeepCoder-Preview-Dataset rows: prompt = `problem` plus a fixed instruction;
                 answer = the `code_exec` test spec (JSON) converted from `tests` (below).
  livecodebench  LiveCodeBench code-generation rows: prompt = `question_content` (with the
                 `starter_code`, if any) plus a fixed instruction; answer = the test spec converted
                 from `public_test_cases` + `private_test_cases` (below).

Code layouts (`Layout.code_tests`). The answer of a code example is the JSON test spec that
`data.code_exec` runs (`{"io": [[stdin, stdout], ...]}` or `{"fn": name, "calls": [[args,
expected], ...]}`), so the `code` verifier scores it. Accepted test formats:
  deepcoder `tests` (a JSON string, or already a list / object):
    * TACO / APPS: {"inputs": [...], "outputs": [...], "fn_name"?: name}: stdin/stdout strings
      (a list of lines is joined with newlines), or with `fn_name` argument lists and return
      values; a return value stored as a one-element list is unwrapped (the APPS convention);
    * PrimeIntellect / LiveCodeBench style: a list of {"input", "output"} cases, stdin/stdout
      unless the case has `fn_name`, `type: "function_call"` or `testtype: "functional"`; the
      function name comes from the case's `fn_name` or `metadata.func_name`, else the row's
      `fn_name` or `metadata.func_name` (metadata: an object or JSON text).
  livecodebench `public_test_cases` / `private_test_cases` (JSON strings or lists; private
    tests may also be LiveCodeBench's compressed form, base64(zlib(pickle(json string))), read by
    an unpickler that refuses every global, so it can only yield plain data): lists of
    {"input", "output", "testtype": "stdin" | "functional"}; `metadata` (a JSON string or object)
    holds `func_name` for functional tests.
  Functional inputs / outputs given as text (LiveCodeBench) are one JSON value per input line (the
  arguments, in order) and one JSON value (the return value). A function name not defined at
  module level is looked up as a method of the program's `Solution` class (LeetCode style;
  `code_exec`). The instruction added to the prompt asks for one ```python block (stdin/stdout
  or the named function).

Reading. JSONL files are read as bytes and decoded line by line (a UTF-8 BOM on line 1 is
dropped), so one bad byte costs one row; Parquet files are read in record batches, and a batch that
fails to decode is re-read row by row. Blank JSONL lines are not rows and are ignored.

Malformed rows. Each row either becomes an Example or is malformed for exactly one reason
(checked in this order):
  bad_utf8         the line (JSONL) or a string column (Parquet) is not valid UTF-8, or a field
                   holds a lone surrogate (a JSON \\ud800 escape) that no tokenizer can take
  bad_json         the line is not valid JSON (JSONL only)
  not_an_object    the row is not a JSON object
  missing_field    a path component is absent (or null)
  wrong_type       the prompt/solution is not a string, or the answer is not a string or a finite
                   number
  empty_prompt     the prompt is empty or whitespace
  empty_answer     the answer is empty or whitespace
  no_boxed_answer  (answer_from_boxed layouts) the solution has no \\boxed{...}
  bad_tests        (code layouts) the tests are not valid JSON, hold no case, or a case has the
                   wrong shape or types (the detail says which case and why)
  untokenizable    (with a tokenizer) the prompt, or the layout's solution, encodes to a special
                   token: a character/word the tokenizer maps to <unk>, or the spelling of a
                   control token such as '<eos>' / '<|im_end|>'. The precise rule, for the
                   char-level task tokenizer and for HF tokenizers, is
                   `tokenizer.find_untokenizable`'s.
  prompt_too_long  longer than `max_prompt_chars` characters of prompt text, or than
                   `max_prompt_tokens` tokens of the chat-formatted prompt (needs a tokenizer); the
                   message says which limit was hit
With `on_error='error'` (default) the first malformed row raises `MalformedRowError` (a
`UserError`), one line: `FILE:LINE: field 'PATH': REASON: detail` (JSONL: 1-based line number;
Parquet: 'row N', the 0-based row index). With `on_error='skip'` malformed rows are skipped and
counted per reason in the returned `LoadReport`, which keeps up to 5 such messages per reason
(logged once at the end). Either way a file with no rows, or with no usable row, raises
`PromptSetError` naming the file.

Deduplication (`dedup=True`, the default). Public prompt sets repeat prompts (verl's dapo-math-17k
parquet holds each prompt ~100 times, aime-2024 each problem 32 times), which over-weights them in
training and shrinks eval standard errors. Two rows are duplicates iff their prompts are equal after
`normalize_prompt`: every run of whitespace (`str.isspace`: spaces, tabs, newlines, NBSP, ...)
becomes one space and leading/trailing whitespace is dropped; case, punctuation and Unicode form
are preserved (no NFC / lowercasing). The first occurrence (its answer and solution) is kept; every
later one is removed and counted in `LoadReport.duplicates`, and those whose answer (as loaded,
stripped) differs from the kept one are also counted in `LoadReport.conflicting_answers` (a subset
of `duplicates`; up to 5 `file:line` samples each). Only valid rows take part: a malformed row is
skipped for its reason, never counted as a duplicate. `limit` counts kept (unique) examples.
"""

from __future__ import annotations

import base64
import codecs
import collections
import dataclasses
import functools
import io
import json
import logging
import math
import os
import pickle
import re
import zlib
from typing import Any, Iterator

from opd_jax.data.tasks import Example
from opd_jax.errors import UserError

log = logging.getLogger(__name__)

ON_ERROR = ("error", "skip")
REASONS = ("bad_utf8", "bad_json", "not_an_object", "missing_field", "wrong_type", "empty_prompt",
           "empty_answer", "no_boxed_answer", "bad_tests", "untokenizable", "prompt_too_long",
           "no_domain")
MAX_SAMPLES = 5  # file:line samples kept per skip reason / per dedup counter


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a row keeps its fields (dotted paths; integer components index lists)."""

  prompt: str
  answer: str
  solution: str | None = None
  answer_from_boxed: bool = False  # answer path holds a solution; take its last \boxed{} content
  # Code layouts: the name of the converter (CODE_TESTS) that turns the row's tests (at `answer`
  # and the `reads` fields) into a code_exec test spec, and other top-level fields it reads.
  code_tests: str | None = None
  reads: tuple[str, ...] = ()

  def columns(self) -> set[str]:
    """Top-level fields the layout reads (Parquet reads only these columns)."""
    paths = (self.prompt, self.answer, self.solution) + tuple(self.reads)
    return {p.split(".")[0] for p in paths if p}


LAYOUTS: dict[str, Layout] = {
    "dapo_math_17k": Layout(prompt="prompt.0.content", answer="reward_model.ground_truth"),
    "math": Layout(prompt="problem", answer="solution", solution="solution",
                   answer_from_boxed=True),
    "deepcoder": Layout(prompt="problem", answer="tests", code_tests="deepcoder",
                        reads=("fn_name", "metadata")),
    "livecodebench": Layout(prompt="question_content", answer="public_test_cases",
                            code_tests="livecodebench",
                            reads=("private_test_cases", "metadata", "starter_code")),
}


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


class PromptSetError(UserError, ValueError):
  """A prompt set (or a request for one) that cannot be used; the message names the file."""


class PromptSetNotFoundError(UserError, FileNotFoundError):
  """The prompt-set file does not exist."""


class MalformedRowError(PromptSetError):
  """A row that cannot be turned into an Example; `location` (FILE:LINE or FILE:row N), `field`,
  `reason` (one of REASONS) and `detail` say why. The message is one line."""

  def __init__(self, location: str, field: str, reason: str, detail: str):
    self.location, self.field, self.reason = location, field, reason
    self.detail = _one_line(detail)
    super().__init__(f"{location}: field {field!r}: {reason}: {self.detail}")


@dataclasses.dataclass
class LoadReport:
  """What `load_prompt_set` read: rows seen, kept, skipped per reason, duplicates removed.

  rows: rows read (blank JSONL lines are not rows; reading stops once `limit` examples are kept).
  kept: examples returned. rows == kept + num_skipped + duplicates.
  skipped: reason -> count (only reasons that occurred). samples: reason -> up to 5 one-line
  messages `FILE:LINE: field 'PATH': REASON: detail`, in file order.
  duplicates: rows removed by deduplication (0 with dedup=False); conflicting_answers: those of
  them whose answer differed from the kept first occurrence. duplicate_samples /
  conflict_samples: up to 5 `FILE:LINE: duplicate of FILE:LINE[: answer ... != ...]`.
  """

  path: str
  dedup: bool = True
  rows: int = 0
  kept: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  samples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  duplicates: int = 0
  conflicting_answers: int = 0
  duplicate_samples: list[str] = dataclasses.field(default_factory=list)
  conflict_samples: list[str] = dataclasses.field(default_factory=list)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def _skip(self, e: MalformedRowError) -> None:
    self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
    kept = self.samples.setdefault(e.reason, [])
    if len(kept) < MAX_SAMPLES:
      kept.append(str(e))

  def to_metrics(self, prefix: str = "data") -> dict[str, int]:
    """Flat counters with stable keys (every reason, zeros included): `{prefix}/rows`,
    `{prefix}/kept`, `{prefix}/skipped/total`, `{prefix}/skipped/<reason>` (e.g.
    `data/skipped/bad_utf8`), `{prefix}/dedup/duplicates`, `{prefix}/dedup/conflicting_answers`.
    Use another prefix per file (e.g. 'data/eval')."""
    out = {f"{prefix}/rows": self.rows, f"{prefix}/kept": self.kept,
           f"{prefix}/skipped/total": self.num_skipped}
    for reason in REASONS:
      out[f"{prefix}/skipped/{reason}"] = self.skipped.get(reason, 0)
    out[f"{prefix}/dedup/duplicates"] = self.duplicates
    out[f"{prefix}/dedup/conflicting_answers"] = self.conflicting_answers
    return out

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable: every field (counts and samples), for a run summary."""
    return dataclasses.asdict(self)

  def summary(self) -> str:
    s = f"{self.path}: {self.rows} rows, kept {self.kept}, skipped {self.num_skipped}"
    if self.skipped:
      s += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
    if self.duplicates:
      s += f", removed {self.duplicates} duplicate prompts"
      if self.conflicting_answers:
        s += f" ({self.conflicting_answers} with a conflicting answer)"
    return s


def normalize_prompt(prompt: str) -> str:
  """The deduplication key: whitespace runs collapsed to one space, ends stripped, case kept."""
  return " ".join(prompt.split())


class _Missing(Exception):
  pass


_INDEX = re.compile(r"-?[0-9]+")


@functools.lru_cache(maxsize=64)
def _parts(path: str) -> tuple[str, ...]:
  return tuple(path.split("."))


def _resolve(row: Any, path: str) -> Any:
  cur = row
  for part in _parts(path):
    if isinstance(cur, dict):
      if part not in cur or cur[part] is None:
        raise _Missing(f"key {part!r} missing or null")
      cur = cur[part]
    elif isinstance(cur, (list, tuple)):
      if not _INDEX.fullmatch(part):
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


def _utf8_detail(e: UnicodeDecodeError, where: str) -> str:
  bad = e.object[e.start:e.end]
  return f"invalid UTF-8 byte(s) 0x{bad.hex()} at byte {e.start} of {where} ({e.reason})"


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
  with open(path, "rb") as f:
    for n, raw in enumerate(f, start=1):
      if n == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      if not raw.strip():
        continue
      loc = f"{path}:{n}"
      try:
        line = raw.rstrip(b"\r\n").decode("utf-8")
      except UnicodeDecodeError as e:
        yield loc, MalformedRowError(loc, "<row>", "bad_utf8", _utf8_detail(e, "the line"))
        continue
      try:
        yield loc, json.loads(line)
      except json.JSONDecodeError as e:
        yield loc, MalformedRowError(loc, "<row>", "bad_json", f"{e.msg} at column {e.pos + 1}")
      except ValueError as e:   # e.g. an integer beyond Python's 4300-digit conversion limit
        yield loc, MalformedRowError(loc, "<row>", "bad_json", _short(e))
      except RecursionError:
        yield loc, MalformedRowError(loc, "<row>", "bad_json", "nested too deeply")


def _parquet_rows(path: str, columns: set[str]) -> Iterator[tuple[str, Any]]:
  """Rows of the top-level `columns` the layout reads (all columns if none of them exists), so a
  bad value in a column the layout does not read costs nothing."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise PromptSetError(f"{path}: not a readable Parquet file: {_one_line(e)}") from None
  read = [n for n in pf.schema_arrow.names if n in columns] or None
  i = 0
  batches = pf.iter_batches(batch_size=4096, columns=read)
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except (pa.ArrowException, OSError) as e:
      raise PromptSetError(f"{path}: unreadable Parquet data after row {i}: "
                           f"{_one_line(e)}") from None
    try:
      rows = batch.to_pylist()
    except UnicodeDecodeError:
      rows = None
    if rows is not None:
      for row in rows:
        yield f"{path}:row {i}", row
        i += 1
      continue
    for j in range(batch.num_rows):  # this batch has a bad string: find the rows, and the columns
      loc, one = f"{path}:row {i}", batch.slice(j, 1)
      try:
        row = one.to_pylist()[0]
      except UnicodeDecodeError as e:
        field, err = "<row>", e
        for name, col in zip(one.schema.names, one.columns):
          try:
            col.to_pylist()
          except UnicodeDecodeError as ce:
            field, err = name, ce
            break
        row = MalformedRowError(loc, field, "bad_utf8", _utf8_detail(err, "the value"))
      yield loc, row
      i += 1


def _rows(path: str, layout: Layout) -> Iterator[tuple[str, Any]]:
  """(location, parsed row or a MalformedRowError) for every row of a .jsonl or .parquet file."""
  if path.endswith(".parquet"):
    return _parquet_rows(path, layout.columns())
  if path.endswith(".jsonl"):
    return _jsonl_rows(path)
  raise PromptSetError(f"{path}: unsupported prompt-set format; expected .jsonl (JSON lines) or "
                       ".parquet")


def _check_utf8(loc: str, field: str, text: str) -> None:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise MalformedRowError(loc, field, "bad_utf8",
                            f"lone surrogate U+{ord(text[e.start]):04X} at offset {e.start} (an "
                            "unpaired \\u escape)") from None


def _example(loc: str, row: Any, layout: Layout, max_prompt_chars: int | None) -> Example:
  """Field checks that need no tokenizer (all reasons up to no_boxed_answer, and the char limit)."""
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
    if isinstance(v, float) and not math.isfinite(v):
      raise MalformedRowError(loc, field, "wrong_type", f"expected a finite number, got {v}")
    if isinstance(v, str):
      _check_utf8(loc, field, v)
    return v

  prompt = get(layout.prompt, (str,))
  if not prompt.strip():
    raise MalformedRowError(loc, layout.prompt, "empty_prompt", "prompt is empty")
  solution = get(layout.solution, (str,)) if layout.solution else ""
  if layout.code_tests:
    prompt, answer = CODE_TESTS[layout.code_tests](loc, row, layout, prompt, get)
  elif layout.answer_from_boxed:
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
  return Example(prompt=prompt, solution=solution, answer=answer.strip())


def _domain(loc: str, row: Any, field: str) -> str:
  try:
    value = _resolve(row, field)
  except _Missing:
    value = None
  if not isinstance(value, str) or not value.strip():
    raise MalformedRowError(loc, field, "no_domain",
                            f"expected a non-empty string domain, got {value!r}")
  return value.strip()


# -- code layouts: tests -> code_exec test spec ---------------------------------------------
_STDIN_INSTRUCTION = ("\n\nWrite a Python 3 program that reads the input from standard input and "
                      "prints the answer to standard output. Give the whole program in one "
                      "```python code block.")
_CALL_INSTRUCTION = ("\n\nWrite a Python 3 solution that defines `{fn}` (it is called with each "
                     "test's arguments and its return value is checked). Give the code in one "
                     "```python code block.")
_STARTER = "\n\nStart from this code:\n```python\n{code}\n```"
_MAX_PRIVATE_TESTS_BYTES = 1 << 30  # decompressed size cap of LiveCodeBench's compressed tests


def _code_prompt(problem: str, fn: str | None, starter: str = "") -> str:
  text = problem.rstrip()
  if starter.strip():
    text += _STARTER.format(code=starter.rstrip())
  if fn and re.search(r"^class Solution\b", starter, re.M):
    fn = f"Solution.{fn}"
  return text + (_CALL_INSTRUCTION.format(fn=fn) if fn else _STDIN_INSTRUCTION)


def _optional(row: dict, path: str) -> Any:
  try:
    return _resolve(row, path)
  except _Missing:
    return None


def _short(e: Exception) -> str:
  """The first clause of an error's message (json's digit-limit error runs on with advice)."""
  return str(e).split(";")[0][:120]


def _json_field(loc: str, field: str, value: Any) -> Any:
  """A field that holds JSON text or already-parsed JSON."""
  if isinstance(value, str):
    try:
      return json.loads(value)
    except json.JSONDecodeError as e:
      raise MalformedRowError(loc, field, "bad_tests",
                              f"not valid JSON: {e.msg} at column {e.pos + 1}") from None
    except ValueError as e:
      raise MalformedRowError(loc, field, "bad_tests", f"not valid JSON: {_short(e)}") from None
    except RecursionError:
      raise MalformedRowError(loc, field, "bad_tests", "JSON nested too deeply") from None
  return value


class _NoGlobals(pickle.Unpickler):
  """Unpickles plain data only: any class or function reference is refused, so loading cannot run
  code (`pickle` docs, "Restricting Globals")."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _lcb_private(loc: str, field: str, value: Any) -> Any:
  """LiveCodeBench private tests: JSON text / a list, or base64(zlib(pickle(JSON text)))."""
  if not isinstance(value, str) or value.lstrip()[:1] in ("[", "{", ""):
    return _json_field(loc, field, value)
  try:
    raw = zlib.decompressobj().decompress(base64.b64decode(value, validate=True),
                                          _MAX_PRIVATE_TESTS_BYTES)
    text = _NoGlobals(io.BytesIO(raw)).load()
  except Exception as e:  # noqa: BLE001 - unpickling untrusted bytes raises many kinds of error
    # (a REDUCE of plain data: TypeError; bad memo indices: KeyError / IndexError; ...)
    raise MalformedRowError(loc, field, "bad_tests",
                            "neither JSON nor LiveCodeBench's base64/zlib/pickle form: "
                            f"{type(e).__name__}: {e}") from None
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  if not isinstance(text, str):
    raise MalformedRowError(loc, field, "bad_tests",
                            f"compressed tests hold a {type(text).__name__}, expected JSON text")
  return _json_field(loc, field, text)


def _lines_text(loc: str, field: str, what: str, v: Any) -> str:
  if isinstance(v, list) and all(isinstance(x, str) for x in v):
    return "\n".join(v)
  if not isinstance(v, str):
    raise MalformedRowError(loc, field, "bad_tests",
                            f"{what}: stdin/stdout must be text, got {type(v).__name__}")
  return v


def _call_args(loc: str, field: str, what: str, v: Any) -> list:
  if isinstance(v, str):  # one JSON value per line (LiveCodeBench)
    try:
      return [json.loads(line) for line in v.split("\n") if line.strip()]
    except json.JSONDecodeError as e:
      raise MalformedRowError(loc, field, "bad_tests",
                              f"{what}: input line is not JSON: {e.msg}") from None
    except ValueError as e:
      raise MalformedRowError(loc, field, "bad_tests",
                              f"{what}: input line is not JSON: {_short(e)}") from None
  if not isinstance(v, list):
    raise MalformedRowError(loc, field, "bad_tests",
                            f"{what}: call arguments must be a list, got {type(v).__name__}")
  return v


def _call_expected(loc: str, field: str, what: str, v: Any) -> Any:
  if isinstance(v, str):  # one JSON value (LiveCodeBench)
    try:
      return json.loads(v)
    except json.JSONDecodeError as e:
      raise MalformedRowError(loc, field, "bad_tests",
                              f"{what}: output is not JSON: {e.msg}") from None
    except ValueError as e:
      raise MalformedRowError(loc, field, "bad_tests",
                              f"{what}: output is not JSON: {_short(e)}") from None
  if isinstance(v, list) and len(v) == 1:  # APPS / TACO store a return value as [value]
    return v[0]
  return v


def _spec(loc: str, field: str, fn: str | None, cases: list[tuple[Any, Any]]) -> str:
  """The code_exec test spec (JSON text) of (input, output) cases; checked by code_exec."""
  from opd_jax.data import code_exec
  if not cases:
    raise MalformedRowError(loc, field, "bad_tests", "no test cases")
  if fn is not None:
    if not isinstance(fn, str) or not fn.isidentifier():
      raise MalformedRowError(loc, field, "bad_tests", f"function name {fn!r} is not an identifier")
    spec = {"fn": fn, "calls": [[_call_args(loc, field, f"case {i}", a),
                                 _call_expected(loc, field, f"case {i}", b)]
                                for i, (a, b) in enumerate(cases)]}
  else:
    spec = {"io": [[_lines_text(loc, field, f"case {i}", a),
                    _lines_text(loc, field, f"case {i}", b)] for i, (a, b) in enumerate(cases)]}
  try:
    text = json.dumps(spec)
    code_exec.parse_tests(text)
  except (ValueError, TypeError) as e:
    raise MalformedRowError(loc, field, "bad_tests", str(e)) from None
  return text


def _meta_func_name(loc: str, row: dict, layout_field: str = "metadata") -> str | None:
  meta = _optional(row, layout_field)
  if meta is None:
    return None
  meta = _json_field(loc, layout_field, meta)
  if not isinstance(meta, dict):
    raise MalformedRowError(loc, layout_field, "bad_tests",
                            f"expected an object, got {type(meta).__name__}")
  name = meta.get("func_name")
  return name or None


def _case_func_name(loc: str, field: str, i: int, meta: Any) -> str | None:
  """`func_name` of a case's own metadata (an object or JSON text; DeepCoder's lcbv5 rows)."""
  if meta in (None, ""):
    return None
  meta = _json_field(loc, field, meta)
  if not isinstance(meta, dict):
    raise MalformedRowError(loc, field, "bad_tests",
                            f"case {i}: metadata must be an object, got {type(meta).__name__}")
  return meta.get("func_name") or None


def _case_list(loc: str, field: str, cases: Any, row: dict) -> tuple[str | None, list]:
  """(function name or None, [(input, output)]) of a list of {input, output, ...} cases."""
  if not isinstance(cases, list):
    raise MalformedRowError(loc, field, "bad_tests",
                            f"expected a list of test cases, got {type(cases).__name__}")
  kinds, out, fn = set(), [], None
  for i, c in enumerate(cases):
    if not isinstance(c, dict) or "input" not in c or "output" not in c:
      raise MalformedRowError(loc, field, "bad_tests",
                              f"case {i}: expected an object with 'input' and 'output'")
    call = bool(c.get("fn_name")) or c.get("type") == "function_call" or (
        c.get("testtype") == "functional")
    kinds.add(call)
    if call:
      fn = fn or c.get("fn_name") or _case_func_name(loc, field, i, c.get("metadata"))
    out.append((c["input"], c["output"]))
  if len(kinds) > 1:
    raise MalformedRowError(loc, field, "bad_tests", "mixes stdin and function-call cases")
  if kinds == {True}:
    fn = fn or _optional(row, "fn_name") or _meta_func_name(loc, row)
    if not fn:
      raise MalformedRowError(loc, field, "bad_tests",
                              "function-call cases but no function name (fn_name / "
                              "metadata.func_name)")
    return fn, out
  return None, out


def _deepcoder_tests(loc: str, row: dict, layout: Layout, prompt: str, get) -> tuple[str, str]:
  field = layout.answer
  tests = _json_field(loc, field, get(field, (str, list, dict)))
  if isinstance(tests, dict):
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
      raise MalformedRowError(loc, field, "bad_tests",
                              "expected lists 'inputs' and 'outputs' (or a list of cases)")
    if len(inputs) != len(outputs):
      raise MalformedRowError(loc, field, "bad_tests",
                              f"{len(inputs)} inputs but {len(outputs)} outputs")
    fn = tests.get("fn_name") or _optional(row, "fn_name") or None
    cases = list(zip(inputs, outputs))
  else:
    fn, cases = _case_list(loc, field, tests, row)
  return _code_prompt(prompt, fn), _spec(loc, field, fn, cases)


def _livecodebench_tests(loc: str, row: dict, layout: Layout, prompt: str, get
                         ) -> tuple[str, str]:
  field = layout.answer
  public = _json_field(loc, field, get(field, (str, list)))
  private = _optional(row, "private_test_cases")
  fn, cases = _case_list(loc, field, public, row)
  if private not in (None, "", []):
    pfn, pcases = _case_list(loc, "private_test_cases",
                             _lcb_private(loc, "private_test_cases", private), row)
    if bool(pfn) != bool(fn) and cases and pcases:
      raise MalformedRowError(loc, "private_test_cases", "bad_tests",
                              "private and public tests differ in kind (stdin vs functional)")
    fn, cases = fn or pfn, cases + pcases
  starter = _optional(row, "starter_code")
  if starter is not None and not isinstance(starter, str):
    raise MalformedRowError(loc, "starter_code", "wrong_type",
                            f"expected str, got {type(starter).__name__}")
  return _code_prompt(prompt, fn, starter or ""), _spec(loc, field, fn, cases)


CODE_TESTS = {"deepcoder": _deepcoder_tests, "livecodebench": _livecodebench_tests}


class _TokenChecks:
  """untokenizable / prompt_too_long checks, cached by exact text (prompt sets repeat prompts).

  One encode per distinct prompt in the common case: the chat-formatted prompt's ids (needed for
  max_prompt_tokens) hold no <unk> and the prompt contains no control-token spelling => tokenizable;
  otherwise `find_untokenizable` encodes the prompt alone to decide and locate."""

  def __init__(self, tokenizer, max_prompt_tokens: int | None):
    self.tok, self.max_tokens = tokenizer, max_prompt_tokens
    self._problem: dict[str, str | None] = {}
    self._length: dict[str, int] = {}
    if tokenizer is not None:
      from opd_jax.data import tokenizer as tokenizer_lib
      self._lib = tokenizer_lib
      self._controls = [t for t in tokenizer_lib.control_tokens(tokenizer).values() if t]

  def _untokenizable(self, text: str, ids: list[int] | None = None) -> str | None:
    if text not in self._problem:
      unk = self.tok.unk_token_id
      if (ids is not None and (unk is None or unk not in ids)
          and not any(t in text for t in self._controls)):
        self._problem[text] = None
      else:
        self._problem[text] = self._lib.find_untokenizable(self.tok, text)
    return self._problem[text]

  def __call__(self, loc: str, ex: Example, layout: Layout) -> None:
    if self.tok is None:
      return
    ids = None
    if self.max_tokens is not None and ex.prompt not in self._length:
      ids = self.tok.encode(self._lib.prompt_text(self.tok, ex.prompt), add_special_tokens=False)
      self._length[ex.prompt] = len(ids)
    for field, text in ((layout.prompt, ex.prompt), (layout.solution, ex.solution)):
      if field and text:
        problem = self._untokenizable(text, ids if field == layout.prompt else None)
        if problem:
          raise MalformedRowError(loc, field, "untokenizable", problem)
    n = self._length.get(ex.prompt)
    if self.max_tokens is not None and n > self.max_tokens:
      raise MalformedRowError(loc, layout.prompt, "prompt_too_long",
                              f"{n} tokens (chat template applied) > max_prompt_tokens="
                              f"{self.max_tokens}")


def load_prompt_set(path: str | os.PathLike, layout: str | Layout = "dapo_math_17k", *,
                    on_error: str = "error", max_prompt_chars: int | None = None,
                    max_prompt_tokens: int | None = None, tokenizer=None,
                    limit: int | None = None, dedup: bool = True, domain_field: str = ""
                    ) -> tuple[list[Example], LoadReport]:
  """Read a prompt set. Returns (examples in file order, report). See the module docstring.

  layout: a name in LAYOUTS or a Layout with your own field paths.
  on_error: 'error' (raise MalformedRowError at the first malformed row) or 'skip' (count it).
  tokenizer: enables the untokenizable check (prompt and the layout's solution) and
    max_prompt_tokens, which counts tokens of the chat-formatted prompt.
  limit: stop after this many kept examples (after deduplication).
  dedup: drop later rows whose normalised prompt repeats an earlier kept one.
  domain_field: a row field (dotted path) holding the prompt's domain (`Example.domain`, for
    routing prompts to teachers); a row without it, or with a non-string / empty value, is
    malformed ('no_domain').
  Raises PromptSetError (a UserError) for a bad argument, an unreadable / empty file, or a file
  with no usable row; PromptSetNotFoundError if the file does not exist.
  """
  path = os.fspath(path)
  if on_error not in ON_ERROR:
    raise PromptSetError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  if isinstance(layout, str):
    if layout not in LAYOUTS:
      raise PromptSetError(f"unknown prompt-set layout {layout!r}; valid: {sorted(LAYOUTS)}")
    layout = LAYOUTS[layout]
  if domain_field:
    layout = dataclasses.replace(layout, reads=tuple(layout.reads) + (domain_field,))
  if max_prompt_tokens is not None and tokenizer is None:
    raise PromptSetError("max_prompt_tokens needs a tokenizer")
  if limit is not None and limit < 1:
    raise PromptSetError(f"limit must be >= 1 (or None for all), got {limit}")
  if not os.path.isfile(path):
    raise PromptSetNotFoundError(f"prompt set {path!r} does not exist")
  rows = _rows(path, layout)
  if os.path.getsize(path) == 0:
    raise PromptSetError(f"{path}: prompt set is empty (0 bytes)")
  report = LoadReport(path=path, dedup=dedup)
  token_checks = _TokenChecks(tokenizer, max_prompt_tokens)
  first: dict[str, tuple[str, str]] = {}  # normalised prompt -> (location, answer) of the kept row
  keys: dict[str, str] = {}  # prompt -> normalised prompt (prompt sets repeat prompts verbatim)
  out: list[Example] = []
  for loc, row in rows:
    if limit is not None and len(out) >= limit:
      break
    report.rows += 1
    try:
      ex = _example(loc, row, layout, max_prompt_chars)
      if domain_field:
        ex = dataclasses.replace(ex, domain=_domain(loc, row, domain_field))
      key = None
      if dedup:
        key = keys.get(ex.prompt)
        if key is None:
          key = keys[ex.prompt] = normalize_prompt(ex.prompt)
      if key is not None and key in first:
        first_loc, first_answer = first[key]
        report.duplicates += 1
        if len(report.duplicate_samples) < MAX_SAMPLES:
          report.duplicate_samples.append(f"{loc}: duplicate of {first_loc}")
        if ex.answer != first_answer:
          report.conflicting_answers += 1
          if len(report.conflict_samples) < MAX_SAMPLES:
            report.conflict_samples.append(
                f"{loc}: duplicate of {first_loc}: answer {_one_line(repr(ex.answer))[:80]} != "
                f"kept {_one_line(repr(first_answer))[:80]}")
        continue
      token_checks(loc, ex, layout)
    except MalformedRowError as e:
      if on_error == "error":
        raise
      report._skip(e)
      continue
    if key is not None:
      first[key] = (loc, ex.answer)
    out.append(ex)
  report.kept = len(out)
  if report.rows == 0:
    raise PromptSetError(f"{path}: prompt set has no rows (only blank lines, or an empty table)")
  if not out:
    why = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items()))
    sample = next(iter(report.samples.values()))[0]
    raise PromptSetError(f"{path}: no usable rows: all {report.rows} skipped ({why}); first: "
                         f"{sample}")
  if report.skipped or report.duplicates:
    log.warning("%s", report.summary())
  return out, report
