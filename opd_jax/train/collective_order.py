"""Audit of a compiled XLA program for collectives whose launch order can differ between
processes: a loop (or call) that holds collectives, and another collective of the same
computation that neither feeds it nor reads its result.

Why it matters (XLA:CPU, jaxlib 0.10): the CPU runtime's gloo communicator tags every collective
alike, so the processes pair their collectives in the order each one launches them. The thunk
executor orders collectives only by "scheduling edges", which fix when a thunk *starts*; a
`while` thunk starts, runs its body's compute, and reaches its first collective later, while the
next top-level collective may already have started on another thread. One process then waits in
the loop's all-gather and the other in the top-level all-reduce: a hang (bounded by
`mesh.CPU_COLLECTIVE_TIMEOUT_S`). A data dependency (`sharding.after`) orders the two for real.
TPU and GPU runtimes do not pair collectives this way: their programs, like single-process ones,
are left as written (`sharding.orders_collectives`).

`unordered_loop_collectives(compiled_text)` lists such pairs in `jax.jit(...).lower(...).compile()
.as_text()`. `plan.plan_run` counts them per phase; tests/test_plan.py asserts none in every
phase it plans under `sharding.ordered_collectives()` (the programs of a multi-process CPU run),
and tests/test_multiprocess.py none in the step two processes compile.
"""

from __future__ import annotations

import dataclasses
import re

# Opcodes that communicate between devices (and therefore processes).
COLLECTIVES = frozenset({
    "all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
    "collective-broadcast", "all-gather-start", "all-reduce-start", "collective-permute-start",
    "ragged-all-to-all"})
# Opcodes that run a nested computation as one thunk (the hazard's other side).
NESTED = frozenset({"while", "call", "conditional"})

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_SUBCOMPUTATION = re.compile(
    r"(?:condition|body|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  opcode: str
  operands: tuple[str, ...]
  called: tuple[str, ...]
  op_name: str


@dataclasses.dataclass(frozen=True)
class UnorderedPair:
  """A loop holding collectives and another collective (or loop) of the same computation with
  no data dependency either way. `*_source` is the JAX op name in the instruction's metadata."""

  computation: str
  loop: str
  loop_source: str
  other: str
  other_opcode: str
  other_source: str

  def __str__(self) -> str:
    return (f"{self.computation}: {self.loop} ({self.loop_source}) vs {self.other_opcode} "
            f"{self.other} ({self.other_source})")


def _balanced_end(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "(":
      depth += 1
    elif text[i] == ")":
      depth -= 1
      if depth == 0:
        return i
  raise ValueError(f"unbalanced parentheses in HLO: {text[:120]!r}")


def _parse_instruction(line: str) -> _Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  name, rest = m.groups()
  # Skip the result shape: a tuple "(...)" or one token.
  skip = _balanced_end(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  rest = rest[skip:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if op is None:
    return None
  opcode = op.group(1)
  close = _balanced_end(rest, len(opcode))
  operands = tuple(re.findall(r"%([\w.\-]+)", rest[len(opcode):close]))
  attrs = rest[close + 1:]
  called = _SUBCOMPUTATION.findall(attrs)
  branches = _BRANCHES.search(attrs)
  if branches:
    called += re.findall(r"%?([\w.\-]+)", branches.group(1))
  source = _OP_NAME.search(attrs)
  return _Instruction(name, opcode, operands, tuple(called), source.group(1) if source else "")


def parse_computations(text: str) -> dict[str, list[_Instruction]]:
  """{computation name: its instructions in schedule order} of an HLO module's text."""
  computations: dict[str, list[_Instruction]] = {}
  current = None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith(" "):
        current = computations.setdefault(m.group(2), [])
      continue
    if line.startswith("}"):
      current = None
      continue
    inst = _parse_instruction(line)
    if inst is not None:
      current.append(inst)
  return computations


def unordered_loop_collectives(text: str) -> list[UnorderedPair]:
  """Pairs (loop holding collectives, other collective or such loop) of one computation of the
  compiled HLO `text` that no data dependency orders (module docstring)."""
  computations = parse_computations(text)
  holds: dict[str, bool] = {}

  def holds_collectives(name: str) -> bool:
    if name not in holds:
      holds[name] = False  # (recursion guard)
      holds[name] = any(i.opcode in COLLECTIVES or any(holds_collectives(c) for c in i.called)
                        for i in computations.get(name, ()))
    return holds[name]

  pairs = []
  for comp, instructions in computations.items():
    by_name = {i.name: i for i in instructions}
    loops = [i for i in instructions
             if i.opcode in NESTED and any(holds_collectives(c) for c in i.called)]
    if not loops:
      continue
    others = [i for i in instructions if i.opcode in COLLECTIVES] + loops
    ancestors: dict[str, set[str]] = {}

    def upstream(name: str) -> set[str]:
      if name not in ancestors:
        seen, stack = set(), list(by_name[name].operands)
        while stack:
          x = stack.pop()
          if x in seen or x not in by_name:
            continue
          seen.add(x)
          stack.extend(ancestors[x] if x in ancestors else by_name[x].operands)
        ancestors[name] = seen
      return ancestors[name]

    seen_pairs = set()
    for loop in loops:
      for other in others:
        key = frozenset((loop.name, other.name))
        if other is loop or key in seen_pairs:
          continue
        seen_pairs.add(key)
        if other.name in upstream(loop.name) or loop.name in upstream(other.name):
          continue
        pairs.append(UnorderedPair(comp, loop.name, loop.op_name, other.name, other.opcode,
                                   other.op_name))
  return pairs
