"""Files written whole or not at all: every report, record and figure goes through here.

A reader (a resumed run, ``git add``, a person) never sees half a file: the text is written to a
temporary file beside the target, flushed to disk, and renamed over it (``os.replace`` is atomic
on POSIX filesystems); a failure removes the temporary file. Standard library only, so the
light report modules can use it without importing JAX.
"""

from __future__ import annotations

import os
import pathlib
from typing import Union

PathLike = Union[str, os.PathLike]


def _temporary(path: pathlib.Path) -> pathlib.Path:
  # Hidden, and unique per process: two writers of one file never share a temporary. The
  # target's suffix stays last (savefig picks the format by it).
  return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def write_text(path: PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` atomically (UTF-8)."""
  path = pathlib.Path(path)
  tmp = _temporary(path)
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def save_figure(fig, path: PathLike, dpi: int = 110) -> None:
  """Saves a matplotlib figure to ``path`` atomically (its format from the suffix)."""
  path = pathlib.Path(path)
  tmp = _temporary(path)
  try:
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
