"""Prompt sets from JSONL / Parquet: layouts, malformed-row policy (error with file:line:field, skip
with counts), length limits."""

import json
import pathlib

import pyarrow.parquet as pq
import pytest

from opd_jax.data import datasets as D
from opd_jax.data.tokenizer import build_task_tokenizer

FIX = pathlib.Path(__file__).resolve().parent / "fixtures"
MALFORMED = FIX / "malformed_dapo.jsonl"
MAX_CHARS = 1000  # fixture prompts are ~300 characters; the long ones ~2250

# (line, field, reason) of every malformed line of malformed_dapo.jsonl (see make_fixtures.py).
JSONL_CASES = [
    (2, "<row>", "bad_json"),
    (3, "reward_model.ground_truth", "missing_field"),
    (4, "prompt.0.content", "wrong_type"),
    (5, "prompt.0.content", "empty_prompt"),
    (6, "prompt.0.content", "prompt_too_long"),
    (9, "<row>", "not_an_object"),
    (10, "reward_model.ground_truth", "empty_answer"),
    (12, "prompt.0.content", "missing_field"),
    (13, "reward_model.ground_truth", "wrong_type"),
]
JSONL_VALID_LINES = (1, 7, 11)
PARQUET_CASES = [
    (1, "reward_model.ground_truth", "missing_field"),
    (2, "prompt.0.content", "missing_field"),
    (3, "prompt.0.content", "empty_prompt"),
    (4, "prompt.0.content", "prompt_too_long"),
]
PARQUET_VALID_ROWS = (0, 5)


def _raw_lines(path):
  return path.read_text(encoding="utf-8").split("\n")


def _expected_dapo(row):
  return row["prompt"][0]["content"], str(row["reward_model"]["ground_truth"])


def test_dapo_jsonl_and_parquet_read_the_same_rows():
  rows = [json.loads(line) for line in _raw_lines(FIX / "dapo_math_17k_sample.jsonl") if line]
  for name in ("dapo_math_17k_sample.jsonl", "dapo_math_17k_sample.parquet"):
    ex, report = D.load_prompt_set(FIX / name, "dapo_math_17k")
    assert [(e.prompt, e.answer) for e in ex] == [_expected_dapo(r) for r in rows]
    assert all(e.solution == "" for e in ex)
    assert (report.rows, report.kept, report.skipped) == (5, 5, {})
  ex, _ = D.load_prompt_set(FIX / "dapo_math_17k_sample.jsonl", limit=2)
  assert len(ex) == 2


def test_math_layout_extracts_the_last_boxed_answer():
  ex, report = D.load_prompt_set(FIX / "math_sample.jsonl", "math")
  assert [e.answer for e in ex] == ["\\frac{1}{2}", "x^2+2x+1", "7", "\\{-2, 2\\}"]
  rows = [json.loads(line) for line in _raw_lines(FIX / "math_sample.jsonl") if line]
  assert [(e.prompt, e.solution) for e in ex] == [(r["problem"], r["solution"]) for r in rows]
  assert report.kept == 4


def test_last_boxed():
  assert D.last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c") == "\\frac{a}{b^{2}}"
  assert D.last_boxed("\\fbox{x}") == "x"
  assert D.last_boxed("\\boxed {3}") == "3"
  assert D.last_boxed("\\boxed{1} then \\boxed{unclosed") == "1"
  assert D.last_boxed("none") is None


@pytest.mark.parametrize("line,field,reason", JSONL_CASES)
def test_each_malformed_jsonl_case_errors_with_file_line_and_field(tmp_path, line, field, reason):
  # Keep the valid lines and the case under test; blank the other malformed lines (blank lines are
  # not rows), so line numbers are preserved and error mode stops exactly at the case.
  lines = _raw_lines(MALFORMED)
  keep = set(JSONL_VALID_LINES) | {line}
  path = tmp_path / "case.jsonl"
  path.write_text("\n".join(t if i + 1 in keep else "" for i, t in enumerate(lines)))
  with pytest.raises(D.MalformedRowError) as e:
    D.load_prompt_set(path, "dapo_math_17k", max_prompt_chars=MAX_CHARS)
  msg = str(e.value)
  assert msg.startswith(f"{path}:{line}: field {field!r}: {reason}:"), msg
  assert (e.value.field, e.value.reason) == (field, reason)


@pytest.mark.parametrize("row,field,reason", PARQUET_CASES)
def test_each_malformed_parquet_case_errors_with_file_row_and_field(tmp_path, row, field, reason):
  table = pq.read_table(FIX / "malformed_dapo.parquet")
  path = tmp_path / "case.parquet"
  pq.write_table(table.take([0, row, 5]), path)  # the case becomes row 1
  with pytest.raises(D.MalformedRowError) as e:
    D.load_prompt_set(path, "dapo_math_17k", max_prompt_chars=MAX_CHARS)
  assert str(e.value).startswith(f"{path}:row 1: field {field!r}: {reason}:"), str(e.value)


def test_error_mode_is_the_default_and_stops_at_the_first_bad_row():
  with pytest.raises(D.MalformedRowError, match=rf"^{MALFORMED}:2: field '<row>': bad_json"):
    D.load_prompt_set(MALFORMED)


def test_skip_mode_counts_reasons_and_keeps_every_valid_row():
  ex, report = D.load_prompt_set(MALFORMED, "dapo_math_17k", on_error="skip",
                                 max_prompt_chars=MAX_CHARS)
  lines = _raw_lines(MALFORMED)
  expected = [_expected_dapo(json.loads(lines[n - 1])) for n in JSONL_VALID_LINES]
  assert [(e.prompt, e.answer) for e in ex] == expected
  want = {}
  for _, _, reason in JSONL_CASES:
    want[reason] = want.get(reason, 0) + 1
  assert report.skipped == want
  assert (report.rows, report.kept, report.num_skipped) == (12, 3, 9)  # the blank line is no row
  assert "skipped 9" in report.summary() and "bad_json: 1" in report.summary()
  assert report.examples[0].startswith(f"{MALFORMED}:2:")

  ex, report = D.load_prompt_set(FIX / "malformed_dapo.parquet", on_error="skip",
                                 max_prompt_chars=MAX_CHARS)
  table = pq.read_table(FIX / "malformed_dapo.parquet").to_pylist()
  want = [_expected_dapo(table[r]) for r in PARQUET_VALID_ROWS]
  assert [(e.prompt, e.answer) for e in ex] == want
  assert report.skipped == {"missing_field": 2, "empty_prompt": 1, "prompt_too_long": 1}

  ex, report = D.load_prompt_set(FIX / "malformed_math.jsonl", "math", on_error="skip")
  assert [e.answer for e in ex] == ["\\frac{1}{2}", "x^2+2x+1"]
  assert report.skipped == {"no_boxed_answer": 1, "missing_field": 1}


def test_math_layout_errors_name_the_solution_field():
  with pytest.raises(D.MalformedRowError,
                     match=r"malformed_math.jsonl:2: field 'solution': no_boxed_answer"):
    D.load_prompt_set(FIX / "malformed_math.jsonl", "math")


def test_prompt_length_limit_in_tokens_says_tokens(tmp_path):
  tok = build_task_tokenizer()
  lines = _raw_lines(MALFORMED)
  path = tmp_path / "long.jsonl"
  path.write_text(lines[0] + "\n" + lines[5] + "\n")
  with pytest.raises(D.MalformedRowError) as e:
    D.load_prompt_set(path, max_prompt_tokens=500, tokenizer=tok)
  n_tokens = len(json.loads(lines[5])["prompt"][0]["content"]) + 3  # char-level + 3 chat specials
  assert str(e.value).startswith(
      f"{path}:2: field 'prompt.0.content': prompt_too_long: "
      f"{n_tokens} tokens (chat template applied) > max_prompt_tokens=500")
  with pytest.raises(D.MalformedRowError, match="characters > max_prompt_chars=1000"):
    D.load_prompt_set(path, max_prompt_chars=1000)
  ex, _ = D.load_prompt_set(path, max_prompt_tokens=n_tokens, tokenizer=tok)
  assert len(ex) == 2


def test_custom_layout_and_bad_arguments(tmp_path):
  layout = D.Layout(prompt="q.text", answer="a")
  path = tmp_path / "custom.jsonl"
  path.write_text(json.dumps({"q": {"text": "2+2?"}, "a": 4.0}) + "\n" +
                  json.dumps({"q": {"text": "3+3?"}, "a": True}) + "\n")
  with pytest.raises(D.MalformedRowError, match=r"custom.jsonl:2: field 'a': wrong_type: "
                                                r"expected str or int or float, got bool"):
    D.load_prompt_set(path, layout)
  ex, _ = D.load_prompt_set(path, layout, on_error="skip")
  assert [(e.prompt, e.answer) for e in ex] == [("2+2?", "4.0")]
  # Parquet columns are typed: a path onto a struct is a wrong type.
  with pytest.raises(D.MalformedRowError, match=r"row 0: field 'extra_info': wrong_type"):
    D.load_prompt_set(FIX / "dapo_math_17k_sample.parquet",
                      D.Layout(prompt="prompt.0.content", answer="extra_info"))
  with pytest.raises(ValueError, match="unknown prompt-set layout"):
    D.load_prompt_set(path, "gsm8k")
  with pytest.raises(ValueError, match="on_error"):
    D.load_prompt_set(path, layout, on_error="ignore")
  with pytest.raises(ValueError, match="unsupported prompt-set format"):
    (tmp_path / "x.csv").write_text("a\n")
    D.load_prompt_set(tmp_path / "x.csv")
  with pytest.raises(FileNotFoundError):
    D.load_prompt_set(tmp_path / "absent.jsonl")
  with pytest.raises(ValueError, match="needs a tokenizer"):
    D.load_prompt_set(path, layout, max_prompt_tokens=10)
