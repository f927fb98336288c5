"""Config files and the strict ConfigDict -> TrainConfig bridge (no device work: fast)."""

import pathlib
import re

import ml_collections
import pytest

from opd_jax.train import config as config_lib
from opd_jax.train.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {"sft": ("smoke", "tiny", "qwen3_8b"),
           "opd": ("smoke", "tiny", "offpolicy", "qwen3_8b", "qwen3_8b_code"),
           "rlvr": ("smoke", "tiny", "qwen3_8b", "qwen3_8b_code")}


def load(name, preset, overrides=()):
  return config_lib.load_config(str(ROOT / "configs" / f"{name}.py") + f":{preset}", overrides)


@pytest.mark.parametrize("name,preset", [(n, p) for n, ps in CONFIGS.items() for p in ps])
def test_every_preset_builds_a_locked_typed_config(name, preset):
  cd = load(name, preset)
  assert cd.is_locked
  cfg = config_lib.from_config_dict(cd)
  assert isinstance(cfg, config_lib.TrainConfig)
  assert cfg.method == ("opd" if name == "opd" else name)
  # Round trip: TrainConfig -> ConfigDict -> TrainConfig is the identity.
  assert config_lib.from_config_dict(config_lib.to_config_dict(cfg)) == cfg


def test_qwen3_8b_presets_mirror_the_paper_settings():
  opd = config_lib.from_config_dict(load("opd", "qwen3_8b"))
  assert (opd.optim.lr, opd.optim.schedule, opd.optim.b1, opd.optim.b2) == (1e-6, "constant", 0.9,
                                                                           0.98)
  assert opd.optim.weight_decay == 0.1
  assert opd.rollout.group_size == 8 and opd.sampler.temperature == 1.0
  assert opd.loop.batch_size == 64 and opd.loop.steps == 299
  assert {63, 127, 191, 255, 299} <= set(opd.loop.snapshot_steps)
  assert opd.student.model.dtype == "bfloat16" and opd.teacher.source == "hf"
  assert opd.data.layout == "dapo_math_17k" and opd.mesh.shape == (1, -1, 1)
  assert opd.credit.kind == "immediate"

  rl = config_lib.from_config_dict(load("rlvr", "qwen3_8b"))
  assert (rl.optim.lr, rl.optim.b1, rl.optim.b2, rl.optim.eps) == (1e-6, 0.9, 0.98, 1e-15)
  assert rl.loop.batch_size == 512 and rl.loop.steps == 1023
  assert (rl.pg.pg.eps_low, rl.pg.pg.eps_high) == (0.2, 0.28)
  assert rl.pg.kl_coef == 0.0

  sft = config_lib.from_config_dict(load("sft", "qwen3_8b"))
  assert (sft.optim.lr, sft.optim.schedule, sft.optim.final_lr, sft.optim.warmup_frac) == (
      1e-5, "cosine", 1e-6, 0.1)
  assert (sft.optim.b1, sft.optim.b2, sft.optim.weight_decay) == (0.9, 0.95, 0.1)
  assert sft.loop.batch_size == 256


def test_override_typo_is_an_error_naming_the_key():
  with pytest.raises(ConfigError, match=r"'loop\.stepz'.*did you mean 'steps'"):
    load("opd", "smoke", ["loop.stepz=3"])
  with pytest.raises(ConfigError, match=r"'lop\.steps'.*no section 'lop'.*did you mean 'loop'"):
    load("opd", "smoke", ["lop.steps=3"])
  with pytest.raises(ConfigError, match=r"loop\.steps.*expected an int"):
    load("opd", "smoke", ["loop.steps=many"])
  with pytest.raises(ConfigError, match=r"'loop' is a section"):
    load("opd", "smoke", ["loop=3"])


def test_unknown_key_in_a_dict_is_an_error_naming_its_path():
  d = load("sft", "smoke").to_dict()
  d["optim"]["learning_rate"] = 1.0
  with pytest.raises(ConfigError, match=r"unknown config key 'config\.optim\.learning_rate'"):
    config_lib.from_config_dict(d)
  d = load("sft", "smoke").to_dict()
  d["student"]["model"]["n_layer"] = 3
  with pytest.raises(ConfigError, match=r"config\.student\.model\.n_layer.*did you mean "
                                        r"'n_layers'"):
    config_lib.from_config_dict(d)


def test_wrong_types_and_invalid_values_name_the_field():
  d = load("sft", "smoke").to_dict()
  d["loop"]["steps"] = 2.5
  with pytest.raises(ConfigError, match=r"config\.loop\.steps: expected an int"):
    config_lib.from_config_dict(d)
  with pytest.raises(ConfigError, match=r"config\.student\.model: ModelConfig\.n_kv_heads"):
    config_lib.from_config_dict(load("sft", "smoke", ["student.model.n_kv_heads=3"]))
  with pytest.raises(ConfigError, match=r"LoopConfig\.snapshot_steps"):
    config_lib.from_config_dict(load("sft", "smoke", ["loop.snapshot_steps=(5, 500)"]))


def test_unknown_transform_names_are_errors_listing_the_valid_names():
  with pytest.raises(ConfigError, match=r"unknown optimizer transform 'frieze'.*'freeze'"):
    config_lib.from_config_dict(load("opd", "smoke", ["optim.transforms=('frieze',)"]))
  with pytest.raises(ConfigError, match=r"unknown token transform 'top_k_retention'.*"
                                        r"'top_kl_retention'"):
    config_lib.from_config_dict(load(
        "opd", "smoke", ["rollout.token_transforms=(('top_k_retention', {'rho': 0.5}),)"]))
  ok = config_lib.from_config_dict(load(
      "opd", "smoke", ["rollout.token_transforms=(('top_kl_retention', {'rho': 0.5}),)",
                       "optim.transforms=(('freeze', {'patterns': 'embed'}),)"]))
  assert ok.rollout.token_transforms == (("top_kl_retention", {"rho": 0.5}),)
  assert ok.optim.transforms[0].name == "freeze"


def test_overrides_parse_by_the_replaced_values_type():
  cd = load("opd", "smoke", ["loop.progress=false", "optim.lr=1e-4", "loop.steps=7",
                             "loop.snapshot_steps=0,3,7", "data.tokenizer=/x/y"])
  cfg = config_lib.from_config_dict(cd)
  assert cfg.loop.progress is False and cfg.optim.lr == 1e-4 and cfg.loop.steps == 7
  assert cfg.loop.snapshot_steps == (0, 3, 7) and cfg.data.tokenizer == "/x/y"


def test_each_knob_has_one_copy_and_derived_step_settings_come_from_it():
  from opd_jax.train import run_plan
  cd = load("rlvr", "smoke", ["sampler.temperature=0.7", "rollout.group_size=4"])
  assert "temperature" not in cd.pg and "group_size" not in cd.grpo
  assert "kl_coef" not in cd.grpo and "value_head" not in cd.pg
  for key in ("pg.temperature=0.5", "grpo.group_size=4", "grpo.kl_coef=0.1"):
    with pytest.raises(ConfigError, match=r"unknown config key"):
      load("rlvr", "smoke", [key])
  plan = run_plan.resolve(config_lib.from_config_dict(cd), shapes_only=True)
  assert plan.step_cfg.temperature == 0.7 and plan.sampler.temperature == 0.7
  assert plan.rows == 4 * plan.cfg.loop.batch_size
  learned = run_plan.resolve(config_lib.from_config_dict(load(
      "opd", "smoke", ["credit.kind=gae", "credit.value=learned"])), shapes_only=True)
  assert learned.step_cfg.value_head and learned.recipe.needs(learned.cfg).value_head


def test_sampler_min_bucket_reaches_the_sampler_and_is_checked():
  """`sampler.min_bucket` (the rollout decode's smallest bucket) is the resolved plan's
  `SamplerConfig.min_bucket`, and sets its compiled buckets; below 1 it is refused naming it."""
  from opd_jax.models import sampler
  from opd_jax.train import run_plan
  for value in (8, 2):
    cfg = config_lib.from_config_dict(load("opd", "smoke", [f"sampler.min_bucket={value}"]))
    plan = run_plan.resolve(cfg, shapes_only=True)
    assert plan.sampler.min_bucket == value
    assert min(sampler.buckets(32, "compact", plan.sampler.min_bucket)) == value
  with pytest.raises(ConfigError, match=r"SamplingConfig\.min_bucket=0: must be >= 1"):
    config_lib.from_config_dict(load("opd", "smoke", ["sampler.min_bucket=0"]))


@pytest.mark.parametrize("preset,override", [
    ("rlvr", "credit.kind=gae"),                 # RLVR has no per-token OPD reward to credit
    ("rlvr", "rollout.mix_alpha=0.3"),           # only 'mixed' mixes
    ("opd", "grpo.normalize_std=false"),         # no verifier rewards in OPD
    ("opd", "credit.lam=0.5"),                   # lam is GAE's
    ("opd", "pg.kl_kind=k1"),                    # kl_kind without kl_coef
    ("opd", "distill.distill.kind=forward_kl"),  # the direct route's section
    ("sft", "pg.epochs=2"),
    ("sft", "credit.kind=gae"),
    ("opd", "pg.value_coef=1.0"),                # value loss without a learned value head
])
def test_settings_a_recipe_never_reads_are_refused_by_name(preset, override):
  key = override.split("=")[0]
  with pytest.raises(ConfigError, match=rf"config\.{key.replace('.', '[.]')}=.*has no effect"):
    config_lib.from_config_dict(load(preset, "smoke", [override]))


def test_cross_field_validation():
  with pytest.raises(ConfigError, match=r"needs a teacher"):
    config_lib.from_config_dict(load("opd", "smoke", ["teacher.source=none"]))
  with pytest.raises(ConfigError, match=r"rollout\.group_size >= 2"):
    config_lib.from_config_dict(load("rlvr", "smoke", ["rollout.group_size=1"]))
  with pytest.raises(ConfigError, match=r"source='hf' needs a path"):
    config_lib.from_config_dict(load("opd", "smoke", ["teacher.source=hf"]))


def test_config_file_errors_are_clear(tmp_path):
  with pytest.raises(ConfigError, match=r"does not exist"):
    config_lib.load_config(str(tmp_path / "nope.py") + ":x")
  bad = tmp_path / "bad.py"
  bad.write_text("X = 1\n")
  with pytest.raises(ConfigError, match=r"defines no get_config"):
    config_lib.load_config(str(bad))
  with pytest.raises(ValueError, match=r"unknown preset 'smok'.*'smoke'"):
    load("sft", "smok")


def test_default_config_covers_every_field():
  cd = config_lib.default_config("opd")
  assert isinstance(cd, ml_collections.ConfigDict)
  names = {f for f in config_lib.TrainConfig.__dataclass_fields__}
  assert set(cd.keys()) == names


@pytest.mark.parametrize("name", ["opd", "rlvr"])
def test_qwen3_8b_code_presets_are_the_paper_settings_on_deepcoder_with_a_livecodebench_eval(name):
  """The code-domain variant: the qwen3_8b settings, DeepCoder prompts, LiveCodeBench v5 as the
  named eval set, the sandboxed code verifier; it resolves to a run plan (shapes only)."""
  from opd_jax.data import datasets
  from opd_jax.train import run_plan
  base = config_lib.from_config_dict(load(name, "qwen3_8b"))
  code = config_lib.from_config_dict(load(name, "qwen3_8b_code"))
  for field in ("optim", "pg", "loop", "rollout", "student", "teacher", "mesh"):
    assert getattr(code, field) == getattr(base, field), field
  d = code.data
  assert (d.source, d.layout, d.verifier, d.eval_path) == ("file", "deepcoder", "code", "")
  assert [(n, lay) for n, _, lay in d.eval_sets] == [("lcb_v5", "livecodebench")]
  assert d.layout in datasets.LAYOUTS and d.eval_sets[0][2] in datasets.LAYOUTS
  assert d.max_prompt_tokens == d.prompt_buckets[-1] == 2048
  plan = run_plan.resolve(code, shapes_only=True)
  assert plan.has_eval and plan.eval_k == 8 and plan.prompt_buckets == (512, 1024, 2048)
  assert plan.max_new_tokens == 4096 and plan.student.n_layers == 36
  assert (plan.teacher is not None) == (name == "opd")
  # The placeholders are overridable, and a malformed eval_sets entry is refused by field.
  cfg = config_lib.from_config_dict(load(name, "qwen3_8b_code", [
      "data.path=/d/train.parquet",
      "data.eval_sets=(('lcb', '/d/lcb.jsonl', 'livecodebench'), ('hidden', '/d/h.jsonl', ''))"]))
  assert cfg.data.path == "/d/train.parquet" and len(cfg.data.eval_sets) == 2
  with pytest.raises(ConfigError,
                     match=r"DataConfig\.eval_sets=.*entry 1: name 'lcb' must be unique"):
    config_lib.from_config_dict(load(name, "qwen3_8b_code", [
        "data.eval_sets=(('lcb', 'a.jsonl', ''), ('lcb', 'b.jsonl', ''))"]))


# -- options that are accepted only where the run reads them ---------------------------------------
@pytest.mark.parametrize("preset,overrides,field", [
    # a value the prompt-set readers do not know
    ("opd", ["data.on_error=bogus"], r"config\.data: DataConfig\.on_error='bogus': expected one "
                                     r"of \('error', 'skip'\)"),
    # the clip range acts only under ppo_clip (the smoke preset's eps_high=0.2 is then unread too)
    ("rlvr", ["pg.pg.kind=reinforce", "pg.pg.eps_low=0.1"], r"config\.pg\.pg\.eps_low=0\.1 has "
                                                           r"no effect with pg\.pg\.kind="),
    ("opd", ["pg.pg.kind=is"], r"config\.pg\.pg\.eps_high=0\.2 has no effect with pg\.pg\.kind="),
    # CR-OPD's routing knobs without CR-OPD
    ("opd", ["pg.cr.student_top_k=8"], r"config\.pg\.cr\.student_top_k=8 has no effect with "
                                       r"pg\.cr\.coef=0"),
    ("mixed", ["pg.cr.teacher_min_prob=0.1"], r"config\.pg\.cr\.teacher_min_prob=0\.1 has no "
                                              r"effect with pg\.cr\.coef=0"),
    # a constant schedule has no final lr
    ("sft", ["optim.final_lr=0.0001"], r"config\.optim\.final_lr=0\.0001 has no effect with "
                                      r"optim\.schedule='constant'"),
    # projection / live monitor off
    ("opd", ["subspace.k=8"], r"config\.subspace\.k=8 has no effect with subspace\.at=''"),
    ("sft", ["geometry.k=8"], r"config\.geometry\.k=8 has no effect with geometry\.every=0"),
    ("rlvr", ["geometry.subspace_iters=2"], r"config\.geometry\.subspace_iters=2 has no effect"),
    # greedy eval draws one argmax sample per prompt
    ("opd", ["loop.eval_k=4"], r"config\.loop\.eval_k=4 has no effect with loop\.eval_greedy=True"),
    ("sft", ["loop.eval_every=5", "loop.eval_temperature=0.7"],
     r"config\.loop\.eval_temperature=0\.7 has no effect with loop\.eval_greedy=True"),
    # SFT samples no rollouts: its eval samples at loop.eval_temperature (greedy: no truncation)
    ("sft", ["loop.eval_every=5", "loop.eval_greedy=false", "sampler.temperature=0.7"],
     r"config\.sampler\.temperature=0\.7 has no effect with method='sft'"),
    ("sft", ["loop.eval_every=5", "sampler.top_k=5"],
     r"config\.sampler\.top_k=5 has no effect with method='sft'"),
    # decode slots only in 'continuous' mode; no buckets in 'static' mode
    ("opd", ["sampler.slots=4"], r"config\.sampler\.slots=4 has no effect with sampler\.mode="
                                 r"'compact'"),
    ("rlvr", ["sampler.mode=static", "sampler.min_bucket=2"],
     r"config\.sampler\.min_bucket=2 has no effect with sampler\.mode='static'"),
    # files named while the data are generated / a path while the weights are a random init
    ("opd", ["data.eval_path=/d/eval.jsonl"],
     r"config\.data: DataConfig\.eval_path='/d/eval\.jsonl': has no effect with source='task'"),
    ("sft", ["data.path=/d/train.jsonl"], r"config\.data: DataConfig\.path='/d/train\.jsonl': has "
                                          r"no effect with source='task'"),
    ("opd", ["student.path=/ckpt"], r"config\.student: ModelSpec\.path='/ckpt': has no effect "
                                    r"with source='random'"),
    ("opd", ["teacher.path=/ckpt"], r"config\.teacher: ModelSpec\.path='/ckpt': has no effect "
                                    r"with source='random'"),
])
def test_options_their_switch_turns_off_are_refused_in_one_line_naming_the_field(
    preset, overrides, field):
  name = "opd" if preset == "mixed" else preset
  extra = ["method=mixed"] if preset == "mixed" else []
  with pytest.raises(ConfigError) as e:
    config_lib.from_config_dict(load(name, "smoke", extra + overrides))
  msg = str(e.value)
  assert "\n" not in msg
  assert re.search(field, msg), msg


def test_a_refused_setting_of_the_preset_says_how_to_reset_it():
  # The qwen3_8b SFT preset decays to final_lr: a constant schedule turns its final_lr off.
  with pytest.raises(ConfigError) as e:
    config_lib.from_config_dict(load("sft", "qwen3_8b", ["optim.schedule=constant"]))
  assert str(e.value).endswith("remove the override, or set optim.final_lr=0.0 if the preset "
                               "sets it")


@pytest.mark.parametrize("preset,overrides", [
    ("opd", ["data.on_error=skip"]),
    ("sft", ["optim.schedule=cosine", "optim.final_lr=0.0001"]),
    ("rlvr", ["pg.pg.eps_low=0.1"]),                          # ppo_clip (the default kind)
    ("rlvr", ["pg.pg.kind=reinforce"]),                       # defaults left alone
    ("opd", ["pg.cr.coef=1.0", "pg.cr.student_top_k=8", "pg.cr.teacher_min_prob=0.1"]),
    ("opd", ["subspace.origin=/r/snapshots/0", "subspace.at=/r/snapshots/2", "subspace.k=8"]),
    ("sft", ["geometry.every=5", "geometry.k=8"]),
    ("opd", ["loop.eval_every=5", "loop.eval_greedy=false", "loop.eval_k=4",
             "loop.eval_temperature=0.7"]),
    ("sft", ["loop.eval_every=5", "loop.eval_greedy=false", "sampler.top_k=5",
             "sampler.top_p=0.9"]),
    ("opd", ["sampler.temperature=0.7", "sampler.top_k=5"]),   # the rollouts sample with them
    ("opd", ["sampler.mode=continuous", "sampler.slots=4", "sampler.min_bucket=2"]),
    ("opd", ["data.source=file", "data.path=/d/train.jsonl", "data.eval_path=/d/eval.jsonl"]),
    ("opd", ["student.source=checkpoint", "student.path=/ckpt"]),
])
def test_the_same_options_are_accepted_where_they_act(preset, overrides):
  config_lib.from_config_dict(load(preset, "smoke", overrides))


def _presets(name):
  return sorted(config_lib._import_config_file(ROOT / "configs" / f"{name}.py").PRESETS)


@pytest.mark.parametrize("name,preset", [(n, p) for n in ("sft", "opd", "rlvr")
                                         for p in _presets(n)])
def test_every_preset_of_every_recipe_file_validates_and_resolves(name, preset):
  from opd_jax.train import run_plan
  cfg = config_lib.from_config_dict(load(name, preset))
  run_plan.resolve(cfg, shapes_only=True)


@pytest.mark.parametrize("preset", _presets("study"))
def test_every_run_the_study_presets_compose_validates(preset):
  from opd_jax.study import config as study_config
  from opd_jax.study import runs
  study = study_config.from_config_dict(config_lib.load_config(
      str(ROOT / "configs" / "study.py") + f":{preset}"))
  for spec in runs.run_specs(study):
    assert isinstance(runs.compose_run(study, spec, runs._symbolic), config_lib.TrainConfig)
