"""What the command-line tools share: one-line usage errors, XLA:CPU flags, compilation cache."""

from __future__ import annotations

import os
import sys
from typing import Optional

import jax


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
