"""Typed run configuration, and the strict bridge from ml_collections config files to it.

Config files (`configs/sft.py`, `configs/opd.py`, `configs/rlvr.py`) hold a `get_config(arg)` that
returns a LOCKED `ml_collections.ConfigDict` whose tree mirrors `TrainConfig` field by field (they
start from `default_config()`, i.e. every field with its dataclass default, and set what differs).
`from_config_dict` turns it into frozen dataclasses at the boundary; nothing below the boundary
reads a ConfigDict. Strictness: an unknown key anywhere is an error naming its dotted path (with a
suggestion), a value of the wrong type is an error naming the field, and each dataclass's own
validation runs with the dotted path prefixed to its message.

`load_config("configs/opd.py:tiny", ["loop.steps=10", ...])` loads a config file and applies
`--config.x=y` style overrides with the same strictness (the CLI uses it).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import pathlib
import re
import sys
import types
import typing
from typing import Any, Mapping, Sequence

import ml_collections

from opd_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A bad config: unknown key, wrong type, invalid value. The message names the dotted key."""


# -- dataclass <-> nested dict ---------------------------------------------------------------------
def _suggest(key: str, valid: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, list(valid), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(value: Any) -> Any:
  """ConfigDicts / FrozenConfigDicts -> dicts, lists -> tuples (recursively)."""
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _convert(tp: Any, value: Any, path: str) -> Any:
  """Checks / converts one value to the annotated type `tp`."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return _plain(value)
  if dataclasses.is_dataclass(tp):
    return dataclass_from_dict(tp, value, path)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _convert(arg, value, path)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0] if len(errors) == 1 else
                      f"{path}: {value!r} matches none of {tp}")
  if origin is tuple or tp is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path}: expected a tuple, got {type(value).__name__} {value!r}")
    args = typing.get_args(tp)
    if not args:
      return _plain(value)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{path}: expected {len(args)} entries, got {len(value)}: {value!r}")
    return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  if origin in (dict, Mapping) or tp in (dict, Mapping):
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"{path}: expected a dict, got {type(value).__name__} {value!r}")
    return _plain(value)
  if origin is typing.Literal:
    if value not in typing.get_args(tp):
      raise ConfigError(f"{path}: {value!r} is not one of {typing.get_args(tp)}")
    return value
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{path}: expected a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
      raise ConfigError(f"{path}: {value!r} is not a finite number")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path}: expected an int, got {type(value).__name__} {value!r}")
    return value
  if tp in (bool, str):
    if not isinstance(value, tp):
      raise ConfigError(f"{path}: expected a {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
  return _plain(value)  # anything else (e.g. a type alias the hints resolve to `object`)


def config_fields(cls: type) -> list[str]:
  """The config keys of a dataclass: its init fields, less those marked
  `metadata={'derived': 'other.key'}` (filled from another key when the run is resolved, so each
  knob has exactly one copy in the config)."""
  return [f.name for f in dataclasses.fields(cls) if f.init and "derived" not in f.metadata]


def dataclass_from_dict(cls: type, value: Any, path: str = "config") -> Any:
  """Builds the frozen dataclass `cls` from a (nested) dict or ConfigDict, strictly.

  Missing keys take the dataclass defaults; unknown keys, wrong types and the dataclass's own
  validation errors raise `ConfigError` naming the dotted key.
  """
  if isinstance(value, cls):
    return value
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    value = value.to_dict()
  if not isinstance(value, Mapping):
    raise ConfigError(f"{path}: expected a section for {cls.__name__}, got "
                      f"{type(value).__name__} {value!r}")
  hints = typing.get_type_hints(cls)
  fields = config_fields(cls)
  for key in value:
    if key not in fields:
      raise ConfigError(f"unknown config key '{path}.{key}'{_suggest(key, fields)}; valid keys "
                        f"of {path} ({cls.__name__}): {fields}")
  kwargs = {k: _convert(hints[k], v, f"{path}.{k}") for k, v in value.items()}
  try:
    return cls(**kwargs)
  except (ValueError, TypeError) as e:
    if isinstance(e, ConfigError) and str(e).startswith(("config.", "method=")):
      raise  # already names its dotted key
    raise ConfigError(f"{path}: {e}") from e  # e.g. 'config.teacher: ModelSpec.path=...'



def dataclass_to_dict(obj: Any) -> Any:
  """A dataclass tree as nested dicts (tuples stay tuples), for ConfigDicts and JSON."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {name: dataclass_to_dict(getattr(obj, name)) for name in config_fields(type(obj))}
  if isinstance(obj, Mapping):
    return {k: dataclass_to_dict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return tuple(dataclass_to_dict(v) for v in obj)
  return obj


# -- config files and overrides --------------------------------------------------------------------
def _import_config_file(path: pathlib.Path) -> types.ModuleType:
  """Imports a config file as `configs.<stem>` with `configs` bound to its directory, so config
  files can `from configs import models` however they are invoked."""
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} does not exist")
  pkg_name = "configs"
  saved = {k: v for k, v in sys.modules.items() if k == pkg_name or k.startswith(pkg_name + ".")}
  for k in saved:
    del sys.modules[k]
  pkg = types.ModuleType(pkg_name)
  pkg.__path__ = [str(path.parent)]
  sys.modules[pkg_name] = pkg
  try:
    spec = importlib.util.spec_from_file_location(f"{pkg_name}.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
  finally:
    for k in [k for k in sys.modules if k == pkg_name or k.startswith(pkg_name + ".")]:
      del sys.modules[k]
    sys.modules.update(saved)


def _parse_value(raw: str, current: Any, key: str) -> Any:
  """Parses an override string by the type of the value it replaces."""
  def fail(expected):
    raise ConfigError(f"--config.{key}={raw}: expected {expected} (current value {current!r})")

  if isinstance(current, bool):
    low = raw.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    fail("a bool (true/false)")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      fail("an int")
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      fail("a float")
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(raw) if raw.strip() else ()
    except (ValueError, SyntaxError):
      value = tuple(v.strip() for v in raw.split(","))  # a,b,c without quotes: strings
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return tuple(value)
  try:  # None or another type: a Python literal, else the raw string
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def apply_override(cd: ml_collections.ConfigDict, assignment: str) -> None:
  """Applies one 'a.b.c=value' override in place; unknown keys are errors naming them."""
  if "=" not in assignment:
    raise ConfigError(f"override {assignment!r} must look like key.path=value")
  key, raw = assignment.split("=", 1)
  key = key.strip()
  if key.startswith("--config."):
    key = key[len("--config."):]
  node, walked = cd, []
  parts = key.split(".")
  for part in parts[:-1]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      where = ".".join(walked) or "config"
      raise ConfigError(f"unknown config key '{key}': {where} has no section {part!r}"
                        f"{_suggest(part, valid)}; valid keys: {valid}")
    node = node[part]
    walked.append(part)
  leaf = parts[-1]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    valid = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    where = ".".join(walked) or "config"
    raise ConfigError(f"unknown config key '{key}'{_suggest(leaf, valid)}; valid keys of "
                      f"{where}: {valid}")
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config key '{key}' is a section; set one of its fields: "
                      f"{list(current.keys())}")
  value = _parse_value(raw, current, key)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--config.{key}={raw}: {e}") from None


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' (calls its `get_config(arg)`), applies overrides, locks it."""
  path_str, _, arg = spec.partition(":")
  path = pathlib.Path(path_str)
  module = _import_config_file(path)
  get_config = getattr(module, "get_config", None)
  if get_config is None:
    raise ConfigError(f"config file {path_str!r} defines no get_config(arg)")
  try:
    cd = get_config(arg) if arg else get_config()
  except (ValueError, KeyError) as e:   # an unknown preset or a bad preset argument
    raise ConfigError(str(e) if path_str in str(e) else f"{spec}: {e}") from e
  if not isinstance(cd, ml_collections.ConfigDict):
    raise ConfigError(f"{path_str}: get_config({arg!r}) returned {type(cd).__name__}, expected "
                      "an ml_collections.ConfigDict")
  cd.lock()
  for assignment in overrides:
    apply_override(cd, assignment)
  return cd


# -- the run configuration -------------------------------------------------------------------------
# Imports of the library's own config types sit here (below the generic machinery above, which the
# CLI uses before anything heavy is needed).
from opd_jax.data.pipeline import PipelineConfig  # noqa: E402
from opd_jax.data.tasks import TaskConfig  # noqa: E402
from opd_jax.geometry.live import LiveGeometryConfig  # noqa: E402
from opd_jax.models.config import ModelConfig  # noqa: E402
from opd_jax.models.lora import LoraConfig  # noqa: E402
from opd_jax.objectives.log_ratio import CreditConfig  # noqa: E402
from opd_jax.objectives.rlvr import GRPOConfig  # noqa: E402
from opd_jax.optim.factory import OptimConfig  # noqa: E402
from opd_jax.train.mesh import MeshConfig  # noqa: E402
from opd_jax.train.steps import DistillStepConfig, PGStepConfig, SFTStepConfig  # noqa: E402

MODEL_SOURCES = ("random", "hf", "checkpoint", "none")
DATA_SOURCES = ("task", "file")
from opd_jax.data.verifiers import VERIFIER_NAMES as VERIFIERS  # noqa: E402
from opd_jax.data.datasets import ON_ERROR  # noqa: E402
ROLLOUT_POLICIES = ("student", "teacher")


def _bad(obj, field: str, why: str):
  raise ConfigError(f"{type(obj).__name__}.{field}={getattr(obj, field)!r}: {why}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Where a model comes from.

  Attributes:
    source: 'random' (fresh init of `model` with `seed`), 'hf' (a local Hugging Face checkpoint
      directory `path`: config.json + safetensors), 'checkpoint' (one of our checkpoints / parameter
      snapshots at `path`, read with `train.checkpoint.load_params_and_config`), or 'none' (no such
      model: a teacher for SFT / RLVR). In-memory params passed to `loop.run` override the source.
    path: checkpoint location for 'hf' / 'checkpoint' (refused with 'random' / 'none', which
      read none).
    model: the architecture for 'random'. For 'hf' / 'checkpoint' the architecture comes from the
      checkpoint and only the numerics fields of `model` are applied on top (dtype, param_dtype,
      scan_layers, remat).
    seed: init seed for 'random'.
  """

  source: str = "random"
  path: str = ""
  model: ModelConfig = ModelConfig()
  seed: int = 0

  def __post_init__(self):
    if self.source not in MODEL_SOURCES:
      _bad(self, "source", f"expected one of {MODEL_SOURCES}")
    if self.source in ("hf", "checkpoint") and not self.path:
      _bad(self, "path", f"source={self.source!r} needs a path")
    if self.source in ("random", "none") and self.path:
      _bad(self, "path", f"has no effect with source={self.source!r} (only 'hf' and 'checkpoint' "
           "read a path); remove it or set the source")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """One teacher of a multi-teacher run (`TeachersConfig`).

  Attributes:
    name: a short name (metrics `teacher/<name>/*`); unique within the run.
    model: where its weights come from (a `ModelSpec`, source 'random' / 'hf' / 'checkpoint').
    domains: the prompt domains routed to it (`TeachersConfig.route='domain'`); an empty tuple on
      at most one teacher makes it the teacher of every domain no other teacher names.
  """

  name: str = ""
  model: ModelSpec = ModelSpec()
  domains: tuple[str, ...] = ()

  def __post_init__(self):
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name or ""):
      _bad(self, "name", "must be a non-empty name of letters, digits, '_', '.', '-'")
    if self.model.source == "none":
      _bad(self, "model", "a teacher needs weights: source 'random', 'hf' or 'checkpoint'")


TEACHER_ROUTES = ("domain", "index")


@dataclasses.dataclass(frozen=True)
class TeachersConfig:
  """Several teachers, each prompt routed to one (multi-teacher OPD; `train.teachers`).

  Attributes:
    models: the teachers (empty: the run has at most the single `teacher`). With two or more,
      `teacher.source` must stay 'none'.
    route: 'domain' (a prompt goes to the teacher whose `domains` holds the prompt's domain: the
      task family for generated tasks, the row field `field` for prompt files) or 'index' (a fixed
      rule: example i goes to teacher i mod len(models); `domains` must be empty).
    field: the prompt-file row field holding the domain (route='domain', data.source='file').
  """

  models: tuple[TeacherSpec, ...] = ()
  route: str = "domain"
  field: str = "domain"

  def __post_init__(self):
    if self.route not in TEACHER_ROUTES:
      _bad(self, "route", f"expected one of {TEACHER_ROUTES}")
    if len(self.models) == 1:
      _bad(self, "models", "one teacher is the plain `teacher` section; list two or more here")
    names = [t.name for t in self.models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      _bad(self, "models", f"teacher names {dup} repeat")
    if self.route == "index" and any(t.domains for t in self.models):
      _bad(self, "route", "route='index' assigns teachers by example index; remove the domains")
    if self.route == "domain" and self.models:
      seen: dict[str, str] = {}
      for t in self.models:
        for d in t.domains:
          if d in seen:
            _bad(self, "models", f"domain {d!r} is routed to both {seen[d]!r} and {t.name!r}")
          seen[d] = t.name
      catch_all = [t.name for t in self.models if not t.domains]
      if len(catch_all) > 1:
        _bad(self, "models", f"teachers {catch_all} have no domains; at most one may catch the "
             "remaining domains")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.models)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Examples, tokenizer, padding buckets and verifier.

  Attributes:
    source: 'task' (the embedded synthetic tasks, `data.tasks`) or 'file' (a local JSONL / Parquet
      prompt set such as dapo-math-17k, `data.datasets`).
    task: task families and difficulty (source='task').
    train_examples / eval_examples: how many task problems to generate for each split (disjoint by
      construction), or the cap on kept (deduplicated) examples of the files (0: all).
    data_seed: generation seed of the task problems.
    path / eval_path: prompt-set files (source='file'; refused with source='task'); without
      eval_path there is no eval split.
    eval_sets: more eval sets, each evaluated at every eval: a tuple of (name, path, layout)
      triples (layout '' = `layout`), e.g. --config.data.eval_sets="(('aime24', 'a.jsonl',
      'math'), ('lcb', 'lcb.jsonl', 'livecodebench'))". Each is loaded like `eval_path`
      (dedup, on_error, max_prompt_tokens, `eval_examples` cap) with any data source, and logs
      `eval/<name>/...`: accuracy, pass_at_k, response_len, prompts, avg@k, pass@k and their
      standard errors over the distinct problems (avg@k_se, pass@k_se; k the number).
    layout: prompt-set layout name (`data.datasets.LAYOUTS`), or for method='sft' a chat layout
      (`data.chat.LAYOUTS`: 'dolci_think', 'messages': rows of `messages` rendered with the chat
      template, the loss on every assistant turn; rows longer than the largest sft bucket are
      malformed ('too_long')).
    on_error: malformed rows of prompt-set files: 'error' (one line naming file:line:field and
      the reason) or 'skip' (skipped and counted per reason: bad_utf8, bad_json, not_an_object,
      missing_field, wrong_type, empty_prompt, empty_answer, no_boxed_answer, bad_tests,
      untokenizable, prompt_too_long; up to 5 file:line samples each in the run summary's
      'data').
    dedup: drop repeated prompts of prompt-set files (whitespace-normalised; the first one and
      its answer are kept; counted in the summary).
    max_prompt_tokens: drop/raise on longer chat-formatted prompts (0: no limit).
    tokenizer: a local Hugging Face tokenizer directory; '' builds the task's char-level tokenizer.
    verifier: 'exact_match' (the arithmetic tasks), 'math' (math-verify, boxed answers; a pool
      of memory-capped workers), 'code' (programs run in the `data.code_exec` sandbox against the
      answer's tests) or 'task' (arithmetic + code task mixtures).
    verifier_timeout_s: wall-clock bound of one check ('math') or one program run ('code',
      'task'); a check past it scores 0 with reason 'timeout'.
    prompt_buckets: padded prompt lengths of rollout batches; () = one bucket fitting the longest
      prompt (rounded up to a multiple of 8).
    sft_buckets: padded sequence lengths of SFT batches; () = as above for prompt + solution.
    shuffle: shuffle the training stream (seeded by `loop.seed`).
    pack: method='sft' only: pack several examples per row of the largest sft bucket (greedy
      first-fit in stream order, `data.pipeline`); attention never crosses examples and positions
      restart, so the loss equals the unpacked one; `loop.batch_size` then counts packed rows.
  """

  source: str = "task"
  task: TaskConfig = TaskConfig()
  train_examples: int = 4096
  eval_examples: int = 128
  data_seed: int = 0
  path: str = ""
  eval_path: str = ""
  eval_sets: tuple[tuple[str, ...], ...] = ()
  layout: str = "dapo_math_17k"
  on_error: str = "error"
  dedup: bool = True
  max_prompt_tokens: int = 0
  tokenizer: str = ""
  verifier: str = "exact_match"
  verifier_timeout_s: float = 5.0
  prompt_buckets: tuple[int, ...] = ()
  sft_buckets: tuple[int, ...] = ()
  shuffle: bool = True
  pack: bool = False

  def __post_init__(self):
    if self.source not in DATA_SOURCES:
      _bad(self, "source", f"expected one of {DATA_SOURCES}")
    if self.source == "file" and not self.path:
      _bad(self, "path", "source='file' needs the prompt-set path")
    if self.source == "task":
      for name in ("path", "eval_path"):
        if getattr(self, name):
          _bad(self, name, "has no effect with source='task' (the task generates its train and "
               "eval splits: data.train_examples / data.eval_examples; extra eval files go in "
               "data.eval_sets); remove it or set data.source='file'")
    if self.on_error not in ON_ERROR:
      _bad(self, "on_error", f"expected one of {ON_ERROR}")
    if self.verifier not in VERIFIERS:
      _bad(self, "verifier", f"expected one of {VERIFIERS}")
    if not self.verifier_timeout_s > 0:
      _bad(self, "verifier_timeout_s", "must be > 0")
    if self.train_examples < 0 or self.eval_examples < 0:
      _bad(self, "train_examples", "train_examples and eval_examples must be >= 0")
    names = set()
    for i, entry in enumerate(self.eval_sets):
      if (not isinstance(entry, (tuple, list)) or len(entry) != 3
          or not all(isinstance(x, str) for x in entry)):
        _bad(self, "eval_sets", f"entry {i} must be a (name, path, layout) triple of strings "
             "(layout '' = data.layout)")
      name, path, _ = entry
      if not re.fullmatch(r"[A-Za-z0-9_.@-]+", name) or name in names:
        _bad(self, "eval_sets", f"entry {i}: name {name!r} must be unique and made of letters, "
             "digits, '_', '.', '@', '-' (it becomes the metric prefix eval/<name>/)")
      if not path:
        _bad(self, "eval_sets", f"entry {i} ({name!r}) has no path")
      names.add(name)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Rollout decoding (turned into `models.sampler.SamplerConfig` with the tokenizer's EOS/pad).

  Attributes:
    max_new_tokens: response budget; 0 = for source='task', the longest solution + EOS.
    temperature: sampling temperature (the paper: 1.0); the PG step evaluates pi_theta at it
      (the ratio is exactly 1 on the first update). Rollouts only: eval samples at
      `loop.eval_temperature` (method='sft' refuses it; with greedy eval also top_k / top_p).
    top_k / top_p: truncation (0 / 1.0 = off).
    eos_ids: extra end-of-sequence ids besides the tokenizer's EOS (e.g. Qwen's <|endoftext|>).
    mode: 'continuous' (a fixed number of decode slots; a finished row's slot takes the next
      pending row, then the tail is compacted), 'compact' (finished rows leave the decode batch:
      power-of-two buckets) or 'static' (every row decodes until the last one ends; the
      baseline). Same tokens in every mode (`models.sampler.SamplerConfig.mode`). The G samples
      of a prompt share its prefill in all (`rollout.group_size`, `loop.eval_k`).
    slots: 'continuous' decode slots (0 = half the batch, `sampler.default_slots`); refused in
      the other modes.
    min_bucket: 'compact' and 'continuous' (its tail): the smallest decode batch
      (`models.sampler.SamplerConfig.min_bucket`, which says what 2 instead of 8 gains and costs
      on CPU); refused with mode='static' (one batch, no buckets).
  """

  max_new_tokens: int = 0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  mode: str = "compact"
  slots: int = 0
  min_bucket: int = 8

  def __post_init__(self):
    if self.max_new_tokens < 0:
      _bad(self, "max_new_tokens", "must be >= 0 (0 = automatic for tasks)")
    if not self.temperature > 0:
      _bad(self, "temperature", "must be > 0")
    if self.mode not in ("continuous", "compact", "static"):
      _bad(self, "mode", "must be 'continuous', 'compact' or 'static'")
    if self.slots < 0:
      _bad(self, "slots", "must be >= 0 (0 = half the batch)")
    if self.min_bucket < 1:
      _bad(self, "min_bucket", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How a rollout batch becomes a `pg_step` batch (see `train.rollout`).

  Attributes:
    policy: 'student' (on-policy) or 'teacher' (the off-policy control: the teacher samples, the
      student scores the rollouts for old_logp; set pg.pg.eps_high = pg.pg.eps_low = 1.0 to turn
      ratio clipping effectively off, as the recipe's `offpolicy` variant does).
    group_size: samples per prompt (G; GRPO groups for RLVR; the paper's OPD uses 8).
    mix_alpha: method='mixed': A = alpha A_OPD + (1 - alpha) A_RLVR.
    token_transforms: token sparsification chain over the per-token rewards before the credit
      estimator: ((name, kwargs), ...) with names from `rollout.TOKEN_TRANSFORMS`.
    chunk_size: sequence positions per chunk when scoring with the teacher / computing KL_t.
    recompute_old_logp: re-score the student's own rollouts for old_logp instead of taking the
      sampler's log-probs (equal in float32; recommended in bf16, where the KV-cache decode and
      the training forward pass round differently and the ratio should start at exactly 1).
  """

  policy: str = "student"
  group_size: int = 1
  mix_alpha: float = 0.5
  token_transforms: tuple = ()
  chunk_size: int = 128
  recompute_old_logp: bool = False

  def __post_init__(self):
    if self.policy not in ROLLOUT_POLICIES:
      _bad(self, "policy", f"expected one of {ROLLOUT_POLICIES}")
    if self.group_size < 1:
      _bad(self, "group_size", "must be >= 1")
    if not 0.0 <= self.mix_alpha <= 1.0:
      _bad(self, "mix_alpha", "must be in [0, 1]")
    from opd_jax.train.rollout import TOKEN_TRANSFORMS  # the one table of token transforms
    for i, t in enumerate(self.token_transforms):
      if (not isinstance(t, (tuple, list)) or len(t) != 2 or not isinstance(t[0], str)
          or not isinstance(t[1], Mapping)):
        raise ConfigError(f"RolloutConfig.token_transforms[{i}]={t!r}: expected (name, kwargs)")
      if t[0] not in TOKEN_TRANSFORMS:
        raise ConfigError(f"RolloutConfig.token_transforms[{i}]: unknown token transform "
                          f"{t[0]!r}; valid names: {sorted(TOKEN_TRANSFORMS)}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Steps, batch size, eval, snapshots, checkpoints, logging.

  Attributes:
    steps: train steps (one rollout batch / SFT batch each).
    batch_size: global prompts per step (PG methods; each sampled `rollout.group_size` times) or
      global sequences per step (SFT).
    seed: seed of the train-state RNG (per-step keys) and of the data order.
    eval_every: evaluate every this many steps (0: never); also at the start and the end.
    eval_k: samples per eval prompt (avg@k); eval_greedy: greedy decoding (then k is 1, and
      setting eval_k or eval_temperature is refused: greedy eval reads neither).
    eval_temperature: sampling temperature of eval when not greedy.
    eval_batch_size: eval prompts per sampler call.
    snapshot_steps: steps after which the parameters are saved for trajectory diagnostics (kept
      apart from the rolling checkpoints; step 0 = the initial parameters).
    snapshot_format: how snapshots are stored: 'full' (each one complete) or 'delta' (the exact
      change from the previous snapshot, anchored on full ones: `train.snapshot_delta`).
    checkpoint_every: rolling checkpoint every this many steps (0: only at the end).
    checkpoint_keep: rolling checkpoints kept.
    log_every: write metrics every this many steps.
    progress / tensorboard: tqdm bar; TensorBoard event files (JSONL is always written).
    debug_nan_at_step: test hook: the loss of this step is made NaN (the run must stop there).
    transfer_guard: `jax.transfer_guard` level of the step loop: 'allow', 'log' or 'disallow'
      (every host <-> device copy in the loop is explicit; 'disallow' proves it).
    time_phases: log where each step's time goes (`time/*`: sampling, scoring, verification,
      advantages, the update, data, other), tokens per second and MFU (`perf/*`), measured by
      a watcher thread without blocking the loop (`train.timing`).
    branch_from: a checkpoint of another run that this fresh run continues (its step directory
      `<workdir>/checkpoints/<step>`, or that directory's parent: its latest step): parameters,
      step, RNG, data position and optimizer state (Adam's moments, the schedule's count) as a
      resume would, under this config. The config may differ from the checkpoint's only in
      `optim.transforms` (transforms added to the chain start from their init: the paper's
      rank-K projection from a mid-run point, its "shared resume"), `subspace`, and what a
      resume may change (`loop.RESUMABLE_CHANGES`). '' = start from `student`.
  """

  steps: int = 100
  batch_size: int = 8
  seed: int = 0
  eval_every: int = 0
  eval_k: int = 1
  eval_greedy: bool = True
  eval_temperature: float = 1.0
  eval_batch_size: int = 64
  snapshot_steps: tuple[int, ...] = ()
  snapshot_format: str = "full"
  checkpoint_every: int = 0
  checkpoint_keep: int = 2
  log_every: int = 1
  progress: bool = True
  tensorboard: bool = True
  debug_nan_at_step: int = -1
  transfer_guard: str = "allow"
  time_phases: bool = True
  branch_from: str = ""

  def __post_init__(self):
    if self.transfer_guard not in ("allow", "log", "disallow"):
      _bad(self, "transfer_guard", "expected 'allow', 'log' or 'disallow'")
    for name in ("steps", "batch_size", "eval_k", "eval_batch_size", "checkpoint_keep",
                 "log_every"):
      if getattr(self, name) < 1:
        _bad(self, name, "must be >= 1")
    for name in ("eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        _bad(self, name, "must be >= 0")
    bad = [s for s in self.snapshot_steps if not 0 <= s <= self.steps]
    if bad:
      _bad(self, "snapshot_steps", f"steps {bad} are outside [0, steps={self.steps}]")
    if self.snapshot_format not in ("full", "delta"):
      _bad(self, "snapshot_format", "expected 'full' or 'delta'")


@dataclasses.dataclass(frozen=True)
class SubspaceConfig:
  """Rank-k subspace-constrained training (the paper's intervention), from checkpoint paths.

  When `at` is set, bases V_k (top-k input-side singular vectors of W_at - W_origin per matrix,
  `optim.subspace.capture_bases`) are passed to the optimizer factory as `subspace_bases`; add the
  transform ('subspace_projection', position 'pre' or 'post') to `optim.transforms`. The student
  usually starts from `at` as well (student.source='checkpoint', student.path=at). In-memory bases
  passed to `loop.run(subspace_bases=...)` take precedence.

  Attributes:
    origin: checkpoint / snapshot path of W_0 (the start of the run being constrained).
    at: checkpoint / snapshot path of W_t (e.g. ~20% of training); '' disables.
    k: rank of the subspace (the paper: 16); read only with `at` set (refused otherwise).
  """

  origin: str = ""
  at: str = ""
  k: int = 16

  def __post_init__(self):
    if bool(self.origin) != bool(self.at):
      _bad(self, "at", "set both subspace.origin and subspace.at (or neither)")
    if self.k < 1:
      _bad(self, "k", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a run needs. `method` picks the objective:

    sft      token NLL on demonstrations (`sft` section; data.source='task' or a file with solutions)
    opd      policy-gradient OPD: reward_t = log pT - log pS on the student's rollouts (`pg`, `credit`)
    rlvr     GRPO on verifier rewards (`pg`, `grpo`)
    mixed    A = alpha A_OPD + (1 - alpha) A_RLVR (`rollout.mix_alpha`)
    distill  direct route: a divergence between teacher and student distributions on the student's
             rollouts (`distill`)

  Any method trains LoRA / PiSSA adapters instead of the full parameters with `lora.rank > 0`
  (`models.lora.LoraConfig`). `geometry.every > 0` logs the update's geometry live every that
  many steps (`geometry/*`: density, ||dW||_F, stable rank, Sim_K; `geometry.live`).
  """

  method: str = "opd"
  student: ModelSpec = ModelSpec()
  teacher: ModelSpec = ModelSpec(source="none")
  teachers: TeachersConfig = TeachersConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  sampler: SamplingConfig = SamplingConfig()
  rollout: RolloutConfig = RolloutConfig()
  sft: SFTStepConfig = SFTStepConfig()
  pg: PGStepConfig = PGStepConfig()
  distill: DistillStepConfig = DistillStepConfig()
  credit: CreditConfig = CreditConfig()
  grpo: GRPOConfig = GRPOConfig()
  loop: LoopConfig = LoopConfig()
  subspace: SubspaceConfig = SubspaceConfig()
  lora: LoraConfig = LoraConfig()
  geometry: LiveGeometryConfig = LiveGeometryConfig()

  def __post_init__(self):
    from opd_jax.train import recipes  # the method's rules live in its recipe
    recipes.get(self).validate(self)

  def replace(self, **kw) -> "TrainConfig":
    return dataclasses.replace(self, **kw)


def from_config_dict(cd: Any) -> TrainConfig:
  """The typed `TrainConfig` of a (locked) ConfigDict or nested dict; strict (module docstring)."""
  return dataclass_from_dict(TrainConfig, cd, "config")


def to_config_dict(cfg: TrainConfig) -> ml_collections.ConfigDict:
  """The ConfigDict of a TrainConfig (every field present; unlocked)."""
  return ml_collections.ConfigDict(dataclass_to_dict(cfg))


def default_config(method: str = "opd") -> ml_collections.ConfigDict:
  """Every TrainConfig field with its default (unlocked), for config files to edit. Each knob has
  one copy: derived step settings (the PG step's temperature, GRPO's group size) are filled from
  `sampler.temperature` / `rollout.group_size` by the run plan."""
  cd = to_config_dict(TrainConfig(method="sft"))
  cd.method = method
  return cd
