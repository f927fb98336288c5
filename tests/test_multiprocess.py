"""Two real local processes (CPU collectives via jax.distributed) give the single-process losses,
and the checkpoint they write collectively restores to the single-process parameters."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

import mp_worker
from opd_jax.models import transformer
from opd_jax.train import checkpoint as ckpt_lib
from opd_jax.train import mesh as mesh_lib
from opd_jax.train import steps

WORKER = pathlib.Path(__file__).resolve().parent / "mp_worker.py"
TIMEOUT_S = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _single_process_reference():
  model_cfg, tx, step_cfg = mp_worker.setup()
  m = mesh_lib.make_mesh(mesh_lib.MeshConfig(shape=(1, 1, 1)))
  graphdef, params = mesh_lib.init_sharded_params(model_cfg, m, seed=0)
  shardings = mesh_lib.state_shardings(tx, mesh_lib.param_shardings(model_cfg, m),
                                       transformer.abstract_params(model_cfg))
  state = mesh_lib.init_sharded_state(params, tx, 0, shardings)
  batches = mp_worker.global_batches()
  step = steps.jit_step(steps.sft_step, m, shardings, mesh_lib.batch_shardings(batches[0], m),
                        graphdef=graphdef, tx=tx, cfg=step_cfg)
  losses = []
  for batch in batches:
    state, metrics = step(state, mesh_lib.global_batch(batch, m))
    losses.append(float(metrics["train/loss"]))
  return losses, jax.device_get(state.params)


def test_two_processes_match_single_process(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  env.pop("OPD_COORDINATOR", None)
  procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), "2",
                             str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    ref_losses, ref_params = _single_process_reference()
    outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"worker {i} failed:\n{err[-4000:]}"
  result = json.loads(outs[0][0].strip().splitlines()[-1])
  assert result["devices"] == 2
  np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-5)
  loaded, cfg = ckpt_lib.load_params_and_config(tmp_path / "ckpt")
  assert cfg == mp_worker.setup()[0]
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  _, init = transformer.init(cfg, 0)  # and the steps did move the parameters
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(init)))
  assert moved > 1e-3
