r"""Matrix-free spectral estimators on any symmetric positive semi-definite matvec.

Lanczos with optional full reorthogonalization (:func:`lanczos`: extreme eigenvalue
estimates), stochastic Lanczos quadrature (:func:`spectral_density`), Hutchinson and Hutch++
traces (:func:`hutchinson_trace`, :func:`hutchpp_trace`) and the mean eigenvalue
(:func:`mean_eigenvalue`), all in ``jax.lax`` loops so that they jit and keep memory at
``O(num_steps · dim)`` (Lanczos with reorthogonalization) or ``O(dim)``. They take a plain
``v -> H v`` function, e.g. the ``matvec`` of :func:`optax_bm.hessian.gauss_newton_operator`.

References:
  Lanczos (1950); Paige (1972). Lanczos quadrature: Golub & Meurant, *Matrices, Moments and
  Quadrature* (1994); Ghorbani, Krishnan & Xiao, *An Investigation into Neural Net Optimization
  via Hessian Eigenvalue Density*, ICML 2019. Hutchinson (1989); Hutch++: Meyer, Musco, Musco &
  Woodruff, SOSA 2021.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_bm.hessian.local import Matvec


def _dtype(dtype):
  """The working dtype: as given, else float64 if x64 is enabled, else float32."""
  return jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype


def _rademacher(key, shape, dtype):
  return jax.random.rademacher(key, shape, dtype=dtype)


class LanczosResult(NamedTuple):
  """The outcome of :func:`lanczos`.

  Attributes:
    ritz_values: ``(num_steps,)`` eigenvalues of the tridiagonal ``T``, ascending; the first and
      last are the extreme eigenvalue estimates (``ritz_values[-1] <= λ_max`` and
      ``ritz_values[0] >= λ_min`` up to rounding).
    weights: ``(num_steps,)`` squared first components of ``T``'s eigenvectors (they sum to 1):
      the Gauss quadrature weights of the start vector's spectral measure, so
      ``Σ_i weights_i f(ritz_i) ≈ v^T f(H) v / v^T v`` (stochastic Lanczos quadrature).
    alphas: ``(num_steps,)`` diagonal of ``T``.
    betas: ``(num_steps - 1,)`` off-diagonal of ``T`` (0 where the iteration broke down and
      restarted from a fresh random vector).
  """

  ritz_values: jax.Array
  weights: jax.Array
  alphas: jax.Array
  betas: jax.Array


def _tridiagonal(alphas, betas):
  return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


def lanczos(matvec: Matvec, dim: int, num_steps: int, key: jax.Array, *,
            reorthogonalize: bool = True, dtype: Any = None,
            start: Optional[jax.Array] = None,
            breakdown_tol: Optional[float] = None) -> LanczosResult:
  r"""Lanczos tridiagonalization of a symmetric operator: extreme eigenvalues and quadrature.

  Runs ``num_steps`` steps (``num_steps`` matvecs) of the symmetric Lanczos process from a
  Rademacher start vector (or ``start``), giving ``V^T H V = T`` tridiagonal with orthonormal
  ``V``. ``T``'s eigenvalues (Ritz values) interlace ``H``'s, and its extreme ones converge to
  ``H``'s extreme eigenvalues first; with the squared first components of its eigenvectors they
  are the Gauss quadrature rule of the start vector's spectral measure, exact for polynomials of
  degree ``< 2·num_steps``.

  With ``reorthogonalize=True`` every new vector is orthogonalized twice against all previous
  ones (memory ``(num_steps + 1) · dim``), which keeps ``V`` orthonormal to rounding and rules
  out spurious copies ("ghosts") of converged eigenvalues. Without it only two vectors are kept
  (memory ``O(dim)``); extreme eigenvalues still converge but may appear several times and the
  weights are less accurate. If the Krylov space is exhausted (``β_j`` below ``breakdown_tol``
  relative to the largest ``‖H v_j‖`` seen), the process restarts from a fresh random vector
  orthogonal to the basis (to the last two vectors without reorthogonalization) with
  ``β_j = 0``.

  Args:
    matvec: ``v -> H v`` on ``(dim,)`` vectors; ``H`` symmetric.
    dim: the dimension.
    num_steps: Lanczos steps, ``1 <= num_steps <= dim``.
    key: PRNG key (the start vector and any restart vectors); the result is a deterministic
      function of it.
    reorthogonalize: full reorthogonalization (see above).
    dtype: working dtype (default: float64 if x64 is enabled, else float32).
    start: optional start vector (normalized internally) instead of a random one; use it, with
      a matvec that projects, to run Lanczos on a subspace.
    breakdown_tol: relative breakdown threshold (default ``100 · eps`` of ``dtype``).

  Returns:
    A :class:`LanczosResult`.

  Example:
    >>> op = gauss_newton_operator(block, params, z, wrt="params")  # doctest: +SKIP
    >>> res = jax.jit(lambda k: lanczos(op.matvec, op.dim, 80, k))(jax.random.key(0))  # doctest: +SKIP
    >>> lam_min, lam_max = res.ritz_values[0], res.ritz_values[-1]  # doctest: +SKIP

  References:
    Lanczos (1950); Paige (1972); Golub & Meurant (1994).
  """
  num_steps = int(num_steps)
  dim = int(dim)
  if not 1 <= num_steps <= dim:
    raise ValueError(f"optax_bm.hessian.lanczos: need 1 <= num_steps <= dim, got num_steps="
                     f"{num_steps}, dim={dim}.")
  dtype = _dtype(dtype)
  tol = 100.0 * float(jnp.finfo(dtype).eps) if breakdown_tol is None else float(breakdown_tol)
  k_start, k_restart = jax.random.split(key)
  v0 = _rademacher(k_start, (dim,), dtype) if start is None else jnp.asarray(start, dtype)
  v0 = v0 / jnp.linalg.norm(v0)

  def orth(w, basis):  # classical Gram-Schmidt twice against the rows of basis
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)

  def next_vector(j, w, beta, anorm, basis):
    broke = beta <= tol * jnp.maximum(anorm, jnp.finfo(dtype).tiny)

    def restart(_):  # only computed on breakdown (both branches run under vmap)
      r = orth(_rademacher(jax.random.fold_in(k_restart, j), (dim,), dtype), basis)
      return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(dtype).tiny)

    v = jax.lax.cond(broke, restart, lambda _: w / jnp.where(broke, 1.0, beta), None)
    return v, jnp.where(broke, 0.0, beta)

  alphas0 = jnp.zeros((num_steps,), dtype)
  betas0 = jnp.zeros((num_steps,), dtype)
  if reorthogonalize:
    basis0 = jnp.zeros((num_steps + 1, dim), dtype).at[0].set(v0)

    def body(j, carry):
      basis, alphas, betas, anorm = carry
      v = basis[j]
      w = matvec(v).astype(dtype)
      anorm = jnp.maximum(anorm, jnp.linalg.norm(w))
      alpha = jnp.vdot(v, w)
      w = orth(w, basis)  # rows > j are zero, so this is against v_0..v_j
      beta = jnp.linalg.norm(w)
      v_next, beta = next_vector(j, w, beta, anorm, basis)
      basis = jax.lax.dynamic_update_index_in_dim(basis, v_next, j + 1, 0)
      return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), anorm

    _, alphas, betas, _ = jax.lax.fori_loop(
        0, num_steps, body, (basis0, alphas0, betas0, jnp.zeros((), dtype)))
  else:

    def body(j, carry):
      v_prev, v, beta_prev, alphas, betas, anorm = carry
      w = matvec(v).astype(dtype)
      anorm = jnp.maximum(anorm, jnp.linalg.norm(w))
      alpha = jnp.vdot(v, w)
      w = w - alpha * v - beta_prev * v_prev
      beta = jnp.linalg.norm(w)
      v_next, beta = next_vector(j, w, beta, anorm, jnp.stack([v_prev, v]))
      return v, v_next, beta, alphas.at[j].set(alpha), betas.at[j].set(beta), anorm

    carry = (jnp.zeros((dim,), dtype), v0, jnp.zeros((), dtype), alphas0, betas0,
             jnp.zeros((), dtype))
    _, _, _, alphas, betas, _ = jax.lax.fori_loop(0, num_steps, body, carry)

  betas = betas[:num_steps - 1]
  evals, evecs = jnp.linalg.eigh(_tridiagonal(alphas, betas))
  return LanczosResult(evals, jnp.square(evecs[0]), alphas, betas)


class SpectralDensity(NamedTuple):
  """Stochastic Lanczos quadrature nodes and weights (:func:`spectral_density`).

  Attributes:
    nodes: ``(num_probes, num_steps)`` Ritz values of each probe.
    weights: ``(num_probes, num_steps)`` quadrature weights, each probe's summing to
      ``1 / num_probes``: the estimated spectral density is ``Σ weights · δ(λ − nodes)``,
      a probability measure (eigenvalue counts divided by ``dim``).
  """

  nodes: jax.Array
  weights: jax.Array

  def mean(self) -> jax.Array:
    """The estimated mean eigenvalue ``tr(H) / dim`` (Hutchinson with the probes)."""
    return jnp.sum(self.nodes * self.weights)

  def mass_below(self, threshold) -> jax.Array:
    """The estimated fraction of eigenvalues ``<= threshold``."""
    return jnp.sum(jnp.where(self.nodes <= threshold, self.weights, 0.0))

  def smoothed(self, grid: jax.Array, sigma: float) -> jax.Array:
    """The density convolved with a Gaussian of width ``sigma``, on ``grid``."""
    d = (jnp.asarray(grid)[:, None] - self.nodes.reshape(-1)[None, :]) / sigma
    return jnp.exp(-0.5 * d * d) @ self.weights.reshape(-1) / (sigma * math.sqrt(2 * math.pi))


def spectral_density(matvec: Matvec, dim: int, num_steps: int, num_probes: int,
                     key: jax.Array, *, reorthogonalize: bool = True,
                     dtype: Any = None) -> SpectralDensity:
  r"""Stochastic Lanczos quadrature: an estimate of the whole eigenvalue distribution.

  Runs :func:`lanczos` from ``num_probes`` independent Rademacher vectors, one after the other
  (``jax.lax.map``: memory of one run), and averages their quadrature rules:

  .. math::

    \frac{1}{\dim}\sum_i f(λ_i) = \frac{1}{\dim}\operatorname{tr} f(H)
    ≈ \frac{1}{P} \sum_{p=1}^{P} \sum_{j} τ_{pj}^2 f(θ_{pj}).

  Args:
    matvec: ``v -> H v``; ``H`` symmetric.
    dim: the dimension.
    num_steps: Lanczos steps per probe.
    num_probes: number of random start vectors.
    key: PRNG key.
    reorthogonalize: see :func:`lanczos`.
    dtype: working dtype.

  Returns:
    A :class:`SpectralDensity`.

  Example:
    >>> sd = spectral_density(op.matvec, op.dim, 60, 8, jax.random.key(0))  # doctest: +SKIP
    >>> sd.mass_below(1e-8 * sd.nodes.max())  # fraction of (near-)zero eigenvalues  # doctest: +SKIP

  References:
    Golub & Meurant (1994); Ghorbani, Krishnan & Xiao, ICML 2019.
  """

  def one(k):
    r = lanczos(matvec, dim, num_steps, k, reorthogonalize=reorthogonalize, dtype=dtype)
    return r.ritz_values, r.weights

  nodes, weights = jax.lax.map(one, jax.random.split(key, num_probes))
  return SpectralDensity(nodes, weights / num_probes)


class TraceEstimate(NamedTuple):
  """A stochastic trace estimate.

  Attributes:
    value: the estimate of ``tr(H)`` (or of ``tr(H) / dim`` from :func:`mean_eigenvalue`).
    stderr: its standard error, estimated from the samples.
    num_matvecs: the number of products used.
  """

  value: jax.Array
  stderr: jax.Array
  num_matvecs: int


def hutchinson_trace(matvec: Matvec, dim: int, num_samples: int, key: jax.Array, *,
                     dtype: Any = None) -> TraceEstimate:
  r"""Hutchinson's trace estimator with Rademacher vectors.

  .. math::

    \operatorname{tr} H ≈ \frac{1}{S}\sum_{s=1}^{S} v_s^\top H v_s, \qquad v_s ∈ \{±1\}^{\dim},

  unbiased with variance ``2 (‖H‖_F² − Σ_i H_ii²) / S``. The samples are computed one after the
  other (``jax.lax.map``), so memory is that of one product.

  Args:
    matvec: ``v -> H v``.
    dim: the dimension.
    num_samples: ``S >= 2``.
    key: PRNG key; sample ``s`` uses ``jax.random.fold_in(key, s)``.
    dtype: working dtype (default: float64 if x64 is enabled, else float32).

  Returns:
    A :class:`TraceEstimate` (standard error from the sample standard deviation).

  Example:
    >>> t = hutchinson_trace(op.matvec, op.dim, 100, jax.random.key(0))  # doctest: +SKIP

  References:
    Hutchinson, *A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines*, 1989.
  """
  num_samples = int(num_samples)
  if num_samples < 2:
    raise ValueError("optax_bm.hessian.hutchinson_trace: num_samples must be >= 2.")
  dtype = _dtype(dtype)

  def one(i):
    v = _rademacher(jax.random.fold_in(key, i), (int(dim),), dtype)
    return jnp.vdot(v, matvec(v).astype(dtype))

  samples = jax.lax.map(one, jnp.arange(num_samples))
  return TraceEstimate(jnp.mean(samples), jnp.std(samples, ddof=1) / math.sqrt(num_samples),
                       num_samples)


def hutchpp_trace(matvec: Matvec, dim: int, num_matvecs: int, key: jax.Array, *,
                  dtype: Any = None) -> TraceEstimate:
  r"""Hutch++: Hutchinson's estimator with a low-rank deflation, for matrices with a few large
  eigenvalues (Meyer, Musco, Musco & Woodruff 2021).

  With ``k = num_matvecs // 3``: ``Q = orth(H S)`` for a ``dim × k`` Rademacher ``S``; then

  .. math::

    \operatorname{tr} H ≈ \operatorname{tr}(Q^\top H Q)
      + \frac{1}{m}\sum_{s} g_s^\top (I − QQ^\top) H (I − QQ^\top) g_s,

  with ``m = num_matvecs − 2k`` Rademacher ``g_s``. Exact when ``rank(H) <= k``. Memory
  ``3 k · dim``.

  Args:
    matvec: ``v -> H v``; ``H`` symmetric positive semi-definite.
    dim: the dimension.
    num_matvecs: total products, at least 6 (so ``k >= 2`` residual samples).
    key: PRNG key.
    dtype: working dtype.

  Returns:
    A :class:`TraceEstimate` (standard error of the residual Hutchinson term).

  Example:
    >>> t = hutchpp_trace(op.matvec, op.dim, 99, jax.random.key(0))  # doctest: +SKIP

  References:
    Meyer, Musco, Musco & Woodruff, *Hutch++: Optimal Stochastic Trace Estimation*, SOSA 2021.
  """
  num_matvecs = int(num_matvecs)
  dim = int(dim)
  k = min(num_matvecs // 3, dim)
  m = num_matvecs - 2 * k
  if k < 1 or m < 2:
    raise ValueError("optax_bm.hessian.hutchpp_trace: num_matvecs must be >= 6.")
  dtype = _dtype(dtype)
  k_s, k_g = jax.random.split(key)
  mv = lambda v: matvec(v).astype(dtype)
  sketch = jax.lax.map(mv, _rademacher(k_s, (k, dim), dtype))  # rows: H s_i
  q, _ = jnp.linalg.qr(sketch.T)  # (dim, k)
  hq = jax.lax.map(mv, q.T)
  head = jnp.sum(q.T * hq)

  def one(i):
    g = _rademacher(jax.random.fold_in(k_g, i), (dim,), dtype)
    g = g - q @ (q.T @ g)
    hg = mv(g)
    return jnp.vdot(g, hg - q @ (q.T @ hg))

  samples = jax.lax.map(one, jnp.arange(m))
  return TraceEstimate(head + jnp.mean(samples), jnp.std(samples, ddof=1) / math.sqrt(m),
                       num_matvecs)


def mean_eigenvalue(matvec: Matvec, dim: int, num_samples: int, key: jax.Array, *,
                    method: str = "hutchinson", dtype: Any = None) -> TraceEstimate:
  r"""``tr(H) / dim``: the quantity the scalar local Hessians approximate.

  Args:
    matvec: ``v -> H v``.
    dim: the dimension.
    num_samples: Hutchinson samples, or the Hutch++ product budget.
    key: PRNG key.
    method: ``"hutchinson"`` (:func:`hutchinson_trace`) or ``"hutch++"`` (:func:`hutchpp_trace`).
    dtype: working dtype.

  Returns:
    A :class:`TraceEstimate` of the mean eigenvalue (value and stderr divided by ``dim``).
  """
  if method == "hutchinson":
    t = hutchinson_trace(matvec, dim, num_samples, key, dtype=dtype)
  elif method == "hutch++":
    t = hutchpp_trace(matvec, dim, num_samples, key, dtype=dtype)
  else:
    raise ValueError(f"optax_bm.hessian.mean_eigenvalue: unknown method {method!r}.")
  return TraceEstimate(t.value / dim, t.stderr / dim, t.num_matvecs)

