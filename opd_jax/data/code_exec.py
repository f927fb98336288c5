"""Sandboxed execution of untrusted Python programs (model output) against tests.

The only place in opd_jax where model output is executed. Everything else treats it as data.

Test format (the `answer` string of a code example is this JSON; `parse_tests`):

    call tests   {"fn": "f", "calls": [[[arg, ...], expected], ...]}
                 the program is executed once as a module; then for each case the trusted driver
                 calls fn(*args) (fn not defined at module level: the method of one instance
                 `Solution()` of the program's `Solution` class, the LeetCode / LiveCodeBench
                 convention) and writes json.dumps(result) on its own line. A case passes iff
                 that value == `expected` after a JSON round trip (assert semantics: tuples compare
                 as lists, 7.0 == 7; a result JSON cannot encode fails the case).
                 An exception inside a call fails that case only.
    stdio tests  {"io": [["stdin text", "expected stdout"], ...]}
                 the program runs once per case with that stdin; a case passes iff its stdout equals
                 the expected text up to trailing whitespace on each line and trailing blank lines.

The expected values never enter the sandbox (only the arguments / stdin do), and the parent does all
comparisons, so a program can only pass by printing the right values.

Outcome reasons (`REASONS`): pass (every case passed), fail (ran to the end, some case wrong, or its
output overflowed the cap), timeout (wall-clock limit or CPU-time limit), crash (uncaught exception at
module level, missing fn, non-zero exit, killed by a signal), memory (MemoryError under the
address-space cap), compile_error (SyntaxError / ValueError from compile()), sandbox_error (our own
setup failed: counted apart, never blamed on the program).

Containment (`run`), one fresh process per program run:
  * process: `python -I -S -B code_exec.py` (isolated mode, no site-packages: stdlib only) started with
    start_new_session=True (its own session / process group), close_fds=True (no inherited sockets or
    files), a scrubbed environment (PATH, LANG, HOME=TMPDIR=cwd; nothing from the parent), cwd a fresh
    empty temporary directory removed afterwards.
  * limits (setrlimit in the trusted harness before the program runs): RLIMIT_CPU, RLIMIT_AS,
    RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_NPROC; PR_SET_NO_NEW_PRIVS (setuid binaries
    cannot raise privileges).
  * when the parent runs as root with CAP_SYS_ADMIN (isolation 'full', our containers): the
    harness unshares mount, network, IPC and UTS namespaces, makes every mount private, mounts a
    fresh /proc with hidepid=2 (the program sees only its own processes: not the parent's command
    line or environment), bind-mounts its cwd onto itself and remounts every other mount read-only
    (so /tmp, /dev/shm and the repository are read-only for the program), then drops to a
    dedicated unprivileged uid/gid (a fresh one per run, `_acquire_uid`; no supplementary groups).
    RLIMIT_NPROC then counts only the program's own processes, so a fork bomb stops at `max_procs`
    (as root it would not apply at all); the fresh network namespace has only a down loopback, so
    no connection (not even to 127.0.0.1) can be made.
  * wall clock (counted from the spawn, so it includes ~0.1-0.3 s of interpreter start and sandbox
    set-up): past `timeout_s` the process group is SIGKILLed; afterwards every process still owned
    by the run's uid (including ones that left the group with setsid / double fork) is SIGKILLed with
    `kill -9 -1` run as that uid, repeated until none is left.
  * stdout / stderr are read up to `max_output_bytes`; past that the program is killed.
  Root without CAP_SYS_ADMIN (isolation 'uid', e.g. a default Docker container; `isolation()` probes
  once and warns): the dedicated uid, rlimits (RLIMIT_NPROC exact), group kill and uid sweep apply,
  but there are no namespaces: the network is reachable and world-writable directories (/tmp,
  /dev/shm) are writable by the program.
  Not root (isolation 'rlimits'): rlimits, new session, scrubbed env, empty cwd and the wall-clock
  group kill still apply, but there is no network or filesystem isolation, RLIMIT_NPROC counts every
  process of the user (it is set to the user's current count + max_procs), and a process that calls
  setsid can outlive the group kill (bounded by RLIMIT_CPU only while it computes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

REASONS = ("pass", "fail", "timeout", "crash", "memory", "compile_error", "sandbox_error")

# Harness exit codes (a program can exit with them itself; that only changes which failure reason
# it gets, never turns a failure into a pass).
EXIT_COMPILE_ERROR = 113
EXIT_MEMORY = 114
EXIT_SETUP = 115

_UID_BASE = 100_000
_UIDS_PER_PROCESS = 4096


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one program run.

  timeout_s: wall clock of one run (the group is killed past it).
  cpu_s: RLIMIT_CPU in seconds (default: ceil(timeout_s)).
  memory_mb: RLIMIT_AS (address space; Python itself needs ~30 MB).
  file_size_mb: RLIMIT_FSIZE (largest file the program may write in its cwd).
  max_procs: RLIMIT_NPROC (processes + threads of the program, itself included).
  max_output_bytes: cap on each of stdout / stderr; past it the program is killed.
  max_open_files: RLIMIT_NOFILE.
  """

  timeout_s: float = 2.0
  cpu_s: int | None = None
  memory_mb: int = 512
  file_size_mb: int = 8
  max_procs: int = 16
  max_output_bytes: int = 1 << 16
  max_open_files: int = 64

  def __post_init__(self):
    if self.timeout_s <= 0:
      raise ValueError(f"Limits.timeout_s must be positive, got {self.timeout_s}")
    for name in ("memory_mb", "file_size_mb", "max_procs", "max_output_bytes", "max_open_files"):
      if getattr(self, name) < 1:
        raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")

  @property
  def cpu_seconds(self) -> int:
    return int(self.cpu_s) if self.cpu_s else max(1, math.ceil(self.timeout_s))


@dataclasses.dataclass(frozen=True)
class ExecResult:
  """One sandboxed run. status: 'exited' (returncode set), 'signaled' (returncode = -signal),
  'timeout' (wall clock, or SIGXCPU from the CPU limit), 'output_limit', 'sandbox_error'."""

  status: str
  returncode: int | None
  stdout: str
  stderr: str
  wall_s: float


@dataclasses.dataclass(frozen=True)
class Outcome:
  """Result of checking one program against its tests."""

  reason: str
  passed: int
  total: int
  detail: str = ""

  @property
  def fraction(self) -> float:
    return self.passed / self.total if self.total else 0.0


def is_root() -> bool:
  return hasattr(os, "geteuid") and os.geteuid() == 0


_iso_lock = threading.Lock()
_iso_cache: list[str] = []


def isolation() -> str:
  """The isolation level programs run under (module doc), probed once per process:
  'full' (root with CAP_SYS_ADMIN: namespaces, read-only mounts, fresh /proc, dedicated uid),
  'uid' (root without namespaces, e.g. a default Docker container: dedicated uid and rlimits, but
  no network or filesystem isolation: a warning is issued), 'rlimits' (not root)."""
  with _iso_lock:
    if not _iso_cache:
      level = "rlimits"
      if is_root():
        uid = _acquire_uid()
        try:
          res = _run_as("print('ok')", "", None, Limits(timeout_s=60.0), uid, namespaces=True)
        finally:
          _release_uid(uid)
        level = "full" if (res.status, res.stdout.strip()) == ("exited", "ok") else "uid"
        if level == "uid":
          import warnings
          warnings.warn("code_exec: namespaces are unavailable (" + res.stderr.strip()[-200:] +
                        "); sandboxed programs run without network or filesystem isolation",
                        RuntimeWarning, stacklevel=2)
      _iso_cache.append(level)
    return _iso_cache[0]


# -- sandbox uids: a fresh one per run ----------------------------------------------------------
# uid = _UID_BASE + (parent pid mod 2^18) * 4096 + counter: unique per run among this process's
# concurrent runs, and never one that still owns a process (a zombie of an earlier run not yet
# reaped by init would count against RLIMIT_NPROC of a reused uid).
_uid_lock = threading.Lock()
_uid_counter = [0]
_uids_in_use: set[int] = set()
_uids_used: set[int] = set()


def _acquire_uid() -> int:
  with _uid_lock:
    base = _UID_BASE + (os.getpid() % (1 << 18)) * _UIDS_PER_PROCESS
    for _ in range(_UIDS_PER_PROCESS):
      uid = base + _uid_counter[0] % _UIDS_PER_PROCESS
      _uid_counter[0] += 1
      if uid not in _uids_in_use and not processes_of_uid(uid, include_zombies=True):
        _uids_in_use.add(uid)
        _uids_used.add(uid)
        return uid
  raise RuntimeError("code_exec: every sandbox uid of this process still owns processes")


def _release_uid(uid: int) -> None:
  with _uid_lock:
    _uids_in_use.discard(uid)


def leftover_processes() -> dict[int, list[int]]:
  """{uid: live pids} over every sandbox uid this process has used (empty when all were killed)."""
  with _uid_lock:
    used = sorted(_uids_used)
  return {u: p for u in used if (p := processes_of_uid(u))}


def processes_of_uid(uid: int, include_zombies: bool = False) -> list[int]:
  """Processes whose effective uid is `uid` (live ones only unless include_zombies)."""
  out = []
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      if os.stat(f"/proc/{name}").st_uid != uid:
        continue
      with open(f"/proc/{name}/stat", "rb") as f:
        state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
      continue
    if include_zombies or state not in (b"Z", b"X"):
      out.append(int(name))
  return out


def _sweep_uid(uid: int, attempts: int = 50) -> None:
  """SIGKILL every process of `uid` (run `kill -9 -1` as that uid until none is left)."""
  kill = shutil.which("kill", path="/usr/bin:/bin") or "/bin/kill"
  for _ in range(attempts):
    if not processes_of_uid(uid):
      return
    subprocess.run([kill, "-9", "-1"], user=uid, group=uid, extra_groups=[], env={},
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   close_fds=True, check=False)
    time.sleep(0.005)


def _user_process_count() -> int:
  uid = os.getuid()
  return sum(1 for n in os.listdir("/proc") if n.isdigit() and _owned(n, uid))


def _owned(name: str, uid: int) -> bool:
  try:
    return os.stat(f"/proc/{name}").st_uid == uid
  except OSError:
    return False


_python_lock = threading.Lock()
_python_cache: list[str] = []


def _world_readable_chain(path: str) -> bool:
  """Whether every directory from / down to `path` lets 'others' in (and `path` lets them read)."""
  path = os.path.realpath(path)
  parts = path.split(os.sep)
  for i in range(2, len(parts) + 1):
    try:
      mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
    except OSError:
      return False
    if not mode & 0o001 or (i == len(parts) and not mode & 0o004):
      return False
  return True


def sandbox_python() -> str:
  """The interpreter that runs programs: `sys.executable`, unless (as root, where programs run as an
  unprivileged uid) its standard library is unreadable to other users (e.g. a pyenv build under
  /root); then the first system python3 whose library is. The harness needs Python >= 3.8."""
  with _python_lock:
    if _python_cache:
      return _python_cache[0]
    choice = sys.executable
    if is_root():
      for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(cand) or not _world_readable_chain(cand):
          continue
        try:
          lib = subprocess.run([cand, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                               capture_output=True, text=True, timeout=30, env={}).stdout.strip()
        except (OSError, subprocess.SubprocessError):
          continue
        if lib and _world_readable_chain(lib):
          choice = cand
          break
    _python_cache.append(choice)
    return choice


def _clean_env(cwd: str) -> dict[str, str]:
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
          "HOME": cwd, "TMPDIR": cwd, "PYTHONIOENCODING": "utf-8"}


def run(source: str, *, stdin: str = "", call: tuple[str, Sequence[Sequence[Any]]] | None = None,
        limits: Limits = Limits()) -> ExecResult:
  """Run `source` in the sandbox (module doc). With `call=(fn, args_list)` the harness executes the
  module, then writes one JSON line per call: [i, result] or [i, null, "ExceptionName"]."""
  level = isolation()
  if level == "rlimits":
    return _run_as(source, stdin, call, limits, None)
  uid = _acquire_uid()
  try:
    return _run_as(source, stdin, call, limits, uid, namespaces=level == "full")
  finally:
    _release_uid(uid)


def _run_as(source, stdin, call, limits: Limits, uid: int | None, *,
            namespaces: bool = False) -> ExecResult:
  root = uid is not None
  cwd = tempfile.mkdtemp(prefix="opd_sbx_")
  t0 = time.monotonic()
  proc = None
  try:
    os.chmod(cwd, 0o700)
    if root:
      os.chown(cwd, uid, uid)
    nproc = limits.max_procs if root else _user_process_count() + limits.max_procs
    job = {"source": source, "stdin": stdin, "uid": uid, "cwd": cwd, "namespaces": namespaces,
           "call": [call[0], [list(a) for a in call[1]]] if call else None,
           "limits": {"cpu": limits.cpu_seconds, "as": limits.memory_mb << 20,
                      "fsize": limits.file_size_mb << 20, "nproc": nproc,
                      "nofile": limits.max_open_files}}
    proc = subprocess.Popen(
        [sandbox_python(), "-I", "-S", "-B", os.path.abspath(__file__), "--sandbox-harness"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
        env=_clean_env(cwd), start_new_session=True, close_fds=True)
    try:
      proc.stdin.write(json.dumps(job).encode())
      proc.stdin.close()
    except (BrokenPipeError, OSError):
      pass
    deadline = t0 + limits.timeout_s
    out, err, why = _collect(proc, deadline, limits.max_output_bytes)
    if why is None and proc.poll() is None:  # both pipes closed, but the program still runs
      try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        why = "timeout"
    _kill_group(proc)
    if root:
      _sweep_uid(uid)
    rc = proc.wait()
    wall = time.monotonic() - t0
    if why is None:
      if rc == EXIT_SETUP:
        why = "sandbox_error"
      elif rc == -signal.SIGXCPU:
        why = "timeout"
      else:
        why = "signaled" if rc < 0 else "exited"
    return ExecResult(why, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), wall)
  except OSError as e:
    return ExecResult("sandbox_error", None, "", f"{type(e).__name__}: {e}", time.monotonic() - t0)
  finally:
    if proc is not None and proc.poll() is None:
      _kill_group(proc)
      proc.wait()
    if root:
      _sweep_uid(uid)
    shutil.rmtree(cwd, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, str | None]:
  """Read stdout / stderr until both close (or the main process exits and its pipes go quiet),
  the deadline passes ('timeout') or a stream exceeds `cap` ('output_limit')."""
  bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
  sel = selectors.DefaultSelector()
  for f in bufs:
    os.set_blocking(f.fileno(), False)
    sel.register(f, selectors.EVENT_READ)
  why = None
  exited_at = None
  try:
    while sel.get_map():
      now = time.monotonic()
      if now >= deadline:
        why = "timeout"
        break
      if exited_at is None and proc.poll() is not None:
        exited_at = now
      if exited_at is not None and now - exited_at > 0.2:
        break  # the main process is gone; leftover children holding the pipes are killed next
      for key, _ in sel.select(timeout=min(0.05, deadline - now)):
        try:
          chunk = os.read(key.fileobj.fileno(), 65536)
        except BlockingIOError:
          continue
        if not chunk:
          sel.unregister(key.fileobj)
          continue
        buf = bufs[key.fileobj]
        buf += chunk
        if len(buf) > cap:
          del buf[cap:]
          why = "output_limit"
      if why:
        break
  finally:
    sel.close()
  return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), why


# -- tests ----------------------------------------------------------------------------------------
def parse_tests(spec: str | dict) -> dict:
  """Validate a test spec (module doc) given as JSON text or a dict; returns the dict."""
  d = json.loads(spec) if isinstance(spec, str) else dict(spec)
  if "calls" in d:
    if not isinstance(d.get("fn"), str) or not d["fn"].isidentifier():
      raise ValueError(f"call tests need an identifier 'fn', got {d.get('fn')!r}")
    if not d["calls"] or any(not isinstance(c, (list, tuple)) or len(c) != 2
                             or not isinstance(c[0], (list, tuple)) for c in d["calls"]):
      raise ValueError("'calls' must be a non-empty list of [args_list, expected]")
    return d
  if "io" in d:
    if not d["io"] or any(not isinstance(c, (list, tuple)) or len(c) != 2
                          or not all(isinstance(x, str) for x in c) for c in d["io"]):
      raise ValueError("'io' must be a non-empty list of [stdin, expected_stdout] strings")
    return d
  raise ValueError("a test spec needs 'calls' (with 'fn') or 'io'")


def _normalise(x: Any) -> Any:
  return json.loads(json.dumps(x))


def _norm_text(s: str) -> str:
  return "\n".join(line.rstrip() for line in s.rstrip().splitlines())


def _failure(res: ExecResult) -> str | None:
  """The failure reason of a run that did not finish cleanly, else None."""
  if res.status == "sandbox_error":
    return "sandbox_error"
  if res.status == "timeout":
    return "timeout"
  if res.status == "output_limit":
    return "fail"
  if res.returncode == EXIT_COMPILE_ERROR:
    return "compile_error"
  if res.returncode == EXIT_MEMORY:
    return "memory"
  if res.returncode != 0:
    return "crash"
  return None


def check(source: str, tests: str | dict, limits: Limits = Limits()) -> Outcome:
  """Run `source` against `tests` (module doc) and classify the outcome."""
  spec = parse_tests(tests)
  if "calls" in spec:
    calls = spec["calls"]
    res = run(source, call=(spec["fn"], [c[0] for c in calls]), limits=limits)
    results = {}
    for line in res.stdout.splitlines():
      try:
        item = json.loads(line)
      except ValueError:
        continue
      if isinstance(item, list) and len(item) == 2 and isinstance(item[0], int):
        results.setdefault(item[0], item[1])
    passed = sum(1 for i, c in enumerate(calls) if i in results and results[i] == _normalise(c[1]))
    bad = _failure(res)
    if bad is not None:
      return Outcome(bad, passed, len(calls), _detail(res))
    return Outcome("pass" if passed == len(calls) else "fail", passed, len(calls))
  passed = 0
  for stdin, expected in spec["io"]:
    res = run(source, stdin=stdin, limits=limits)
    bad = _failure(res)
    if bad is not None:
      return Outcome(bad, passed, len(spec["io"]), _detail(res))
    passed += _norm_text(res.stdout) == _norm_text(expected)
  total = len(spec["io"])
  return Outcome("pass" if passed == total else "fail", passed, total)


def _detail(res: ExecResult) -> str:
  tail = res.stderr.strip().splitlines()[-1:] if res.stderr.strip() else []
  return f"{res.status} rc={res.returncode}" + (f": {tail[0][:160]}" if tail else "")


_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.S)


def extract_program(response: str) -> str:
  """The program in a response: the last fenced code block if there is one, else the whole text."""
  blocks = _FENCE_RE.findall(response)
  return blocks[-1] if blocks else response


# -- the harness (runs in the sandboxed process; stdlib only) ---------------------------------------
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


def _isolate_as_root(cwd: str) -> None:
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)

  def ok(r, what):
    if r != 0:
      raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

  ok(libc.unshare(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS), "unshare")
  ok(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
  c = cwd.encode()
  # A fresh procfs where the program sees only its own uid's processes (not the training process's
  # command line, nor any other process).
  ok(libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"hidepid=2"),
     "mount /proc hidepid=2")
  ok(libc.mount(c, c, None, _MS_BIND, None), "bind cwd")
  ok(libc.mount(None, c, None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV, None), "cwd flags")
  keep = {"nodev": _MS_NODEV, "noexec": _MS_NOEXEC}  # per-mount flags kept as they were
  points: dict[str, int] = {}
  with open("/proc/self/mountinfo") as f:
    for line in f:
      fields = line.split()
      flags = 0
      for opt in fields[5].split(","):
        flags |= keep.get(opt, 0)
      points[fields[4].replace("\\040", " ")] = flags  # the last (top) mount of a path wins
  for mp in sorted(set(points) - {cwd}, key=len):
    r = libc.mount(None, mp.encode(), None,
                   _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | points[mp], None)
    if r != 0 and mp in ("/", "/tmp", "/dev/shm", "/var/tmp", "/run"):
      ok(r, f"read-only {mp}")
  os.chdir(cwd)  # enter the bind mount (the old cwd reference points into the read-only mount)


def _harness_main() -> None:
  import builtins
  import io
  import resource
  try:
    job = json.loads(sys.stdin.buffer.read())
    fd = os.memfd_create("stdin")
    data = job["stdin"].encode()
    while data:
      data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)
    os.close(fd)
    sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                 encoding="utf-8")
    uid, lim = job["uid"], job["limits"]
    if job["namespaces"]:
      _isolate_as_root(job["cwd"])
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    cpu = lim["cpu"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
      raise OSError("PR_SET_NO_NEW_PRIVS failed")
    if uid is not None:
      os.setgroups([])
      os.setresgid(uid, uid, uid)
      os.setresuid(uid, uid, uid)
      if os.getuid() != uid or os.geteuid() != uid:
        raise OSError("setuid failed")
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.closerange(3, 1 << 16)
    call = job["call"]
    source = job["source"]
    sys.argv = ["solution.py"]
    sys.path[:] = [p for p in sys.path if p and os.path.isdir(p)]
    out = os.fdopen(os.dup(1), "w", encoding="utf-8") if call else None
    resource.setrlimit(resource.RLIMIT_AS, (lim["as"], lim["as"]))
  except BaseException as e:  # noqa: BLE001 -- our setup failed: never blame the program
    try:
      sys.stderr.write(f"sandbox setup failed: {type(e).__name__}: {e}\n")
      sys.stderr.flush()
    finally:
      os._exit(EXIT_SETUP)
  del job
  try:
    code = compile(source, "solution.py", "exec")
  except (SyntaxError, ValueError, OverflowError) as e:
    sys.stderr.write(f"compile error: {type(e).__name__}: {e}\n")
    sys.stderr.flush()
    os._exit(EXIT_COMPILE_ERROR)
  except MemoryError:
    os._exit(EXIT_MEMORY)
  module = {"__name__": "__main__" if not call else "solution", "__builtins__": builtins}
  try:
    exec(code, module)  # noqa: S102 -- the sandboxed program
    if call:
      fn = module.get(call[0])
      if fn is None and isinstance(module.get("Solution"), type):
        # LeetCode-style programs (LiveCodeBench functional tests): a method of `Solution`.
        fn = getattr(module["Solution"](), call[0], None)
      if not callable(fn):
        sys.stderr.write(f"crash: the program defines no function {call[0]!r}\n")
        sys.stderr.flush()
        os._exit(1)
      for i, args in enumerate(call[1]):
        try:
          line = json.dumps([i, fn(*args)])
        except MemoryError:
          raise
        except Exception as e:  # noqa: BLE001 -- a failing case
          line = json.dumps([i, None, type(e).__name__])
        out.write(line + "\n")
        out.flush()
  except MemoryError:
    os._exit(EXIT_MEMORY)
  except SystemExit:
    raise
  except BaseException:  # noqa: BLE001
    import traceback
    traceback.print_exc()
    _flush()
    os._exit(1)
  _flush()
  os._exit(0)


def _flush() -> None:
  for f in (sys.stdout, sys.stderr):
    try:
      f.flush()
    except BaseException:  # noqa: BLE001 -- a program may have closed or replaced them
      pass


if __name__ == "__main__" and sys.argv[1:] == ["--sandbox-harness"]:
  _harness_main()
