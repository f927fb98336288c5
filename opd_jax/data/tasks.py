"""Synthetic verifiable tasks: the embedded default data of opd_jax (nothing is downloaded).

Three families, each a short multi-step trace ending in a final answer written as `=<integer>`:

  addition     prompt "347+85="        solution "12 13 04 =432"
               one two-digit group per column, units first: (carry out, digit) of
               a_i + b_i + carry_in; the answer reads the digits back, most significant first.
  running_sum  prompt "7 2 9 4:"       solution "7 9 18 22 =22"
               the prefix sums of the list; the answer is the total.
  mod_chain    prompt "7+5*3-4%10:"    solution "2 6 2 =2"
               start from the first number and apply each operation modulo m, left to right
               (no operator precedence); the trace is the value after each operation.

Every step of a trace depends only on the prompt and the previous step, so a small decoder can learn
it; the final answer is `parse_final_answer(solution)` (the integer after the last '=' at the end).

A fourth family, `code`, is not in the default mixture; select it with
`TaskConfig(families=("code",))` (alone, or mixed with the others):

  code         prompt "f(x) = 3 times x plus 7"     solution "def f(x):\n  return 3*x+7"
               a small Python function from a one-line description (`CODE_TEMPLATES`, knobs in
               `CodeTaskConfig`); the answer is a JSON call-test spec `{"fn": "f", "calls": [[args,
               expected], ...]}` (`code_exec.parse_tests`), checked by running the response in the
               sandbox (`verifiers.CodeVerifier`; `verifiers.TaskVerifier` for mixtures). The test
               inputs are drawn from a hash of the prompt, so a prompt still fully determines its
               problem; expected values are computed here by trusted reference functions.

Determinism: `generate(cfg, split, n, seed=s)` draws from `numpy.random.default_rng([s, split])`, so
the same arguments give the same examples on every machine.

Train/eval split BY CONSTRUCTION: a problem is fully determined by its prompt, and a prompt belongs
to 'eval' iff a keyed hash of it falls below `eval_fraction` (`split_of`). The generator samples
problems and keeps only those of the requested split, so the two splits are disjoint sets of
problems for any seeds and sizes. Changing `split_salt` draws a different partition.

Difficulty presets (`preset('easy' | 'default' | 'hard')`). Intent (not yet calibrated by training):
a trained `tiny`-sized teacher (e.g. 4 layers, d=128) reaches >= 0.9 on `default`, and a smaller or
less-trained base student is partial (0.1-0.7), so the verifier reward is neither always 0 nor 1.
All knobs are config fields so the study can tune them. `default` keeps prompt + solution under ~40
characters (the char-level task tokenizer gives one token per character plus a few specials):

  easy     addition 1-2 digits; running sums of 3-4 digits; mod chains of 2-3 ops mod 7
  default  addition 2-3 digits; running sums of 3-5 digits; mod chains of 2-4 ops mod 10
  hard     addition 3-5 digits; running sums of 5-8 digits; mod chains of 4-7 ops mod 13
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Callable

import numpy as np

SPLITS = ("train", "eval")

# The final answer: '=' then an optionally signed integer at the very end of the response.
FINAL_ANSWER_RE = re.compile(r"=(-?\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Example:
  """One task instance. `solution` is the full worked response (the SFT demonstration), ending with
  the final answer; `answer` is the ground truth the verifier compares against; `domain` names
  where the prompt comes from (the task family of generated tasks; a row field of a prompt file
  when asked for), which routes it to a teacher in multi-teacher runs."""

  prompt: str
  solution: str
  answer: str
  domain: str = ""


@dataclasses.dataclass(frozen=True)
class AdditionConfig:
  """Sum of two non-negative integers, each with a digit count in [min_digits, max_digits]."""

  min_digits: int = 2
  max_digits: int = 3

  def __post_init__(self):
    if not 1 <= self.min_digits <= self.max_digits:
      raise ValueError(f"AdditionConfig: need 1 <= min_digits <= max_digits, got {self}")


@dataclasses.dataclass(frozen=True)
class RunningSumConfig:
  """Prefix sums of a list of [min_terms, max_terms] integers in [0, max_value]."""

  min_terms: int = 3
  max_terms: int = 5
  max_value: int = 9

  def __post_init__(self):
    if not 2 <= self.min_terms <= self.max_terms:
      raise ValueError(f"RunningSumConfig: need 2 <= min_terms <= max_terms, got {self}")
    if self.max_value < 1:
      raise ValueError(f"RunningSumConfig.max_value must be >= 1, got {self.max_value}")


@dataclasses.dataclass(frozen=True)
class ModChainConfig:
  """A start value and [min_ops, max_ops] operations (drawn from `ops`) with operands in [0, m)."""

  min_ops: int = 2
  max_ops: int = 4
  modulus: int = 10
  ops: str = "+-*"

  def __post_init__(self):
    if not 1 <= self.min_ops <= self.max_ops:
      raise ValueError(f"ModChainConfig: need 1 <= min_ops <= max_ops, got {self}")
    if self.modulus < 2:
      raise ValueError(f"ModChainConfig.modulus must be >= 2, got {self.modulus}")
    if not self.ops or set(self.ops) - set("+-*"):
      raise ValueError(f"ModChainConfig.ops must be a non-empty subset of '+-*', got {self.ops!r}")


CODE_TEMPLATE_NAMES = ("affine", "clip", "repeat", "count_div", "sum_above", "max_plus")


@dataclasses.dataclass(frozen=True)
class CodeTaskConfig:
  """Small Python functions (family 'code'): templates drawn uniformly from `templates`, integer
  parameters in [1, max_param] (clip bounds in [-max_param, max_param]), `n_tests` call tests each.
  With max_param=50 the six templates hold ~6.5k distinct problems (affine 2500, clip 3825, the
  one-parameter ones 50 each), enough for 4096 unique training prompts."""

  templates: tuple[str, ...] = CODE_TEMPLATE_NAMES
  max_param: int = 50
  n_tests: int = 5

  def __post_init__(self):
    if not self.templates:
      raise ValueError("CodeTaskConfig.templates is empty")
    for t in self.templates:
      if t not in CODE_TEMPLATE_NAMES:
        raise ValueError(f"CodeTaskConfig.templates: unknown template {t!r}; "
                         f"valid: {sorted(CODE_TEMPLATE_NAMES)}")
    if self.max_param < 2:
      raise ValueError(f"CodeTaskConfig.max_param must be >= 2, got {self.max_param}")
    if not 1 <= self.n_tests <= 50:
      raise ValueError(f"CodeTaskConfig.n_tests must be in [1, 50], got {self.n_tests}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The task mixture. Each example picks a family uniformly from `families`."""

  families: tuple[str, ...] = ("addition", "running_sum", "mod_chain")
  addition: AdditionConfig = AdditionConfig()
  running_sum: RunningSumConfig = RunningSumConfig()
  mod_chain: ModChainConfig = ModChainConfig()
  eval_fraction: float = 0.1
  split_salt: str = "opd_jax"
  code: CodeTaskConfig = CodeTaskConfig()

  def __post_init__(self):
    if not self.families:
      raise ValueError("TaskConfig.families is empty")
    for f in self.families:
      if f not in FAMILIES:
        raise ValueError(f"TaskConfig.families: unknown family {f!r}; valid: {sorted(FAMILIES)}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"TaskConfig.eval_fraction must be in (0, 1), got {self.eval_fraction}")

  def replace(self, **kw) -> "TaskConfig":
    return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Families: sample(rng, cfg) -> Example; lengths(cfg) -> (max prompt chars, max solution chars)


def _draw_number(rng: np.random.Generator, digits: int) -> int:
  lo = 0 if digits == 1 else 10 ** (digits - 1)
  return int(rng.integers(lo, 10**digits))


def render_addition(a: int, b: int) -> Example:
  da, db = str(a)[::-1], str(b)[::-1]
  groups, carry = [], 0
  for i in range(max(len(da), len(db))):
    s = (int(da[i]) if i < len(da) else 0) + (int(db[i]) if i < len(db) else 0) + carry
    carry, d = divmod(s, 10)
    groups.append(f"{carry}{d}")
  answer = str(a + b)
  return Example(prompt=f"{a}+{b}=", solution=" ".join(groups) + f" ={answer}", answer=answer)


def _sample_addition(rng, cfg: TaskConfig) -> Example:
  c = cfg.addition
  a = _draw_number(rng, int(rng.integers(c.min_digits, c.max_digits + 1)))
  b = _draw_number(rng, int(rng.integers(c.min_digits, c.max_digits + 1)))
  return render_addition(a, b)


def _addition_lengths(cfg: TaskConfig) -> tuple[int, int]:
  n = cfg.addition.max_digits
  return 2 * n + 2, 3 * n + n + 2  # "a+b=" ; n groups "cd " + "=" + up to n+1 digits


def render_running_sum(values: list[int]) -> Example:
  sums = np.cumsum(values).tolist()
  answer = str(sums[-1])
  return Example(prompt=" ".join(map(str, values)) + ":",
                 solution=" ".join(map(str, sums)) + f" ={answer}", answer=answer)


def _sample_running_sum(rng, cfg: TaskConfig) -> Example:
  c = cfg.running_sum
  n = int(rng.integers(c.min_terms, c.max_terms + 1))
  return render_running_sum([int(v) for v in rng.integers(0, c.max_value + 1, size=n)])


def _running_sum_lengths(cfg: TaskConfig) -> tuple[int, int]:
  c = cfg.running_sum
  prompt = c.max_terms * (len(str(c.max_value)) + 1)
  trace = sum(len(str(c.max_value * (i + 1))) + 1 for i in range(c.max_terms))
  return prompt, trace + 1 + len(str(c.max_value * c.max_terms))


def render_mod_chain(start: int, steps: list[tuple[str, int]], modulus: int) -> Example:
  x, trace = start, []
  for op, v in steps:
    x = {"+": x + v, "-": x - v, "*": x * v}[op] % modulus
    trace.append(str(x))
  answer = str(x)
  prompt = f"{start}" + "".join(f"{op}{v}" for op, v in steps) + f"%{modulus}:"
  return Example(prompt=prompt, solution=" ".join(trace) + f" ={answer}", answer=answer)


def _sample_mod_chain(rng, cfg: TaskConfig) -> Example:
  c = cfg.mod_chain
  n = int(rng.integers(c.min_ops, c.max_ops + 1))
  start = int(rng.integers(0, c.modulus))
  steps = [(c.ops[int(rng.integers(0, len(c.ops)))], int(rng.integers(0, c.modulus)))
           for _ in range(n)]
  return render_mod_chain(start, steps, c.modulus)


def _mod_chain_lengths(cfg: TaskConfig) -> tuple[int, int]:
  c = cfg.mod_chain
  w = len(str(c.modulus - 1))
  return w + c.max_ops * (1 + w) + len(str(c.modulus)) + 2, c.max_ops * (w + 1) + 1 + w


# -- code: (prompt, solution, reference function, argument kind) per template, from params p --------
# Argument kinds: 'int' (x in [-20, 20]), 'list' (0-6 ints in [0, 20]), 'str' (0-3 chars of 'abc').
# Lists are never empty where the function needs an item (max_plus draws 1-6).
def _tpl_affine(p):
  a, b = p["a"], p["b"]
  return (f"f(x) = {a} times x plus {b}", f"def f(x):\n  return {a}*x+{b}",
          lambda x: a * x + b, "int")


def _tpl_clip(p):
  lo, hi = p["lo"], p["hi"]
  return (f"f(x) = x clipped to [{lo}, {hi}]", f"def f(x):\n  return min(max(x,{lo}),{hi})",
          lambda x: min(max(x, lo), hi), "int")


def _tpl_repeat(p):
  k = p["k"]
  return f"f(s) = s repeated {k} times", f"def f(s):\n  return s*{k}", lambda s: s * k, "str"


def _tpl_count_div(p):
  k = p["k"]
  return (f"f(xs) = count of items of xs divisible by {k}",
          f"def f(xs):\n  return sum(1 for v in xs if v%{k}==0)",
          lambda xs: sum(1 for v in xs if v % k == 0), "list")


def _tpl_sum_above(p):
  k = p["k"]
  return (f"f(xs) = sum of items of xs above {k}", f"def f(xs):\n  return sum(v for v in xs if v>{k})",
          lambda xs: sum(v for v in xs if v > k), "list")


def _tpl_max_plus(p):
  k = p["k"]
  return (f"f(xs) = largest item of xs plus {k}", f"def f(xs):\n  return max(xs)+{k}",
          lambda xs: max(xs) + k, "list1")


CODE_TEMPLATES: dict[str, Callable[[dict], tuple]] = {
    "affine": _tpl_affine, "clip": _tpl_clip, "repeat": _tpl_repeat, "count_div": _tpl_count_div,
    "sum_above": _tpl_sum_above, "max_plus": _tpl_max_plus,
}
assert tuple(CODE_TEMPLATES) == CODE_TEMPLATE_NAMES
_TEMPLATE_PARAMS = {"affine": ("a", "b"), "clip": ("lo", "hi"), "repeat": ("k",),
                    "count_div": ("k",), "sum_above": ("k",), "max_plus": ("k",)}


def _code_params(rng: np.random.Generator, m: int) -> dict:
  lo = int(rng.integers(-m, 1))
  return {"a": int(rng.integers(1, m + 1)), "b": int(rng.integers(1, m + 1)),
          "k": int(rng.integers(1, m + 1)), "lo": lo, "hi": int(rng.integers(lo + 1, m + 1))}


def _code_arg(rng: np.random.Generator, kind: str):
  if kind == "int":
    return int(rng.integers(-20, 21))
  if kind == "str":
    return "".join("abc"[int(i)] for i in rng.integers(0, 3, size=int(rng.integers(0, 4))))
  n = int(rng.integers(1 if kind == "list1" else 0, 7))
  return [int(v) for v in rng.integers(0, 21, size=n)]


def render_code(template: str, params: dict, n_tests: int = 5) -> Example:
  """The code example of a template and its parameters; tests drawn from a hash of the prompt."""
  used = _TEMPLATE_PARAMS[template]
  return _render_code(template, tuple((k, params[k]) for k in used), n_tests)


@functools.lru_cache(maxsize=1 << 16)  # rejected duplicates of `generate` are re-rendered often
def _render_code(template: str, params: tuple, n_tests: int) -> Example:
  prompt, solution, ref, kind = CODE_TEMPLATES[template](dict(params))
  seed = int.from_bytes(hashlib.blake2b(f"code\x00{prompt}".encode(), digest_size=8).digest(), "big")
  rng = np.random.default_rng(seed)
  calls = []
  for _ in range(n_tests):
    arg = _code_arg(rng, kind)
    calls.append([[arg], ref(arg)])
  answer = json.dumps({"fn": "f", "calls": calls}, separators=(",", ":"))
  return Example(prompt=prompt, solution=solution, answer=answer)


def _sample_code(rng, cfg: TaskConfig) -> Example:
  c = cfg.code
  template = c.templates[int(rng.integers(0, len(c.templates)))]
  return render_code(template, _code_params(rng, c.max_param), c.n_tests)


def _code_lengths(cfg: TaskConfig) -> tuple[int, int]:
  m = cfg.code.max_param  # widest parameters: the longest prompt and solution of each template
  widest = {"a": m, "b": m, "k": m, "lo": -m, "hi": m}
  lens = [CODE_TEMPLATES[t](widest)[:2] for t in cfg.code.templates]
  return max(len(p) for p, _ in lens), max(len(s) for _, s in lens)


def is_code_answer(answer: str) -> bool:
  """Whether an answer is a code test spec (JSON object) rather than an integer."""
  return str(answer).lstrip().startswith("{")


_Family = tuple[Callable[[np.random.Generator, TaskConfig], Example],
                Callable[[TaskConfig], tuple[int, int]]]
FAMILIES: dict[str, _Family] = {
    "addition": (_sample_addition, _addition_lengths),
    "running_sum": (_sample_running_sum, _running_sum_lengths),
    "mod_chain": (_sample_mod_chain, _mod_chain_lengths),
    "code": (_sample_code, _code_lengths),
}

PRESETS: dict[str, TaskConfig] = {
    "easy": TaskConfig(addition=AdditionConfig(1, 2), running_sum=RunningSumConfig(3, 4),
                       mod_chain=ModChainConfig(2, 3, modulus=7)),
    "default": TaskConfig(),
    "hard": TaskConfig(addition=AdditionConfig(3, 5), running_sum=RunningSumConfig(5, 8),
                       mod_chain=ModChainConfig(4, 7, modulus=13)),
}


def preset(name: str, **overrides) -> TaskConfig:
  """A difficulty preset ('easy', 'default', 'hard'), optionally with TaskConfig fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"unknown task preset {name!r}; valid presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------------------------


def split_of(prompt: str, cfg: TaskConfig) -> str:
  """'eval' iff the salted hash of the (canonical) prompt falls below `cfg.eval_fraction`."""
  digest = hashlib.blake2b(f"{cfg.split_salt}\x00{prompt}".encode(), digest_size=8).digest()
  u = int.from_bytes(digest, "big") / 2.0**64
  return "eval" if u < cfg.eval_fraction else "train"


def max_lengths(cfg: TaskConfig) -> tuple[int, int]:
  """Upper bounds (characters) of (prompt, solution) over every problem `cfg` can generate.

  Use them to choose bucket lengths and `max_new_tokens` (with the char-level task tokenizer, add
  the chat-template specials and EOS)."""
  bounds = [FAMILIES[f][1](cfg) for f in cfg.families]
  return max(p for p, _ in bounds), max(s for _, s in bounds)


def generate(cfg: TaskConfig, split: str, n: int, *, seed: int = 0, unique: bool = True,
             max_attempts: int | None = None) -> list[Example]:
  """`n` examples of `split` ('train' or 'eval'), deterministic in (cfg, split, n, seed).

  unique: no prompt appears twice (raises if the problem space of the split is too small).
  max_attempts: bound on problems drawn (default 100 * n + 10_000) before giving up with an error.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  samplers = [FAMILIES[f][0] for f in cfg.families]
  limit = 100 * n + 10_000 if max_attempts is None else max_attempts
  out: list[Example] = []
  seen: set[str] = set()
  attempts = 0
  while len(out) < n:
    if attempts >= limit:
      raise ValueError(
          f"generate: found only {len(out)} of {n} {'unique ' if unique else ''}{split} examples "
          f"in {limit} draws; the problem space of {cfg} is too small for this request "
          f"(raise difficulty, lower n, or pass unique=False)")
    attempts += 1
    family = int(rng.integers(0, len(samplers)))
    ex = dataclasses.replace(samplers[family](rng, cfg), domain=cfg.families[family])
    if split_of(ex.prompt, cfg) != split or (unique and ex.prompt in seen):
      continue
    seen.add(ex.prompt)
    out.append(ex)
  return out


def parse_final_answer(response: str) -> str | None:
  """The integer after the final '=' of a response (None if the response does not end that way)."""
  m = FINAL_ANSWER_RE.search(response)
  return m.group(1) if m else None
