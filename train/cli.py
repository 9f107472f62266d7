"""What the command-line tools share: one-line usage errors, Ctrl-C, XLA:CPU flags, and
JAX's compilation cache.

Imports nothing heavy at module level (JAX is imported where needed), so that a tool can
install :func:`exit_quietly_on_interrupt` before its own imports.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import signal
import sys
import threading
from typing import Optional


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows ``(default: X)`` only where there is a default to show: not for required flags,
  switches, or defaults of None (whose help says what happens instead)."""

  def _get_help_string(self, action):
    if (action.required or action.default in (None, False, argparse.SUPPRESS)
        or "default" in (action.help or "")):
      return action.help
    return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
  """argparse with one-line errors: ``prog: error: <what>; see prog --help``, exit status 2,
  without the usage block; an invalid choice names the valid ones and the closest to it."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


def one_line(message: str) -> str:
  """argparse's error message, with the closest valid choice added for a typo."""
  m = re.search(r"invalid choice: '?([^'(]*?)'? \(choose from (.*)\)$", message)
  if m:
    choices = [c.strip(" '\"") for c in m.group(2).split(",")]
    close = closest(m.group(1), choices)
    message = (message[:m.start()] + f"invalid choice {m.group(1)!r}; choose from "
               f"{', '.join(choices)}" + (f" (did you mean {close!r}?)" if close else ""))
  return " ".join(message.split())


def closest(word: str, choices) -> Optional[str]:
  """The one choice clearly closest to ``word`` (difflib's ratio at least 0.6, and ahead of
  the runner-up), or None: ``vgg12`` is as near vgg11 as vgg13, so nothing is guessed."""
  ratio = lambda c: difflib.SequenceMatcher(None, word, c).ratio()
  ranked = sorted(choices, key=ratio, reverse=True)
  if not ranked or ratio(ranked[0]) < 0.6:
    return None
  if len(ranked) > 1 and ratio(ranked[1]) == ratio(ranked[0]):
    return None
  return ranked[0]


def _interrupted(signum, frame):  # pylint: disable=unused-argument
  print("interrupted", file=sys.stderr, flush=True)
  os._exit(130)  # pylint: disable=protected-access


def exit_quietly_on_interrupt() -> None:
  """From now on Ctrl-C prints one line, ``interrupted``, and exits 130 at once: for the
  moments outside ``main``'s own handling (loading the imports, shutting down after the
  summary), where Python would print a traceback or die of the signal (exit -2)."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _interrupted)


def raise_on_interrupt() -> None:
  """Ctrl-C raises KeyboardInterrupt again (Python's default), for ``main`` to handle."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)


# XLA:CPU's concurrency-optimized scheduler orders independent ops so they can run at the same
# time; on a few cores two YNNPACK convolutions then contend for the same cores and caches.
# Turned off, a full-width VGG11 step ran 4-8 % faster here and VGG16 the same
# (benchmarks/README.md). Only XLA:CPU reads this flag: GPU and TPU compilations are unaffected.
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def env_int(name: str) -> Optional[int]:
  v = os.environ.get(name)
  try:
    return int(v) if v else None
  except ValueError:
    return None


def default_compilation_cache_dir(environ=os.environ) -> str:
  """``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/optax_bm/jax`` (~/.cache/...)."""
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "optax_bm", "jax")


def enable_compilation_cache(directory: str, environ=os.environ) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in ``directory``; returns it, or None (with a
  warning) if it cannot be created. Every compilation of 0.5 s or more is cached (unless
  ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise)."""
  import jax  # pylint: disable=import-outside-toplevel
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    print(f"warning: no compilation cache: cannot create {directory} "
          f"({e.strerror or type(e).__name__})", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory


def set_cpu_xla_flags(environ=os.environ) -> None:
  """Adds :data:`CPU_XLA_FLAGS` to ``$XLA_FLAGS``, leaving alone any flag the user already set.

  XLA reads ``$XLA_FLAGS`` once, when the first backend starts, so this must run before the
  process's first JAX computation (``jax.jit(..., compiler_options=...)`` does not reach this
  scheduler flag: the compiled schedule stays the same).
  """
  flags = environ.get("XLA_FLAGS", "").split()
  names = {f.split("=", 1)[0] for f in flags}
  flags += [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in names]
  environ["XLA_FLAGS"] = " ".join(flags)
