"""The README's python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(capsys):
  text = README.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  exec(compile(blocks[0], "README.md:quickstart", "exec"), {"__name__": "__readme__"})
  out = capsys.readouterr().out
  first, last = map(float, re.search(r"loss (\S+) -> (\S+)", out).groups())
  assert last < first  # five steps on one batch fit it


def test_readme_hand_built_spec_example_runs(capsys):
  blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
            if "LayerSpec(" in b]
  assert blocks, "README has no hand-built spec example"
  exec(compile(blocks[0], "README.md:hand-built specs", "exec"), {"__name__": "__readme__"})
  assert "fc1" in capsys.readouterr().out
