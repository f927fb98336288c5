"""One process of the 2-process CPU test (tests/test_multiprocess.py), and the shared set-up.

Run as `python tests/mp_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR`: joins the coordinator,
builds the tiny model FSDP-sharded over every process's devices, runs `STEPS` sft steps on a
global batch assembled from each process's rows, writes a checkpoint collectively, restores past a
checkpoint broken on one process only (`_fallback_together`), and (process 0) prints {"losses",
"devices", "orbax_host_barriers", "ordered", "unordered_pairs", "fallback"} as its last line:
whether the step's program orders its collectives, and the pairs `collective_order` finds in it.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

STEPS = 3
BATCH, LENGTH, VOCAB = 4, 12, 128


def setup():
  """(model_cfg, tx, step_cfg) shared by the workers, the single-process reference and
  test_train_steps.py (same programs, so the persistent compile cache serves them all).

  The optimizer is SGD with momentum (its state mirrors the params, like Adam's): unlike Adam's
  first steps (~ lr * sign(g)), its update is linear in the gradient, so comparing parameters
  after a step compares gradients without amplifying float round-off of near-zero entries.
  """
  import optax
  from opd_jax.models import config
  from opd_jax.train import steps
  model_cfg = config.tiny(vocab_size=VOCAB, n_layers=1)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.2, momentum=0.9)
  return model_cfg, tx, steps.SFTStepConfig()


def global_batches():
  """The STEPS global SFT batches (numpy, identical in every process)."""
  rng = np.random.default_rng(1234)
  out = []
  for _ in range(STEPS):
    tokens = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    mask = np.ones((BATCH, LENGTH), bool)
    mask[0, :3] = False  # left padding on one row
    loss_mask = mask.copy()
    loss_mask[:, :5] = False
    out.append({"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask})
  return out


def main(argv):
  port, process_id, num_processes, workdir = argv[1], int(argv[2]), int(argv[3]), argv[4]
  import jax
  jax.config.update("jax_compilation_cache_dir",
                    str(pathlib.Path(__file__).resolve().parent.parent / ".cache" / "jax"))
  from opd_jax.models import transformer
  from opd_jax.train import checkpoint, mesh, steps
  assert mesh.maybe_initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes, jax.process_count()

  model_cfg, tx, step_cfg = setup()
  the_mesh = mesh.make_mesh(mesh.MeshConfig(shape=(1, -1, 1)))
  graphdef, params = mesh.init_sharded_params(model_cfg, the_mesh, seed=0)
  shardings = mesh.state_shardings(tx, mesh.param_shardings(model_cfg, the_mesh),
                                   transformer.abstract_params(model_cfg))
  state = mesh.init_sharded_state(params, tx, 0, shardings)
  batches = global_batches()
  rows = mesh.process_rows(BATCH)
  batch_shardings = mesh.batch_shardings(batches[0], the_mesh)
  step = steps.jit_step(steps.sft_step, the_mesh, shardings, batch_shardings, graphdef=graphdef,
                        tx=tx, cfg=step_cfg)
  from opd_jax.models import sharding
  from opd_jax.train import collective_order
  with jax.set_mesh(the_mesh):
    ordered = sharding.orders_collectives()
  first = mesh.global_batch({k: v[rows] for k, v in batches[0].items()}, the_mesh)
  unordered = collective_order.unordered_loop_collectives(step.compile(state, first).as_text())
  losses = []
  for batch in batches:
    local = {k: v[rows] for k, v in batch.items()}
    state, metrics = step(state, mesh.global_batch(local, the_mesh))
    losses.append(float(metrics["train/loss"]))
  with checkpoint.Checkpointer(workdir, model_cfg=model_cfg) as ckpt:
    ckpt.save(STEPS, state, {"losses": losses})
  fallback = _fallback_together(pathlib.Path(workdir + "_fallback"), state, tx, shardings,
                                model_cfg, process_id)
  from orbax.checkpoint._src.multihost import multihost as ocp_multihost
  host_barriers = ocp_multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.value
  if process_id == 0:
    print(json.dumps({"losses": losses, "devices": jax.device_count(),
                      "orbax_host_barriers": host_barriers, "ordered": ordered,
                      "unordered_pairs": [str(p) for p in unordered], "fallback": fallback}))


def _fallback_together(directory, state, tx, shardings, model_cfg, process_id):
  """Checkpoints 1 and 2, then process 1 breaks the files of checkpoint 2 that only it reads
  (its own shards): `restore_latest` must have both processes fall back to 1 together (each
  alone would restore another step, and the next collective would wait forever). Returns the
  restored checkpoint's meta 'which' on every process."""
  import warnings
  from opd_jax.models import transformer
  from opd_jax.train import checkpoint, mesh
  with checkpoint.Checkpointer(directory, model_cfg=model_cfg) as ckpt:
    ckpt.save(1, state, {"which": 1})
    ckpt.save(2, state, {"which": 2})
    ckpt.wait_until_finished()
    mesh.sync_processes("fallback_written")
    if process_id == 1:
      for f in (directory / "2" / "state" / "ocdbt.process_1" / "d").iterdir():
        f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes()))
    mesh.sync_processes("fallback_broken")
    abstract = mesh.abstract_state(tx, transformer.abstract_params(model_cfg), shardings)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", checkpoint.CorruptCheckpointWarning)
      _, meta = ckpt.restore_latest(abstract)
  return meta["which"]


if __name__ == "__main__":
  main(sys.argv)
