"""The geometry study: the paper's comparisons end to end, as resumable phases, with a report.

    opd-jax study --config configs/study.py:tiny --workdir runs/study [--redo PHASE] [--check]

Entry points (jax and the training engine are imported lazily, inside them):

  * `run(config, workdir, redo=(), check=False) -> dict`: runs every phase that is not complete
    (`phases.py`), renders the report, and returns `{'ok', 'failed', 'report', 'phases'}`; with
    `check`, `ok` is False when an acceptance threshold fails (each failure names it).
  * `render_report(workdir, config=None) -> path` (alias `report`): re-renders
    `WORKDIR/report/` from the phases' outputs.
  * `check(results) -> list[str]`: the failed thresholds of a results dict (`verdicts.check`).

Modules: `phases` (the resumable DAG), `runs` (the study's phases), `paper` (the paper's numbers and
claims as data), `verdicts` (verdicts computed from data), `figures`, `reporting` (report.md,
results.json).
"""

from __future__ import annotations

from opd_jax.study.verdicts import check


def run(config, workdir, redo=(), check=False, log=print) -> dict:
  from opd_jax.study import runs
  return runs.run(config, workdir, redo=redo, check=check, log=log)


def render_report(workdir, config=None):
  from opd_jax.study import runs
  return runs.render_report(workdir, config)


report = render_report

__all__ = ["run", "render_report", "report", "check"]
