"""Where the time goes: per-step phase times, tokens per second, model FLOP/s and MFU.

`PhaseClock` times the phases of each step WITHOUT blocking the step loop: the loop marks each
phase when it dispatches it (`clock.device(name, outputs)`) or when it finishes host work
(`clock.host(name, t0, t1)`), and a watcher thread waits for the device outputs in order and
stamps when each became ready. A step's wall time is from the previous step's end (the readiness
of its update) to its own end; each phase's time is its interval clipped to that window (a device
phase starts when it was dispatched or when the previous phase finished, whichever is later; a host
phase counts only its time outside the device phases, so time spent waiting on the device counts
for the device phase), and `time/other_s` is the rest (dispatch and Python glue): the split adds
up to the wall time. No host <-> device copy is added: the watcher only waits for readiness.
Under synchronous dispatch (the CPU backend as `opd_jax.host_malloc.tune` sets it) a call returns
once its work is done, so a device phase is taken to start at the loop's previous mark instead of
at its dispatch.

FLOPs are model FLOPs, counted from shapes (`model_flops`): 2 N per token for a forward pass
(N = matmul parameters, the unembedding included, the embedding lookup not), 6 N for forward +
backward, plus causal attention counted once (half of the full T x T score and value matmuls). The
peak is measured once per run on CPU (`measured_peak_flops`: a jitted float32 matmul) and taken
from the vendor figure (bf16 dense) on TPU / GPU.
"""

from __future__ import annotations

import dataclasses
import pathlib
import queue
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from opd_jax.models.config import ModelConfig

# Dense bf16 peak per chip (vendor figures), by `jax.Device.device_kind` prefix.
VENDOR_PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


# -- FLOPs ----------------------------------------------------------------------------------------
def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (attention and MLP projections, the
  unembedding; for MoE the routed experts per token, not all of them)."""
  d, hd = cfg.d_model, cfg.head_dim
  attn = d * hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads * hd * d
  if getattr(cfg, "num_experts", 0):
    ff = getattr(cfg, "moe_d_ff", 0) or cfg.d_ff
    mlp = 3 * d * ff * cfg.experts_per_token + d * cfg.num_experts  # experts used + router
  else:
    mlp = 3 * d * cfg.d_ff
  return cfg.n_layers * (attn + mlp) + d * cfg.vocab_size


def model_flops(cfg: ModelConfig, rows: int, seq_len: int, *, backward: bool) -> float:
  """Model FLOPs of one forward (or forward + backward) pass over [rows, seq_len] tokens."""
  tokens = rows * seq_len
  dense = 2.0 * matmul_params(cfg) * tokens
  # Scores q.k and the value mix: 2 * 2 * T * H * hd per token for full attention; causal: half.
  attn = 2.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len * tokens
  fwd = dense + attn
  return 3.0 * fwd if backward else fwd


def measured_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a jitted float32 n x n matmul on the default backend (all of its cores)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def _cpuinfo_fields(cpuinfo_path: str) -> dict[str, str]:
  """The fields of the first processor block of /proc/cpuinfo ({} if it cannot be read)."""
  fields: dict[str, str] = {}
  try:
    with open(cpuinfo_path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          if fields:
            break
          continue
        key, sep, value = line.partition(":")
        if sep:
          fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}   # sysfs cache sizes: '48K', '260M'


def _last_level_cache(cache_dir: str) -> tuple[int, int] | None:
  """(level, bytes) of the largest-level data or unified cache of CPU 0 (sysfs), or None."""
  best = None
  for index in sorted(pathlib.Path(cache_dir).glob("index*")):
    try:
      level = int((index / "level").read_text().strip())
      kind = (index / "type").read_text().strip()
      size = (index / "size").read_text().strip()
    except (OSError, ValueError):
      continue
    unit = _SIZE_UNITS.get(size[-1:])
    if kind == "Instruction" or unit is None or not size[:-1].isdigit():
      continue
    if best is None or level > best[0]:
      best = (level, int(size[:-1]) * unit)
  return best


def cpu_model(cpuinfo_path: str = "/proc/cpuinfo",
              cache_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> str:
  """The host CPU as printed with every benchmark result: /proc/cpuinfo's model name, then its
  family / model numbers and the last-level cache where the system gives them, e.g.
  'Intel(R) Xeon(R) Processor (family 6 model 207, 260 MiB L3)'. A speedup measured on one CPU
  need not hold on another, and under a hypervisor the name alone can be generic ('Intel(R)
  Xeon(R) Processor' covers several generations): the numbers tell them apart."""
  fields = _cpuinfo_fields(cpuinfo_path)
  name = fields.get("model name")
  if not name:
    import platform  # noqa: PLC0415
    name = platform.processor() or "unknown"
  details = []
  if fields.get("cpu family") and fields.get("model"):
    details.append(f"family {fields['cpu family']} model {fields['model']}")
  cache = _last_level_cache(cache_dir)
  if cache is not None:
    level, size = cache
    mib = size / (1 << 20)
    details.append(f"{mib:g} MiB L{level}" if mib >= 1 else f"{size >> 10} KiB L{level}")
  return f"{name} ({', '.join(details)})" if details else name


def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s of all the run's devices together, where the figure comes from): this host's
  (its devices' vendor figure, or a matmul measured on them) times the number of hosts, as the
  FLOPs of a step (`iteration_flops`) count the global batch. Hosts are taken to be alike."""
  dev = jax.local_devices()[0]
  hosts = jax.device_count() / jax.local_device_count()
  if dev.platform == "cpu":
    return measured_peak_flops() * hosts, "measured (f32 matmul, all cores)"
  for prefix, flops in VENDOR_PEAK_FLOPS.items():
    if dev.device_kind.startswith(prefix):
      return flops * jax.device_count(), f"vendor bf16 ({dev.device_kind})"
  return measured_peak_flops(4096) * hosts, f"measured (f32 matmul, {dev.device_kind})"


# -- the clock ------------------------------------------------------------------------------------
def synchronous_dispatch() -> bool:
  """Whether a jitted call returns only once its work is done: the CPU backend with
  `jax_cpu_enable_async_dispatch` off (`opd_jax.host_malloc.tune`)."""
  return jax.default_backend() == "cpu" and not jax.config.read("jax_cpu_enable_async_dispatch")


@dataclasses.dataclass
class _Step:
  started: float = dataclasses.field(default_factory=time.perf_counter)
  device: list = dataclasses.field(default_factory=list)   # (name, dispatch time, ready time)
  host: list = dataclasses.field(default_factory=list)     # (name, start, end)
  end: float | None = None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)


class PhaseClock:
  """Per-step phase times measured off the step loop's thread (module docstring)."""

  _END = object()

  def __init__(self):
    self._steps: dict[int, _Step] = {}
    self._current: int | None = None
    self._last_end: float | None = None
    self._sync = synchronous_dispatch()
    self._mark: float | None = None   # the loop's latest mark (start, host or device)
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._watch, name="opd_jax-phase-clock", daemon=True)
    self._thread.start()

  def start(self, step: int) -> None:
    self._current = step
    self._steps[step] = _Step()
    self._mark = self._steps[step].started

  def device(self, name: str, outputs: Any) -> None:
    """Marks a device phase dispatched now whose results are `outputs` (any pytree). Under
    synchronous dispatch the call that made `outputs` has already run: the phase began at the
    previous mark."""
    now = time.perf_counter()
    began = self._mark if self._sync and self._mark is not None else now
    self._mark = now
    self._queue.put((self._current, name, outputs, began))

  def host(self, name: str, t0: float, t1: float | None = None) -> None:
    """Records a host phase that ran from t0 to t1 (default: now)."""
    t1 = time.perf_counter() if t1 is None else t1
    self._steps[self._current].host.append((name, t0, t1))
    self._mark = t1 if self._mark is None else max(self._mark, t1)

  def finish(self, step: int, outputs: Any) -> None:
    """Marks the step's last phase (the update) and closes the step."""
    self.device("update", outputs)
    self._queue.put((step, self._END, None, None))

  def _watch(self):
    while True:
      step, name, outputs, dispatched = self._queue.get()
      if step is None and name is None:
        return
      rec = self._steps.get(step)
      if name is self._END:
        rec.end = rec.device[-1][2] if rec.device else time.perf_counter()
        rec.done.set()
        continue
      try:
        jax.block_until_ready(outputs)
      except Exception:  # noqa: BLE001 - a failed step surfaces in the loop, not here
        pass
      rec.device.append((name, dispatched, time.perf_counter()))

  def times(self, step: int, timeout: float = 60.0) -> dict[str, float]:
    """{'time/<phase>_s': seconds, 'time/step_s', 'time/other_s'} of a finished step."""
    rec = self._steps.get(step)
    if rec is None or not rec.done.wait(timeout):
      return {}
    del self._steps[step]
    # From the previous step's end, or this step's start if the loop did other work in between
    # (a checkpoint, an eval): that work belongs to no step.
    begin = rec.started if self._last_end is None else max(self._last_end, rec.started)
    end = rec.end
    self._last_end = end
    # Device phases run one after another: each from its dispatch (or the previous device
    # phase's end) to its readiness. Host phases (main thread, one after another) count only
    # their time outside the device phases: a host phase waiting on the device (verify on the
    # sampler) is the device's time.
    out: dict[str, float] = {}
    device_spans = []
    prev_ready = begin
    for name, dispatched, ready in rec.device:
      start, stop = max(dispatched, prev_ready, begin), min(ready, end)
      out[f"time/{name}_s"] = out.get(f"time/{name}_s", 0.0) + max(0.0, stop - start)
      if stop > start:
        device_spans.append((start, stop))
      prev_ready = max(prev_ready, ready)
    for name, t0, t1 in rec.host:
      start, stop = max(t0, begin), min(t1, end)
      busy = sum(max(0.0, min(stop, b) - max(start, a)) for a, b in device_spans)
      out[f"time/{name}_s"] = out.get(f"time/{name}_s", 0.0) + max(0.0, stop - start - busy)
    wall = max(end - begin, 1e-9)
    out["time/step_s"] = wall
    out["time/other_s"] = max(0.0, wall - sum(v for k, v in out.items() if k != "time/step_s"))
    return out

  def close(self):
    self._queue.put((None, None, None, None))
    self._thread.join(timeout=5)


class NullClock:
  """A PhaseClock that records nothing (loop.time_phases=False)."""

  def start(self, step):
    pass

  def device(self, name, outputs):
    pass

  def host(self, name, t0, t1=None):
    pass

  def finish(self, step, outputs):
    pass

  def times(self, step, timeout=60.0):
    return {}

  def close(self):
    pass


def iteration_flops(plan) -> float:
  """Model FLOPs of one train step of a run plan: the rollout's sampling and scoring passes
  (each a forward over [rows, prompt + response]) and the update's forward + backward passes."""
  rows, seq = plan.rows, plan.seq_len
  student = plan.student
  if not plan.recipe.uses_rollouts:
    return model_flops(student, rows, seq, backward=True)
  knobs = plan.recipe.rollout_knobs(plan)
  teacher = plan.teacher or student
  # Several routed teachers each run over the whole batch (`train.teachers`); rollout.policy
  # 'teacher' always has a single teacher.
  teachers = teacher if isinstance(teacher, tuple) else (teacher,)
  sampler = teacher if knobs.policy == "teacher" else student
  total = model_flops(sampler, rows, seq, backward=False)
  fwd_s = model_flops(student, rows, seq, backward=False)
  fwd_t = sum(model_flops(t, rows, seq, backward=False) for t in teachers)
  if knobs.score_student and (knobs.policy == "teacher" or knobs.recompute_old_logp):
    total += fwd_s
  if knobs.teacher_reward and knobs.policy != "teacher":
    total += fwd_t
  if knobs.needs_kl:
    total += fwd_s + fwd_t
  if knobs.reference:
    total += fwd_s
  if knobs.value_head:
    total += fwd_s
  passes = getattr(plan.step_cfg, "epochs", 1)  # minibatches split the rows: epochs x all rows
  total += passes * model_flops(student, rows, seq, backward=True)
  if plan.recipe.step_takes_teacher(plan):
    total += passes * fwd_t  # the teacher's forward inside the step (direct route, CR-OPD)
  return total


def throughput(times: Mapping[str, float], tokens: Mapping[str, float], flops: float,
               peak: float) -> dict[str, float]:
  """Tokens/s per kind, model FLOP/s and MFU of one step from its wall time."""
  wall = times.get("time/step_s")
  if not wall:
    return {}
  out = {f"perf/{k}_tokens_per_s": v / wall for k, v in tokens.items()}
  out["perf/model_flops_per_s"] = flops / wall
  out["perf/mfu"] = flops / wall / peak if peak > 0 else 0.0
  return out
