"""Every relative link and #anchor in README.md and docs/*.md resolves inside the repository,
and so does every ``docs/<page>.md#<anchor>`` that code cites (GitHub's heading-slug rules)."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)
_CODE_REF = re.compile(r"(docs/[\w./-]+\.md)#([\w-]+)")


def slug(heading: str) -> str:
  """GitHub's anchor for a heading: rendered text, lowercased, punctuation dropped, spaces to -."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
  text = text.replace("`", "").replace("*", "")
  text = re.sub(r"<[^>]+>", "", text).strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: pathlib.Path) -> set:
  text = _FENCE.sub("", page.read_text())
  seen, out = {}, set()
  for heading in _HEADING.findall(text):
    s = slug(heading)
    n = seen.get(s, 0)
    seen[s] = n + 1
    out.add(s if n == 0 else f"{s}-{n}")
  return out | set(_HTML_ANCHOR.findall(text))


def links(page: pathlib.Path) -> list:
  text = _INLINE_CODE.sub("", _FENCE.sub("", page.read_text()))
  return _LINK.findall(text)


def check(page: pathlib.Path, target: str):
  """None if ``target`` (as written in ``page``) resolves, else why not."""
  if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
    return None
  path, _, anchor = target.partition("#")
  dest = (page.parent / path).resolve() if path else page
  try:
    dest.relative_to(REPO)
  except ValueError:
    return f"{target}: outside the repository"
  if not dest.exists():
    return f"{target}: no such file"
  if anchor:
    if dest.suffix != ".md":
      return f"{target}: an anchor into a file that is not markdown"
    if anchor not in anchors(dest):
      return f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}"
  return None


def test_slug_follows_github():
  assert slug("Does scale-amended SGD beat SGD?") == "does-scale-amended-sgd-beat-sgd"
  assert slug("How `annotate` finds the blocks") == "how-annotate-finds-the-blocks"
  assert slug("6.1 Weight decay before the scaling") == "61-weight-decay-before-the-scaling"
  assert slug("Local Hessians (`optax_bm.hessian`)") == "local-hessians-optax_bmhessian"


def test_pages_exist():
  assert (REPO / "docs" / "method.md").exists()
  assert len(PAGES) > 2


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves(page):
  found = links(page)
  problems = [why for t in found if (why := check(page, t))]
  assert not problems, "\n".join(problems)


def test_code_citations_of_docs_resolve():
  problems = []
  for folder in ("optax_bm", "train", "benchmarks", "tests"):
    for py in sorted((REPO / folder).rglob("*.py")):
      for path, anchor in _CODE_REF.findall(py.read_text()):
        why = check(REPO / "README.md", f"{path}#{anchor}")
        if why:
          problems.append(f"{py.relative_to(REPO)}: {why}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("tag, results", [
    ("table1-cpu-full", "table1_cpu_full"),
    ("table1-cpu-full-cifar100", "table1_cpu_full_cifar100"),
])
def test_results_page_shows_the_committed_table1(tag, results):
  """docs/results.md's copy of a CPU Table 1 is the committed report's, row for row."""
  text = (REPO / "docs" / "results.md").read_text()
  start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
  assert start in text and end in text, tag
  shown = [l for l in text[text.index(start):text.index(end)].splitlines() if l.startswith("|")]
  table = (REPO / "train" / "results" / results / "table1.md").read_text()
  committed = [l for l in table.splitlines() if l.startswith("|")]
  assert shown and shown == committed
