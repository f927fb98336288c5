"""Prompt sets from JSONL / Parquet: layouts, malformed-row policy (error with file:line:field, skip
with counts), length limits."""

import json
import pathlib

import pyarrow.parquet as pq
import pytest

from opd_jax.data import datasets as D
from opd_jax.data.tokenizer import build_task_tokenizer
from opd_jax.errors import UserError

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
  assert report.samples["bad_json"] == [
      f"{MALFORMED}:2: field '<row>': bad_json: Expecting property name enclosed in double quotes "
      "at column 70"]
  assert [m.split(": field")[0] for m in report.samples["missing_field"]] == [
      f"{MALFORMED}:3", f"{MALFORMED}:12"]

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


# -- one bad byte costs one row; every kind of bad row is skipped, counted and located -----------
BAD_ROWS = FIX / "bad_rows_dapo.jsonl"
# (line, field, reason, detail) of every bad line of bad_rows_dapo.jsonl (see make_fixtures.py).
BAD_CASES = [
    (2, "<row>", "bad_utf8", "invalid UTF-8 byte(s) 0xff at byte 237 of the line"),
    (4, "<row>", "bad_json", "Expecting ',' delimiter at column 51"),
    (5, "reward_model.ground_truth", "missing_field", "key 'reward_model' missing or null"),
    (6, "reward_model.ground_truth", "wrong_type", "expected str or int or float, got dict"),
    (7, "prompt.0.content", "untokenizable",
     "character 'é' (U+00E9) at offset 184 is not in the tokenizer's vocabulary "
     "(encodes to <unk>)"),
    (8, "prompt.0.content", "untokenizable",
     "'<eos>' at offset 190 spells the special token '<eos>' (id 1)"),
    (9, "prompt.0.content", "bad_utf8", "lone surrogate U+D800 at offset 188"),
    (10, "prompt.0.content", "prompt_too_long", "2257 tokens (chat template applied) > "
     "max_prompt_tokens=500"),
    (11, "<row>", "bad_utf8", "invalid UTF-8 byte(s) 0xc0 at byte 391 of the line"),
    (13, "reward_model.ground_truth", "wrong_type", "expected a finite number, got nan"),
    (14, "<row>", "bad_utf8", "invalid UTF-8 byte(s) 0xe282 at byte 35 of the line (unexpected"),
]
BAD_VALID_LINES = (1, 3, 12)


@pytest.fixture(scope="module")
def task_tok():
  return build_task_tokenizer()


def _bad_lines():
  return BAD_ROWS.read_bytes().split(b"\n")


def test_skip_survives_bad_bytes_and_counts_every_reason_with_samples(task_tok):
  ex, report = D.load_prompt_set(BAD_ROWS, on_error="skip", tokenizer=task_tok,
                                 max_prompt_tokens=500)
  lines = _bad_lines()
  want = [_expected_dapo(json.loads(lines[n - 1])) for n in BAD_VALID_LINES]
  assert [(e.prompt, e.answer) for e in ex] == want
  counts = {}
  for _, _, reason, _ in BAD_CASES:
    counts[reason] = counts.get(reason, 0) + 1
  assert report.skipped == counts
  assert (report.rows, report.kept, report.num_skipped, report.duplicates) == (14, 3, 11, 0)
  for line, field, reason, detail in BAD_CASES:
    msgs = [m for m in report.samples[reason] if m.startswith(f"{BAD_ROWS}:{line}: ")]
    assert msgs == [f"{BAD_ROWS}:{line}: field {field!r}: {reason}: {msgs[0].split(': ', 3)[3]}"]
    assert detail in msgs[0] and "\n" not in msgs[0]
  m = report.to_metrics()
  assert m["data/skipped/bad_utf8"] == 4 and m["data/skipped/untokenizable"] == 2
  assert m["data/skipped/no_boxed_answer"] == 0 and m["data/skipped/total"] == 11
  assert (m["data/rows"], m["data/kept"], m["data/dedup/duplicates"]) == (14, 3, 0)
  assert set(m) == ({f"data/skipped/{r}" for r in D.REASONS} |
                    {"data/rows", "data/kept", "data/skipped/total", "data/dedup/duplicates",
                     "data/dedup/conflicting_answers"})
  assert all(k.startswith("data/eval/") for k in report.to_metrics("data/eval"))
  json.dumps(report.to_dict())  # the summary can carry it
  # Without a tokenizer the untokenizable / token-limit checks do not apply.
  ex, report = D.load_prompt_set(BAD_ROWS, on_error="skip")
  assert report.kept == 6 and "untokenizable" not in report.skipped


@pytest.mark.parametrize("line,field,reason,detail", BAD_CASES)
def test_each_bad_row_errors_in_one_line_naming_file_line_field_reason(tmp_path, task_tok, line,
                                                                      field, reason, detail):
  lines = _bad_lines()
  keep = set(BAD_VALID_LINES) | {line}
  path = tmp_path / "case.jsonl"
  path.write_bytes(b"\n".join(t if i + 1 in keep else b"" for i, t in enumerate(lines)))
  with pytest.raises(D.MalformedRowError) as e:
    D.load_prompt_set(path, tokenizer=task_tok, max_prompt_tokens=500)
  msg = str(e.value)
  assert msg.startswith(f"{path}:{line}: field {field!r}: {reason}: "), msg
  assert detail in msg and "\n" not in msg
  assert isinstance(e.value, UserError)


def test_bad_utf8_in_parquet_costs_one_row_and_names_the_column(task_tok):
  path = FIX / "bad_utf8_flat.parquet"
  layout = D.Layout(prompt="problem", answer="answer")
  ex, report = D.load_prompt_set(path, layout, on_error="skip", tokenizer=task_tok)
  assert [(e.prompt, e.answer) for e in ex] == [("What is 6 times 7?", "42"),
                                                ("What is 9 minus 4?", "5")]
  assert report.skipped == {"bad_utf8": 2} and report.duplicates == 1
  assert [m.split(": bad_utf8")[0] for m in report.samples["bad_utf8"]] == [
      f"{path}:row 1: field 'problem'", f"{path}:row 3: field 'answer'"]
  with pytest.raises(D.MalformedRowError,
                     match=r"bad_utf8_flat.parquet:row 1: field 'problem': bad_utf8: invalid UTF-8 "
                           r"byte\(s\) 0xfe at byte 7"):
    D.load_prompt_set(path, layout)
  # Only the columns the layout reads are decoded: a bad value elsewhere costs nothing.
  ex, report = D.load_prompt_set(path, D.Layout(prompt="answer", answer="answer"),
                                 on_error="skip")
  assert report.skipped == {"bad_utf8": 1} and report.kept == 3


def test_a_row_json_cannot_convert_is_skipped_and_counted(tmp_path):
  path = tmp_path / "big.jsonl"
  good = {"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
          "reward_model": {"ground_truth": "2"}}
  path.write_text(json.dumps(good) + "\n" + '{"prompt": [], "reward_model": {"ground_truth": '
                  + "1" * 5000 + "}}\n" + json.dumps(good).replace("1 + 1", "2 + 2") + "\n")
  ex, report = D.load_prompt_set(path, "dapo_math_17k", on_error="skip")
  assert len(ex) == 2 and report.skipped == {"bad_json": 1}
  assert report.samples["bad_json"][0].startswith(
      f"{path}:2: field '<row>': bad_json: Exceeds the limit (4300 digits)")


def test_bom_crlf_and_a_lone_carriage_return(tmp_path):
  rows = [json.dumps(r) for r in (
      {"q": "a\rb", "a": "1"}, {"q": "c", "a": "2"})]
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + rows[0].encode() + b"\r\n" + rows[1].encode() + b"\r\n")
  ex, _ = D.load_prompt_set(path, D.Layout(prompt="q", answer="a"))
  assert [(e.prompt, e.answer) for e in ex] == [("a\rb", "1"), ("c", "2")]
  # A raw (unescaped) \r inside a line does not split it: line numbers count \n only.
  path.write_bytes(b'{"q": "x", "a": "1"}\r{"q"\n' + rows[1].encode() + b"\n{bad\n")
  with pytest.raises(D.MalformedRowError, match=rf"^{path}:1: field '<row>': bad_json"):
    D.load_prompt_set(path, D.Layout(prompt="q", answer="a"))
  _, report = D.load_prompt_set(path, D.Layout(prompt="q", answer="a"), on_error="skip")
  assert [m.split(": field")[0] for m in report.samples["bad_json"]] == [f"{path}:1", f"{path}:3"]


def test_empty_files_and_files_without_usable_rows_raise_naming_the_file(tmp_path):
  for name, content in (("zero.jsonl", b""), ("blank.jsonl", b"\n  \n\n")):
    path = tmp_path / name
    path.write_bytes(content)
    for on_error in ("error", "skip"):
      with pytest.raises(D.PromptSetError, match=rf"^{path}: prompt set (is empty|has no rows)"):
        D.load_prompt_set(path, on_error=on_error)
  empty = tmp_path / "empty.parquet"
  pq.write_table(pq.read_table(FIX / "dapo_math_17k_sample.parquet").slice(0, 0), empty)
  with pytest.raises(D.PromptSetError, match=rf"^{empty}: prompt set has no rows"):
    D.load_prompt_set(empty)
  bad = tmp_path / "all_bad.jsonl"
  bad.write_bytes(b"{oops\n\xff\n")
  with pytest.raises(D.PromptSetError) as e:
    D.load_prompt_set(bad, on_error="skip")
  assert str(e.value) == (f"{bad}: no usable rows: all 2 skipped (bad_json: 1, bad_utf8: 1); "
                          f"first: {bad}:1: field '<row>': bad_json: Expecting property name "
                          "enclosed in double quotes at column 2")
  assert isinstance(e.value, UserError)
  junk = tmp_path / "junk.parquet"
  junk.write_bytes(b"not parquet at all")
  with pytest.raises(D.PromptSetError, match=rf"^{junk}: not a readable Parquet file: "):
    D.load_prompt_set(junk)


# -- deduplication -------------------------------------------------------------------------------
REPEATED = ("repeated_dapo.jsonl", "repeated_dapo.parquet")


@pytest.mark.parametrize("name", REPEATED)
def test_repeated_prompts_are_deduplicated_keeping_the_first(name):
  path = FIX / name
  ex, report = D.load_prompt_set(path)
  base = [json.loads(line) for line in _raw_lines(FIX / "dapo_math_17k_sample.jsonl") if line][:4]
  want = [_expected_dapo(r) for r in base]
  want.append((want[0][0].upper(), want[0][1]))  # case is preserved: not a duplicate
  assert [(e.prompt, e.answer) for e in ex] == want
  # 4 prompts x 7 repeats + a whitespace variant + a conflicting answer.
  assert (report.rows, report.kept, report.duplicates, report.conflicting_answers) == (35, 5, 30, 1)
  first = (lambda i: f"{path}:{i + 1}") if name.endswith(".jsonl") else (
      lambda i: f"{path}:row {i}")
  assert report.duplicate_samples[0] == f"{first(4)}: duplicate of {first(0)}"
  assert report.conflict_samples == [f"{first(34)}: duplicate of {first(2)}: answer '35' != "
                                     "kept '12'"]
  m = report.to_metrics()
  assert (m["data/dedup/duplicates"], m["data/dedup/conflicting_answers"]) == (30, 1)
  assert "removed 30 duplicate prompts (1 with a conflicting answer)" in report.summary()
  ex, report = D.load_prompt_set(path, dedup=False)
  assert (len(ex), report.duplicates) == (35, 0)
  ex, report = D.load_prompt_set(path, limit=3)  # limit counts unique examples
  assert [e.prompt for e in ex] == [w[0] for w in want[:3]] and report.rows == 3


def test_normalize_prompt_collapses_whitespace_and_keeps_case():
  assert D.normalize_prompt("  What  is\t2+2?\n\n Answer:\u00a0x ") == "What is 2+2? Answer: x"
  assert D.normalize_prompt("ABC") != D.normalize_prompt("abc")


def test_dedup_ignores_malformed_rows_and_tokenizes_each_distinct_prompt_once(tmp_path, task_tok,
                                                                              monkeypatch):
  layout = D.Layout(prompt="q", answer="a")
  rows = [{"q": "caf\u00e9", "a": "1"}, {"q": "caf\u00e9", "a": "1"}, {"q": "ok", "a": "2"},
          {"q": "ok", "a": 3}, {"q": "ok", "a": None}]
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  from opd_jax.data import tokenizer as T
  calls = []
  real = T.find_untokenizable
  monkeypatch.setattr(T, "find_untokenizable", lambda tok, text: calls.append(text) or real(
      tok, text))
  ex, report = D.load_prompt_set(path, layout, on_error="skip", tokenizer=task_tok)
  assert [(e.prompt, e.answer) for e in ex] == [("ok", "2")]
  assert report.skipped == {"untokenizable": 2, "missing_field": 1}
  assert (report.duplicates, report.conflicting_answers) == (1, 1)
  assert calls == ["caf\u00e9", "ok"]


# -- code layouts ---------------------------------------------------------------------------------
CODE_FILES = {"deepcoder": ("deepcoder_sample", 3), "livecodebench": ("livecodebench_sample", 4)}

# Per kept example of each code fixture (file order): (a correct program, a wrong one), as the
# model would answer (fenced). See tests/fixtures/make_code_fixtures.py.
_FENCE = "Here it is.\n```python\n{}\n```\n"
CODE_SOLUTIONS = {
    "deepcoder": [
        ("a, b = map(int, input().split())\nprint(a + b)",
         "a, b = map(int, input().split())\nprint(a - b)"),
        ("def double_all(xs):\n    return [2 * x for x in xs]",
         "def double_all(xs):\n    return xs"),
        ("input()\nprint(max(map(int, input().split())))",
         "input()\nprint(min(map(int, input().split())))"),
        ("def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)",
         "def count_vowels(s):\n    return len(s)"),
    ],
    "livecodebench": [
        ("n = int(input())\nprint(sum(i * i for i in range(1, n + 1)))",
         "n = int(input())\nprint(n * n)"),
        ("from typing import List\nclass Solution:\n"
         "    def kLargestSum(self, nums: List[int], k: int) -> int:\n"
         "        return sum(sorted(nums)[-k:])",
         "class Solution:\n    def kLargestSum(self, nums, k):\n        return max(nums)"),
        ("w = input().strip()\nprint(w, w)", "w = input().strip()\nprint(w + w)"),
    ],
}


@pytest.mark.parametrize("layout", sorted(CODE_FILES))
def test_code_layouts_read_jsonl_and_parquet_alike_and_skip_the_malformed_row(layout):
  name, bad_line = CODE_FILES[layout]
  loaded = {}
  for ext in ("jsonl", "parquet"):
    ex, report = D.load_prompt_set(FIX / f"{name}.{ext}", layout, on_error="skip")
    assert report.skipped == {"bad_tests": 1}
    assert report.kept == len(CODE_SOLUTIONS[layout])
    sample = report.samples["bad_tests"][0]
    where = f":{bad_line}:" if ext == "jsonl" else f":row {bad_line - 1}:"
    assert where in sample and "\n" not in sample
    assert report.to_metrics()["data/skipped/bad_tests"] == 1
    loaded[ext] = [(e.prompt, e.answer) for e in ex]
  assert loaded["jsonl"] == loaded["parquet"]
  for prompt, answer in loaded["jsonl"]:
    assert "```python" in prompt
    spec = json.loads(answer)
    assert ("io" in spec) != ("calls" in spec)
  with pytest.raises(D.MalformedRowError) as e:
    D.load_prompt_set(FIX / f"{name}.jsonl", layout)
  assert e.value.reason == "bad_tests" and f"{name}.jsonl:{bad_line}: field " in str(e.value)
  assert "\n" not in str(e.value)


def test_code_layouts_answers_score_correct_1_and_wrong_0_through_the_sandbox():
  from opd_jax.data import verifiers
  responses, answers, want = [], [], []
  for layout, (name, _) in sorted(CODE_FILES.items()):
    ex, _ = D.load_prompt_set(FIX / f"{name}.jsonl", layout, on_error="skip")
    for e, (good, bad) in zip(ex, CODE_SOLUTIONS[layout], strict=True):
      responses += [_FENCE.format(good), _FENCE.format(bad)]
      answers += [e.answer, e.answer]
      want += [(1.0, "pass"), (0.0, "fail")]
  with verifiers.CodeVerifier(workers=2) as v:
    got = [(r.score, r.reason) for r in v.score_many(responses, answers)]
  assert got == want


def test_functional_prompts_name_the_function_or_the_solution_method():
  ex, _ = D.load_prompt_set(FIX / "livecodebench_sample.jsonl", "livecodebench", on_error="skip")
  assert "`Solution.kLargestSum`" in ex[1].prompt and "class Solution:" in ex[1].prompt
  assert "standard input" in ex[0].prompt
  ex, _ = D.load_prompt_set(FIX / "deepcoder_sample.parquet", "deepcoder", on_error="skip")
  assert "`double_all`" in ex[1].prompt


def _lcb_compressed(obj) -> str:
  import base64
  import pickle
  import zlib
  return base64.b64encode(zlib.compress(pickle.dumps(obj))).decode()


def _lcb_raw(pickled: bytes) -> str:
  import base64
  import zlib
  return base64.b64encode(zlib.compress(pickled)).decode()


BAD_CODE_ROWS = [
    ("deepcoder", {"problem": "p", "tests": "[]"}, "tests", "no test cases"),
    ("deepcoder", {"problem": "p", "tests": json.dumps({"inputs": ["1"], "outputs": []})},
     "tests", "1 inputs but 0 outputs"),
    ("deepcoder", {"problem": "p", "tests": json.dumps({"inputs": ["1"]})}, "tests",
     "expected lists 'inputs' and 'outputs'"),
    ("deepcoder", {"problem": "p", "tests": json.dumps({"inputs": [1], "outputs": ["1"]})},
     "tests", "case 0: stdin/stdout must be text"),
    ("deepcoder", {"problem": "p", "tests": json.dumps(
        {"fn_name": "not valid", "inputs": [[1]], "outputs": [[1]]})}, "tests",
     "is not an identifier"),
    ("deepcoder", {"problem": "p", "tests": json.dumps(
        {"fn_name": "f", "inputs": [1], "outputs": [1]})}, "tests",
     "call arguments must be a list"),
    ("deepcoder", {"problem": "p", "tests": json.dumps(
        [{"input": "1", "output": "1"}, {"input": [1], "output": [1], "fn_name": "f"}])},
     "tests", "mixes stdin and function-call cases"),
    ("deepcoder", {"problem": "p", "tests": json.dumps([{"input": "1"}])}, "tests",
     "case 0: expected an object with 'input' and 'output'"),
    ("deepcoder", {"problem": "p", "tests": 7}, "tests", "expected str or list or dict"),
    ("livecodebench", {"question_content": "q", "public_test_cases": json.dumps(
        [{"input": "[1", "output": "1", "testtype": "functional"}]),
                       "metadata": json.dumps({"func_name": "f"})},
     "public_test_cases", "input line is not JSON"),
    ("livecodebench", {"question_content": "q", "public_test_cases": "[]",
                       "private_test_cases": "bm90IHpsaWI="}, "private_test_cases",
     "neither JSON nor LiveCodeBench's base64/zlib/pickle form"),
    ("livecodebench", {"question_content": "q", "public_test_cases": "[]",
                       "private_test_cases": _lcb_compressed(print)}, "private_test_cases",
     "refusing global builtins.print"),
    ("livecodebench", {"question_content": "q", "public_test_cases": json.dumps(
        [{"input": "1", "output": "1", "testtype": "stdin"}]), "metadata": "[1]"},
     "public_test_cases", None),  # a valid row: metadata is only read for functional tests
    ("deepcoder", {"problem": "p", "tests": json.dumps(  # DeepCoder's lcbv5 rows: per-case name
        [{"input": "[1, 2]", "output": "3", "testtype": "functional",
          "metadata": json.dumps({"func_name": "add"})}])}, "tests", None),
    ("deepcoder", {"problem": "p", "tests": json.dumps(
        [{"input": "1", "output": "1", "testtype": "functional", "metadata": "[]"}])},
     "tests", "case 0: metadata must be an object"),
    # Python's json refuses integers of more than 4300 digits with a plain ValueError.
    ("deepcoder", {"problem": "p", "tests": "[" + "1" * 5000 + "]"}, "tests",
     "not valid JSON: Exceeds the limit (4300 digits)"),
    ("livecodebench", {"question_content": "q", "public_test_cases": json.dumps(
        [{"input": "1" * 5000, "output": "1", "testtype": "functional"}]),
                       "metadata": json.dumps({"func_name": "f"})},
     "public_test_cases", "input line is not JSON: Exceeds the limit"),
    ("livecodebench", {"question_content": "q", "public_test_cases": "[]",  # REDUCE on an int
                       "private_test_cases": _lcb_raw(b"K\x01)R.")}, "private_test_cases",
     "neither JSON nor LiveCodeBench's base64/zlib/pickle form: TypeError"),
]


@pytest.mark.parametrize("layout,row,field,detail", BAD_CODE_ROWS)
def test_malformed_code_tests_are_one_line_errors_naming_the_field(tmp_path, layout, row, field,
                                                                   detail):
  path = tmp_path / "rows.jsonl"
  path.write_text("\n" + json.dumps(row) + "\n")
  if detail is None:
    ex, _ = D.load_prompt_set(path, layout)
    spec = json.loads(ex[0].answer)
    assert spec in ({"io": [["1", "1"]]}, {"fn": "add", "calls": [[[[1, 2]], 3]]}), spec
    return
  with pytest.raises(D.MalformedRowError) as e:
    D.load_prompt_set(path, layout)
  msg = str(e.value)
  assert e.value.reason == "bad_tests" or detail.startswith("expected str")
  assert "\n" not in msg and msg.startswith(f"{path}:2: field {field!r}: ")
  assert detail in msg, msg
