"""The `opd-jax` CLI (called in-process through `cli.main`) and the launch scripts."""

import json
import os
import pathlib
import subprocess

import pytest

from opd_jax import cli
from opd_jax.train import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SFT_SMOKE = str(ROOT / "configs" / "sft.py") + ":smoke"


def _last_json(text: str) -> dict:
  start = text.index("\n{") + 1 if not text.startswith("{") else 0
  return json.loads(text[start:])


def test_train_then_resume_through_the_cli(tmp_path, capsys):
  args = ["train", "--config", SFT_SMOKE, "--workdir", str(tmp_path), "--config.loop.steps=2",
          "--config.loop.checkpoint_every", "1"]
  assert cli.main(args) == 0
  summary = _last_json(capsys.readouterr().out)
  assert summary["step"] == 2 and summary["resumed_from"] is None
  # In this process the backend had started: `host_malloc.tune` left dispatch asynchronous.
  assert summary["synchronous_dispatch"] is False
  assert cli.main(args[:-2] + ["--config.loop.steps=3", "--resume"]) == 0
  summary = _last_json(capsys.readouterr().out)
  assert summary["step"] == 3 and summary["resumed_from"] == 2
  steps = [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")]
  assert steps == [1, 2, 3]
  # Every segment's config is kept: the first run's, and the resume's beside it.
  first = json.loads((tmp_path / "config.json").read_text())
  resumed = json.loads((tmp_path / "config.resume-2.json").read_text())
  assert first["loop"]["steps"] == 2 and resumed["loop"]["steps"] == 3
  assert resumed["method"] == "sft"


def test_config_typo_is_a_clear_error(tmp_path, capsys):
  code = cli.main(["train", "--config", SFT_SMOKE, "--workdir", str(tmp_path),
                   "--config.loop.stepz=2"])
  assert code == 2
  err = capsys.readouterr().err
  assert "config error" in err and "'loop.stepz'" in err and "did you mean 'steps'" in err
  assert not (tmp_path / "metrics.jsonl").exists()
  code = cli.main(["train", "--config", SFT_SMOKE, "--workdir", str(tmp_path),
                   "--config.optim.transforms=('nosuch',)"])
  assert code == 2
  assert "unknown optimizer transform 'nosuch'" in capsys.readouterr().err


def test_unknown_subcommand_and_missing_flags_fail():
  with pytest.raises(SystemExit):
    cli.main(["trian"])
  with pytest.raises(SystemExit):
    cli.main(["train", "--config", SFT_SMOKE])  # no --workdir


# -- launch scripts ---------------------------------------------------------------------------
def test_tpu_pod_dry_run_prints_every_gcloud_command():
  proc = subprocess.run(
      ["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--dry-run", "--name", "opd-test", "--zone",
       "europe-west4-b", "--accelerator-type", "v5p-64", "--repo", "https://example.com/opd.git",
       "--ref", "v1", "--", "train", "--config", "configs/opd.py:qwen3_8b", "--workdir",
       "gs://bucket/run 1"], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ gcloud")]
  assert len(lines) == 4, proc.stdout
  create, install, run, delete = lines
  assert "tpus tpu-vm create opd-test" in create and "--accelerator-type=v5p-64" in create
  assert "--zone=europe-west4-b" in create
  assert "tpu-vm ssh opd-test" in install and "--worker=all" in install
  assert "git clone https://example.com/opd.git" in install and "git checkout v1" in install
  assert "pip install" in install
  assert "tpu-vm ssh opd-test" in run and "--worker=all" in run
  assert "OPD_COORDINATOR=auto opd-jax train --config configs/opd.py:qwen3_8b" in run
  assert "gs://bucket/run\\ 1" in run  # arguments are shell-quoted for the remote side
  assert "tpu-vm delete opd-test" in delete and "--quiet" in delete


def test_tpu_pod_rejects_bad_usage():
  script = str(ROOT / "launch" / "tpu_pod.sh")
  proc = subprocess.run(["bash", script, "--dry-run", "--", "train"], capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2 and "--repo URL is required" in proc.stderr
  proc = subprocess.run(["bash", script, "--dry-run", "--bogus"], capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


def _fake_opd(tmp_path, body):
  script = tmp_path / "fake_opd.sh"
  script.write_text("#!/usr/bin/env bash\n" + body)
  script.chmod(0o755)
  return str(script)


def test_local_multiprocess_sets_the_coordinator_env_for_each_process(tmp_path):
  fake = _fake_opd(tmp_path, 'echo "rank=$OPD_PROCESS_ID n=$OPD_NUM_PROCESSES '
                             'coord=$OPD_COORDINATOR args=$*" > "$OUT_DIR/p$OPD_PROCESS_ID"\n')
  env = dict(os.environ, OPD_JAX=fake, OUT_DIR=str(tmp_path), OPD_LOG_DIR=str(tmp_path / "logs"))
  proc = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "3", "train",
                         "--workdir", "w"], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  outs = [(tmp_path / f"p{i}").read_text() for i in range(3)]
  coords = {o.split("coord=")[1].split()[0] for o in outs}
  assert len(coords) == 1 and coords.pop().startswith("127.0.0.1:")
  for i, o in enumerate(outs):
    assert f"rank={i} n=3" in o and "args=train --workdir w" in o


def test_local_multiprocess_fails_fast_when_one_process_fails(tmp_path):
  fake = _fake_opd(tmp_path, '[ "$OPD_PROCESS_ID" = 1 ] && { echo boom; exit 7; }\nsleep 60\n')
  env = dict(os.environ, OPD_JAX=fake, OPD_LOG_DIR=str(tmp_path / "logs"))
  proc = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "2", "x"],
                        env=env, capture_output=True, text=True, timeout=30)
  assert proc.returncode == 7
  assert "process 1 failed (exit 7)" in proc.stderr and "boom" in proc.stderr


def test_diagnose_study_and_report_call_the_library(monkeypatch, tmp_path, capsys):
  # The subcommands are thin: they parse and call the library with what they parsed (the
  # library functions themselves are tested by the geometry and study tests).
  from opd_jax import study
  from opd_jax.geometry import report
  calls = {}

  def fake_diagnose(base, tuned, snapshots=(), out_dir="diagnostics", cfg=None):
    calls["diagnose"] = (base, tuned, snapshots, out_dir)
    return {"overall": {"sparsity": 0.5}}

  def fake_run(config, workdir, redo=(), check=False):
    calls["study"] = (config, workdir, redo, check)
    return {"ok": False, "failed": ["x"]}

  def fake_report(workdir, config=None):
    calls["report"] = (workdir, config)
    return tmp_path / "report.md"

  monkeypatch.setattr(report, "diagnose", fake_diagnose)
  monkeypatch.setattr(study, "run", fake_run)
  monkeypatch.setattr(study, "report", fake_report)

  assert cli.main(["diagnose", "--base", "A", "--tuned", "B", "--snapshots", "S1", "S2",
                   "--out", str(tmp_path / "d")]) == 0
  assert calls["diagnose"] == ("A", "B", ("S1", "S2"), str(tmp_path / "d"))
  assert '"sparsity": 0.5' in capsys.readouterr().out

  cfg_file = tmp_path / "study_cfg.py"
  cfg_file.write_text("import ml_collections\n"
                      "def get_config(arg):\n"
                      "  return ml_collections.ConfigDict({'preset': arg, 'steps': 3})\n")
  code = cli.main(["study", "--config", f"{cfg_file}:tiny", "--workdir", str(tmp_path / "w"),
                   "--redo", "opd", "--redo", "sft", "--check", "--config.steps=5"])
  assert code == 1  # --check and a failed claim
  config, workdir, redo, check = calls["study"]
  assert config.preset == "tiny" and config.steps == 5 and config.is_locked
  assert workdir == str(tmp_path / "w") and redo == ("opd", "sft") and check is True

  assert cli.main(["report", "--workdir", str(tmp_path / "w")]) == 0
  assert calls["report"] == (str(tmp_path / "w"), None)
  assert "report written to" in capsys.readouterr().out
