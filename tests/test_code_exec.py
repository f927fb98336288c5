"""The code sandbox: correct / wrong programs, and hostile ones (each contained, none outliving its
timeout). The strong guarantees need root (fork bombs, setsid escapes: a dedicated uid) and
CAP_SYS_ADMIN (network, filesystem, /proc: namespaces), which is how this project's containers run;
elsewhere those tests are skipped (module doc of code_exec)."""

import json
import os
import pathlib
import time
import uuid

import pytest

from opd_jax.data import code_exec as ce

LIM = ce.Limits(timeout_s=1.5, memory_mb=256, max_output_bytes=4096, max_procs=8)
ADD1 = {"fn": "f", "calls": [[[1], 2], [[5], 6], [[-3], -2]]}
REPO = pathlib.Path(__file__).resolve().parents[1]
LEVEL = ce.isolation()
# The project's machines and CI run as root with CAP_SYS_ADMIN, where the sandbox's full isolation
# (namespaces, a dedicated uid) is available: the containment tests run there unconditionally and
# fail, rather than skip, on a machine where it is not.


def _check(src, tests=ADD1, limits=LIM):
  return ce.check(src, tests, limits)


def test_correct_wrong_and_partial_programs():
  assert _check("def f(x):\n  return x + 1\n") == ce.Outcome("pass", 3, 3)
  out = _check("def f(x):\n  return x + 1 if x > 0 else 0\n")
  assert (out.reason, out.passed, out.total) == ("fail", 2, 3)
  out = _check("def f(x):\n  if x < 0: raise ValueError\n  return x + 1\n")
  assert (out.reason, out.passed) == ("fail", 2)  # an exception in one call fails that case only
  assert _check("def g(x):\n  return x\n").reason == "crash"  # no f
  assert _check("raise RuntimeError('boom')\ndef f(x): return x + 1\n").reason == "crash"
  assert _check("def f(x)\n  return x\n").reason == "compile_error"
  assert _check("import sys\nsys.exit(3)\n").reason == "crash"
  # Returned tuples compare as JSON lists; printing does not disturb the results.
  t = {"fn": "f", "calls": [[[2], [2, 4]], [["ab"], ["ab", "abab"]]]}
  assert _check("def f(x):\n  print('noise')\n  return (x, x * 2)\n", t).reason == "pass"


def test_stdio_tests():
  t = {"io": [["3 4\n", "7\n"], ["10 -2\n", "8"]]}
  assert _check("a, b = map(int, input().split())\nprint(a + b)\n", t) == ce.Outcome("pass", 2, 2)
  out = _check("a, b = map(int, input().split())\nprint(a * b)\n", t)
  assert (out.reason, out.passed) == ("fail", 0)
  with pytest.raises(ValueError, match="calls"):
    ce.parse_tests({"nothing": 1})
  with pytest.raises(ValueError, match="fn"):
    ce.parse_tests(json.dumps({"fn": "not an id", "calls": [[[1], 1]]}))


def test_extract_program():
  assert ce.extract_program("def f(x): return x") == "def f(x): return x"
  resp = "Here:\n```python\ndef f(x):\n  return 1\n```\nand better:\n```\ndef f(x):\n  return 2\n```"
  assert ce.extract_program(resp) == "def f(x):\n  return 2\n"


def _assert_no_leftovers():
  assert not ce.leftover_processes(), "a sandboxed process outlived its run"


def test_infinite_loop_and_sleep_are_killed_on_time():
  for src in ("while True:\n  pass\n", "import time\ntime.sleep(60)\n"):
    t0 = time.monotonic()
    assert _check(src).reason == "timeout"
    assert time.monotonic() - t0 < LIM.timeout_s + 1.0
  # CPU-time limit alone (wall limit larger): SIGXCPU is a timeout.
  out = _check("while True:\n  pass\n", limits=ce.Limits(timeout_s=5.0, cpu_s=1))
  assert out.reason == "timeout"
  _assert_no_leftovers()


def test_memory_hog_is_capped():
  for src in ("x = bytearray(2 * 1024**3)\n", "x = []\nwhile True:\n  x.append(' ' * 10**6)\n"):
    assert _check(src).reason == "memory"


def test_huge_output_is_capped():
  t0 = time.monotonic()
  res = ce.run("while True:\n  print('x' * 1000)\n", limits=LIM)
  assert res.status == "output_limit" and len(res.stdout) <= LIM.max_output_bytes
  assert time.monotonic() - t0 < LIM.timeout_s + 1.0
  assert _check("import sys\nsys.stderr.write('e' * 10**7)\n").reason == "fail"


def test_environment_is_scrubbed(monkeypatch):
  monkeypatch.setenv("OPD_SECRET_TOKEN", "hunter2")
  res = ce.run("import os\nprint(sorted(os.environ.items()))\n", limits=LIM)
  assert res.status == "exited" and "hunter2" not in res.stdout and "OPD_SECRET" not in res.stdout
  res = ce.run("print(open('/proc/self/environ').read())", limits=LIM)
  assert "hunter2" not in res.stdout


def test_no_inherited_file_descriptors():
  r, w = os.pipe()  # an open descriptor of the parent (as a socket would be)
  try:
    res = ce.run("import os\nprint(sorted(int(x) for x in os.listdir('/proc/self/fd')))\n",
                 limits=LIM)
    fds = json.loads(res.stdout)
    assert set(fds) <= {0, 1, 2, 3}, fds  # 3: the directory listdir itself opened
  finally:
    os.close(r)
    os.close(w)


def test_cwd_is_private_empty_and_removed():
  res = ce.run("import os\nprint(os.getcwd()); print(os.listdir('.'))\n"
               "open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())\n",
               limits=LIM)
  cwd, listing, content = res.stdout.splitlines()
  assert listing == "[]" and content == "ok"
  assert not os.path.exists(cwd)


def test_writes_outside_the_cwd_do_not_appear():
  target_tmp = f"/tmp/opd_sbx_escape_{uuid.uuid4().hex}"
  target_repo = REPO / f"opd_sbx_escape_{uuid.uuid4().hex}"
  target_shm = f"/dev/shm/opd_sbx_escape_{uuid.uuid4().hex}"
  for target in (target_tmp, str(target_repo), target_shm, "../escape_up"):
    src = f"open({target!r}, 'w').write('pwned')\n"
    out = _check(src)
    assert out.reason == "crash", out
    assert "Read-only file system" in out.detail or "Permission denied" in out.detail, out
  assert not os.path.exists(target_tmp) and not target_repo.exists()
  assert not os.path.exists(target_shm)
  # Nor through a subprocess shell.
  out = _check(f"import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {target_tmp}'])\n")
  assert not os.path.exists(target_tmp)
  # File-size cap inside the cwd.
  out = _check("open('big', 'wb').write(b'x' * (64 << 20))\n",
               limits=ce.Limits(timeout_s=2.0, file_size_mb=1))
  assert out.reason == "crash", out


def test_network_is_unreachable():
  import socket
  srv = socket.socket()
  srv.bind(("127.0.0.1", 0))
  srv.listen(1)
  port = srv.getsockname()[1]
  srv.settimeout(0.5)
  try:
    src = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
           "s.sendall(b'leak')\n")
    out = _check(src)
    assert out.reason == "crash" and "unreachable" in out.detail.lower(), out
    with pytest.raises(socket.timeout):
      srv.accept()
  finally:
    srv.close()


def test_runs_as_an_unprivileged_uid():
  res = ce.run("import os\nprint(os.getuid(), os.geteuid(), os.getgroups())\n", limits=LIM)
  uid, euid, groups = res.stdout.split(" ", 2)
  assert int(uid) != 0 and int(euid) != 0 and groups.strip() == "[]"
  assert _check("print(open('/root/.bashrc').read())\n").reason in ("crash",)


def test_fork_bomb_is_contained():
  src = ("import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n")
  t0 = time.monotonic()
  out = _check(src)
  assert out.reason in ("timeout", "crash"), out
  assert time.monotonic() - t0 < LIM.timeout_s + 3.0
  _assert_no_leftovers()


def test_detached_children_do_not_survive():
  # A child that leaves the process group (setsid) and sleeps: the uid sweep kills it.
  src = ("import os, time\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n"
         "    time.sleep(60)\n  os._exit(0)\n"
         "def f(x):\n  return x + 1\n")
  assert _check(src).reason == "pass"
  _assert_no_leftovers()


def test_process_count_cap_counts_only_the_program():
  # As root the program runs under its own uid, so RLIMIT_NPROC caps exactly its processes.
  src = ("import os, time\nn = 0\nfor _ in range(40):\n  try:\n    pid = os.fork()\n"
         "  except OSError:\n    break\n  if pid == 0:\n    time.sleep(30)\n    os._exit(0)\n  n += 1\n"
         "print(n)\n")
  res = ce.run(src, limits=LIM)
  assert res.status == "exited", res
  assert int(res.stdout) == LIM.max_procs - 1  # the program itself is the first process
  _assert_no_leftovers()


def test_other_processes_are_invisible(monkeypatch):
  monkeypatch.setenv("OPD_SECRET_TOKEN", "hunter2")
  parent = os.getpid()
  res = ce.run("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
               f"print(os.path.exists('/proc/{parent}'))\n", limits=LIM)
  pids, parent_visible = res.stdout.splitlines()
  assert len(json.loads(pids)) == 1 and parent_visible == "False", res
  out = _check(f"print(open('/proc/{parent}/environ').read())\n")
  assert out.reason == "crash" and "hunter2" not in out.detail


def test_closing_its_pipes_does_not_escape_the_clock():
  src = "import os\nos.close(1)\nos.close(2)\nwhile True:\n  pass\n"
  t0 = time.monotonic()
  assert _check(src).reason == "timeout"
  assert LIM.timeout_s - 0.2 < time.monotonic() - t0 < LIM.timeout_s + 1.0
  _assert_no_leftovers()


def test_full_isolation_whenever_the_capabilities_allow_it():
  with open("/proc/self/status") as f:
    cap_eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
  if ce.is_root() and cap_eff & (1 << 21):  # CAP_SYS_ADMIN: a downgrade would be a bug
    assert LEVEL == "full"


def test_uid_only_path_still_caps_processes():
  # The level used as root without namespaces (e.g. default Docker): dedicated uid, exact NPROC.
  src = ("import os, time\nn = 0\nfor _ in range(40):\n  try:\n    pid = os.fork()\n"
         "  except OSError:\n    break\n  if pid == 0:\n    time.sleep(30)\n    os._exit(0)\n  n += 1\n"
         "print(n, os.getuid())\n")
  uid = ce._acquire_uid()
  try:
    res = ce._run_as(src, "", None, LIM, uid, namespaces=False)
  finally:
    ce._release_uid(uid)
  n, got_uid = map(int, res.stdout.split())
  assert n == LIM.max_procs - 1 and got_uid == uid
  _assert_no_leftovers()


def test_rlimits_only_path_runs_and_times_out():
  # The path taken without root (no namespaces, no uid change): still limits, clock, clean env.
  res = ce._run_as("import os\nprint(os.environ.get('HOME') == os.getcwd())\n", "", None, LIM, None)
  assert (res.status, res.stdout.strip()) == ("exited", "True")
  t0 = time.monotonic()
  res = ce._run_as("while True:\n  pass\n", "", None, LIM, None)
  assert res.status == "timeout" and time.monotonic() - t0 < LIM.timeout_s + 1.0


def test_concurrent_runs_are_isolated_from_each_other():
  # Each run has its own uid: a fork bomb next to correct programs does not starve their
  # RLIMIT_NPROC, and the sweep after one run never touches another.
  from opd_jax.data import verifiers
  bomb = "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n"
  good = "import os\nif os.fork() == 0:\n  os._exit(0)\nos.wait()\ndef f(x):\n  return x + 1\n"
  v = verifiers.CodeVerifier(LIM, workers=4)
  got = v.score_many([bomb, good, good, "while True: pass\n", good], [json.dumps(ADD1)] * 5)
  assert [r.reason for r in got] == ["timeout", "pass", "pass", "timeout", "pass"], got
  _assert_no_leftovers()


def test_ordinary_programs_still_work():
  # Subprocesses, /dev/null, randomness, threads and files in the cwd are fine inside the sandbox.
  src = ("import subprocess, random, threading, os\n"
         "open(os.devnull, 'w').write('x')\n"
         "out = subprocess.run(['echo', 'hi'], capture_output=True, text=True).stdout.strip()\n"
         "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
         "open('f.txt', 'w').write(out)\n"
         "def f(x):\n  return x + 1 if open('f.txt').read() == 'hi' else None\n")
  assert _check(src).reason == "pass"
