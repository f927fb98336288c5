"""The README's results blocks are generated from the committed reports (`docs/readme_results.py`)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _module():
  spec = importlib.util.spec_from_file_location("readme_results", ROOT / "docs/readme_results.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_readme_blocks_match_the_committed_reports(capsys):
  mod = _module()
  text = mod.README.read_text()
  assert set(mod.blocks_in(text)) == set(mod.BLOCKS)
  assert mod.main(["--check"]) == 0, capsys.readouterr().err


def test_render_rewrites_the_blocks_and_nothing_else(monkeypatch):
  mod = _module()
  monkeypatch.setattr(mod, "BLOCKS", {"a": lambda: "new a\n", "b": lambda: "| x \\| y |"})
  text = ("intro\n<!-- results:a -->\nold a\nmore\n<!-- /results:a -->\nmiddle\n"
          "<!-- results:b -->\n\n<!-- /results:b -->\nend\n")
  out = mod.render(text)
  assert out == ("intro\n<!-- results:a -->\nnew a\n<!-- /results:a -->\nmiddle\n"
                 "<!-- results:b -->\n| x \\| y |\n<!-- /results:b -->\nend\n")
  assert mod.blocks_in(out) == {"a": "new a", "b": "| x \\| y |"}
  assert mod.render(out) == out
  empty = "<!-- results:a -->\n<!-- /results:a -->\n<!-- results:b -->\n<!-- /results:b -->\n"
  assert mod.blocks_in(empty) == {"a": "", "b": ""}
  assert mod.blocks_in(mod.render(empty)) == {"a": "new a", "b": "| x \\| y |"}
  with pytest.raises(ValueError, match="results:a"):
    mod.render(out + "<!-- results:a -->\nx\n<!-- /results:a -->\n")
  with pytest.raises(ValueError, match="results:b"):
    mod.render("<!-- results:a -->\nx\n<!-- /results:a -->\n")
