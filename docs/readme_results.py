"""The README's results blocks, generated from the committed study reports under `docs/`.

  python docs/readme_results.py           # rewrite every block in README.md
  python docs/readme_results.py --check   # exit 1 if a block differs from its report

Each block sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in README.md; the
prose around the blocks is the README's own. Every number inside a block comes from a report's
`results.json` through `opd_jax.study.reporting`, so the README cannot drift from the reports
(`tests/test_readme_results.py` runs the check).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def load(study_dir: str) -> dict:
  """The results dict of the committed report `docs/<study_dir>/`."""
  return json.loads((ROOT / "docs" / study_dir / "results.json").read_text())


def _figures(r: dict, names, prefix: str) -> list[str]:
  return [f"![{f}]({prefix}{r['figures'][f]})" for f in names if f in r.get("figures", {})]


def _tiny() -> str:
  from opd_jax.study import reporting
  return reporting.readme_section(load("tiny_study"), fig_prefix="docs/tiny_study/",
                                  heading=False)


def _scales() -> str:
  from opd_jax.study import reporting
  return reporting.scales_section({"tiny": load("tiny_study"), "small": load("small_study")})


def _small_figures() -> str:
  return "\n\n".join(_figures(load("small_study"), ("trajectories", "rank16", "accuracy"),
                              "docs/small_study/"))


def _regime_map() -> str:
  from opd_jax.study import reporting
  r = load("regime_map_study")
  return "\n\n".join([reporting.regime_map_section(r)]
                     + _figures(r, ("regime_map",), "docs/regime_map_study/"))


BLOCKS: dict[str, Callable[[], str]] = {"tiny": _tiny, "scales": _scales,
                                        "small_figures": _small_figures,
                                        "regime_map": _regime_map}


def _pattern(name: str) -> re.Pattern:
  """A block: its opening line, its content lines (none when empty), its closing line."""
  return re.compile(rf"(<!-- results:{name} -->\n)(?:(.*?)\n)??(<!-- /results:{name} -->)",
                    re.S)


def blocks_in(text: str) -> dict[str, str]:
  """{name: content} of every results block in `text`."""
  return {m.group(1): m.group(2) or "" for m in re.finditer(
      r"<!-- results:(\w+) -->\n(?:(.*?)\n)??<!-- /results:\1 -->", text, re.S)}


def render(text: str) -> str:
  """`text` with every block regenerated (a block's markers must appear exactly once)."""
  for name, make in BLOCKS.items():
    pat = _pattern(name)
    if len(pat.findall(text)) != 1:
      raise ValueError(f"README.md: expected one '<!-- results:{name} -->' block")
    body = make().strip("\n")
    text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
  return text


def main(argv: list[str]) -> int:
  text = README.read_text()
  new = render(text)
  if "--check" in argv:
    stale = [n for n, body in blocks_in(new).items() if blocks_in(text).get(n) != body]
    for n in stale:
      print(f"README.md: block '{n}' differs from its report; run python docs/readme_results.py",
            file=sys.stderr)
    return 1 if stale else 0
  README.write_text(new)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  sys.exit(main(sys.argv[1:]))
