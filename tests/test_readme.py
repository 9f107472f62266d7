"""The README's quickstart runs as written."""

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
