r"""Local Hessians of back-matching blocks: exact, matrix-free, and the supplement's formulas.

For a block ``F(θ, z)`` on a batch of ``N`` examples (SPEC §5), the local Hessians are the
Gauss–Newton matrices of the back-matching loss at the current point, normalized like the
sub-problems of SPEC §2:

.. math::

  H_θ = \frac{1}{N} J_θ^\top J_θ, \qquad H_z = J_z^\top J_z,

with ``J_θ``, ``J_z`` the Jacobians of the block's output over the whole batch (flattened).
Where the residual is zero (the target equals ``F(θ, z)``) they are the exact Hessians of
``ℓ_θ = (1/2N) Σ_n ‖t_n − F_n‖²`` and ``ℓ_z = ½ Σ_n ‖t_n − F_n‖²``. BatchNorm couples the
examples, so ``H_z`` is over the whole batch's input.

This module provides

* exact dense local Hessians of small blocks (:func:`local_hessian`);
* matrix-free Gauss–Newton-vector products (:func:`hvp`, :func:`gauss_newton_operator`) and,
  on any symmetric positive semi-definite matvec, Lanczos with optional full
  reorthogonalization (:func:`lanczos`: extreme eigenvalue estimates), stochastic Lanczos
  quadrature (:func:`spectral_density`), Hutchinson and Hutch++ traces
  (:func:`hutchinson_trace`, :func:`hutchpp_trace`), all in ``jax.lax`` loops so that they jit
  and keep memory at ``O(num_steps · dim)`` (Lanczos with reorthogonalization) or ``O(dim)``;
* the measured mean eigenvalue next to the SPEC §3 scalars (:func:`compare_with_scalars`);
* the supplement's formulas as checked code: back-propagation of the back-matching loss
  through a dense layer with BatchNorm (eqs. 7–10, :func:`bn_dense_backmatching_grads`) and
  the im2col forms of a convolution and its local Hessians (eqs. 14–19: :func:`im2col`,
  :func:`conv_im2col`, :func:`conv_kernel_hessian`, :func:`conv_as_matrix`,
  :func:`conv_input_hessian`), in Flax's layouts (kernel ``(h, w, m_in, n_out)``, NHWC).

References:
  Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, §3–4 and
  supplement §B–C. Lanczos quadrature: Golub & Meurant, *Matrices, Moments and Quadrature*
  (1994); Ghorbani, Krishnan & Xiao, *An Investigation into Neural Net Optimization via Hessian
  Eigenvalue Density*, ICML 2019. Hutchinson (1989); Hutch++: Meyer, Musco, Musco & Woodruff,
  SOSA 2021.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from optax_bm import scaling
from optax_bm import specs as specs_lib

BlockFn = Callable[[Any, Any], Any]  # F(params, z) -> output (batch axis first)
Matvec = Callable[[jax.Array], jax.Array]
WRT = ("params", "input")

# ----------------------------------------------------------------------------------------------
# Gauss–Newton local Hessians of a block
# ----------------------------------------------------------------------------------------------


def _batch_size(z) -> int:
  leaves = jax.tree.leaves(z)
  if not leaves or not hasattr(leaves[0], "shape") or len(leaves[0].shape) == 0:
    raise ValueError("optax_bm.hessian: the block input z needs a leading batch axis.")
  return int(leaves[0].shape[0])


def _flat_block(fn: BlockFn, params, z, wrt: str):
  """``(g, x0, unravel, scale)``: ``g`` maps the flat point to the flat block output."""
  if wrt not in WRT:
    raise ValueError(f"optax_bm.hessian: wrt must be one of {WRT}, got {wrt!r}.")
  point = params if wrt == "params" else z
  x0, unravel = ravel_pytree(point)

  def g(flat):
    p = unravel(flat)
    out = fn(p, z) if wrt == "params" else fn(params, p)
    return ravel_pytree(out)[0]

  scale = 1.0 / _batch_size(z) if wrt == "params" else 1.0
  return g, x0, unravel, scale


class GaussNewtonOperator(NamedTuple):
  """A block's local Hessian as a matrix-free operator on flat vectors.

  Attributes:
    matvec: ``v -> H v`` for ``v`` of shape ``(dim,)`` (``H = J^T J / N`` or ``J^T J``).
    dim: the dimension of the flattened parameters or input.
    unravel: maps a flat vector back to the pytree of the parameters or input.
    point: the flattened point (parameters or input) the Hessian is taken at.
  """

  matvec: Matvec
  dim: int
  unravel: Callable[[jax.Array], Any]
  point: jax.Array


def gauss_newton_operator(fn: BlockFn, params: Any, z: Any,
                          wrt: str = "params") -> GaussNewtonOperator:
  r"""The local Hessian of a block as a matrix-free operator (SPEC §5).

  The block is linearized once (``jax.linearize``); every product then costs one
  forward-mode and one reverse-mode pass through the *linearized* block (the transpose comes
  from ``jax.linear_transpose``), without recomputing the forward pass and without forming
  ``J``:

  .. math::

    H_θ v = \frac{1}{N} J_θ^\top (J_θ v), \qquad H_z v = J_z^\top (J_z v).

  Build the operator inside the function you ``jax.jit`` (with ``params`` and ``z`` as its
  arguments) so the linearization's residuals are traced values, not baked-in constants.

  On XLA:CPU the transpose of ``lax.conv_general_dilated`` with respect to the kernel (the
  ``J_W^T`` half of an ``H_W`` product) is very slow (about 30× a forward convolution for a
  64-channel 3×3 layer on 32×32 maps, see ``benchmarks/hessian_realsize.py``); a block written
  with :func:`conv_im2col` (the same function, supplement eq. 14) turns it into a matrix
  product.

  Args:
    fn: the block, ``fn(params, z) -> output`` (batch axis first; BatchNorm in training mode
      if the block has one).
    params: the block's parameters (any pytree).
    z: the block's input (batch axis first; any pytree).
    wrt: ``"params"`` for ``H_θ`` or ``"input"`` for ``H_z``.

  Returns:
    A :class:`GaussNewtonOperator`.

  Example:
    >>> op = gauss_newton_operator(block, params, z, wrt="input")  # doctest: +SKIP
    >>> res = lanczos(op.matvec, op.dim, 50, jax.random.key(0))  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, §3 (local Hessians) and supplement §C.
  """
  g, x0, unravel, scale = _flat_block(fn, params, z, wrt)
  _, jvp_fn = jax.linearize(g, x0)
  vjp_fn = jax.linear_transpose(jvp_fn, x0)

  def matvec(v):
    v = jnp.asarray(v, x0.dtype)
    (jtjv,) = vjp_fn(jvp_fn(v))
    return scale * jtjv

  return GaussNewtonOperator(matvec, int(x0.size), unravel, x0)


def hvp(fn: BlockFn, params: Any, z: Any, v: Any, wrt: str = "params") -> Any:
  r"""One Gauss–Newton-vector product of a block's local Hessian, matrix-free.

  Computes ``H v`` with one ``jax.jvp`` (``u = J v``) and one ``jax.vjp`` (``J^T u``); ``J``
  is never formed. ``H`` is ``J_θ^T J_θ / N`` (``wrt="params"``) or ``J_z^T J_z``
  (``wrt="input"``), SPEC §5. For many products on the same point use
  :func:`gauss_newton_operator`, which linearizes once.

  Args:
    fn: the block, ``fn(params, z) -> output``.
    params: the block's parameters.
    z: the block's input (batch axis first).
    v: the vector: a pytree like the parameters (or the input), or a flat array of their total
      size.
    wrt: ``"params"`` or ``"input"``.

  Returns:
    ``H v``, with the structure of ``v`` (pytree or flat).

  Example:
    >>> hv = hvp(block, params, z, jax.tree.map(jnp.ones_like, params))  # doctest: +SKIP
  """
  if wrt not in WRT:
    raise ValueError(f"optax_bm.hessian: wrt must be one of {WRT}, got {wrt!r}.")
  point = params if wrt == "params" else z
  flat_in = not (jax.tree.structure(v) == jax.tree.structure(point) and all(
      jnp.shape(a) == jnp.shape(b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(point))))
  size = sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(point))
  if flat_in and jnp.shape(v) != (size,):
    raise ValueError(f"optax_bm.hessian.hvp: v has shape {jnp.shape(v)}, the {wrt} have {size} "
                     "entries (pass a flat vector or a pytree like them).")

  @jax.jit  # one compiled program instead of op-by-op dispatch through the block
  def product(params, z, v):
    g, x0, unravel, scale = _flat_block(fn, params, z, wrt)
    vf = jnp.asarray(v, x0.dtype) if flat_in else ravel_pytree(v)[0].astype(x0.dtype)
    _, jv = jax.jvp(g, (x0,), (vf,))
    _, vjp = jax.vjp(g, x0)
    (out,) = vjp(jv)
    out = scale * out
    return out if flat_in else unravel(out)

  return product(params, z, v)


def local_hessian(fn: BlockFn, params: Any, z: Any, wrt: str = "params") -> jax.Array:
  r"""The dense local Hessian of a small block (SPEC §5).

  .. math::

    H_θ = \frac{1}{N} J_θ^\top J_θ \quad(\texttt{wrt="params"}), \qquad
    H_z = J_z^\top J_z \quad(\texttt{wrt="input"}),

  over the parameters (or the input) flattened with ``jax.flatten_util.ravel_pytree`` and the
  whole batch's output. ``J`` is formed (``jax.jacfwd``): small blocks only.

  Args:
    fn: the block, ``fn(params, z) -> output`` (batch axis first).
    params: the block's parameters.
    z: the block's input (batch axis first).
    wrt: ``"params"`` or ``"input"``.

  Returns:
    A ``(dim, dim)`` symmetric positive semi-definite matrix; ``dim`` the flattened size.

  Example:
    >>> H = local_hessian(block, params, z, wrt="params")  # doctest: +SKIP
    >>> H.trace() / H.shape[0]  # the mean eigenvalue the SPEC §3 scalar approximates  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, §3 and supplement §B–C.
  """
  if wrt not in WRT:
    raise ValueError(f"optax_bm.hessian: wrt must be one of {WRT}, got {wrt!r}.")

  @jax.jit  # one compiled program instead of op-by-op dispatch through the block
  def dense(params, z):
    g, x0, _, scale = _flat_block(fn, params, z, wrt)
    jac = jax.jacfwd(g)(x0)
    return scale * (jac.T @ jac)

  return dense(params, z)


# ----------------------------------------------------------------------------------------------
# Spectral estimation on a matvec
# ----------------------------------------------------------------------------------------------


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
  r"""``tr(H) / dim``: the quantity the SPEC §3 scalars approximate.

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


# ----------------------------------------------------------------------------------------------
# Measured mean eigenvalues next to the SPEC §3 scalars
# ----------------------------------------------------------------------------------------------


class ScalarComparison(NamedTuple):
  """A block's measured local-Hessian mean eigenvalues beside the SPEC §3 scalars.

  Attributes:
    mean_w: measured ``tr(H_W) / dim(W)``, ``H_W`` the kernel's block of ``H_θ``.
    mean_w_stderr: its standard error.
    m_w: the scalar ``m_{b,W}``.
    mean_z: measured ``tr(H_z) / dim(z)`` over the whole batch's input.
    mean_z_stderr: its standard error.
    m_z: the scalar ``m_{b,z}``.
    mean_a: measured mean eigenvalue of each other parameter's diagonal block of ``H_θ``
      (bias, BatchNorm scale, offset), a dict path -> value (exact: computed from ``dim``
      products when that is at most ``exact_other_dim``, else Hutchinson).
    m_a: the scalar ``m_{b,a}``.
    dim_w: kernel size.
    dim_z: input size (whole batch).
  """

  mean_w: jax.Array
  mean_w_stderr: jax.Array
  m_w: jax.Array
  mean_z: jax.Array
  mean_z_stderr: jax.Array
  m_z: jax.Array
  mean_a: dict
  m_a: jax.Array
  dim_w: int
  dim_z: int


def _with_leaf(treedef, leaves, i, value):
  leaves = list(leaves)
  leaves[i] = value
  return jax.tree.unflatten(treedef, leaves)


def _exact_trace(matvec, dim, dtype):
  eye = jnp.eye(dim, dtype=dtype)
  return jnp.sum(jax.lax.map(lambda e: jnp.vdot(e, matvec(e).astype(dtype)), eye))


def compare_with_scalars(fn: BlockFn, params: Any, z: Any, specs: Any, key: jax.Array, *,
                         num_samples: int = 64, method: str = "hutchinson",
                         exact_other_dim: int = 4096,
                         dtype: Any = None) -> ScalarComparison:
  r"""Measures a block's mean local-Hessian eigenvalues and puts them beside its SPEC scalars.

  For the block's kernel ``W`` (the leaf whose spec has ``role="kernel"``), its input ``z`` and
  its other parameters, estimates the mean eigenvalues

  .. math::

    \bar λ(H_W) = \frac{\operatorname{tr}(J_W^\top J_W)}{N \dim W}, \qquad
    \bar λ(H_z) = \frac{\operatorname{tr}(J_z^\top J_z)}{\dim z}

  matrix-free (:func:`mean_eigenvalue`) and returns them with
  :func:`optax_bm.local_hessian_scalars` ``(m_W, m_a, m_z)`` computed from the same kernel.

  Args:
    fn: the block, ``fn(params, z) -> output``.
    params: the block's parameters.
    z: its input (batch axis first).
    specs: the block's spec tree, with the structure of ``params`` (e.g. the block's sub-tree
      of :func:`optax_bm.annotate`'s output); exactly one leaf must be the kernel.
    key: PRNG key.
    num_samples: products per trace estimate.
    method: ``"hutchinson"`` or ``"hutch++"``.
    exact_other_dim: other parameters up to this size get their trace exactly.
    dtype: working dtype.

  Returns:
    A :class:`ScalarComparison`.

  Example:
    >>> specs = optax_bm.annotate(model, x)  # doctest: +SKIP
    >>> fns, params = optax_bm.backmatching.nnx_blocks(model.blocks)  # doctest: +SKIP
    >>> cmp = compare_with_scalars(fns[0], params[0], x, specs["blocks"][0], key)  # doctest: +SKIP
    >>> cmp.mean_w / cmp.m_w  # 1 if the scalar were exact  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C.1; SPEC §3 and §5.
  """
  spec_leaves, leaves, _, paths = specs_lib.flatten_specs_like(specs, params)
  kernels = [i for i, s in enumerate(spec_leaves)
             if isinstance(s, specs_lib.LayerSpec) and s.is_kernel]
  if len(kernels) != 1:
    raise ValueError(f"optax_bm.hessian.compare_with_scalars: the block needs exactly one "
                     f"kernel spec, found {len(kernels)}.")
  ki = kernels[0]
  others = [i for i, s in enumerate(spec_leaves)
            if i != ki and isinstance(s, specs_lib.LayerSpec)]
  wdtype = _dtype(dtype)

  @jax.jit
  def measure(params, z, key):
    leaves, treedef = jax.tree.flatten(params)
    k_w, k_z, k_a = jax.random.split(key, 3)

    def leaf_op(i):
      fn_i = lambda leaf, x: fn(_with_leaf(treedef, leaves, i, leaf), x)
      return gauss_newton_operator(fn_i, leaves[i], z, "params")

    op_w = leaf_op(ki)
    mw = mean_eigenvalue(op_w.matvec, op_w.dim, num_samples, k_w, method=method, dtype=dtype)
    op_z = gauss_newton_operator(fn, params, z, "input")
    mz = mean_eigenvalue(op_z.matvec, op_z.dim, num_samples, k_z, method=method, dtype=dtype)
    mean_a = {}
    for i in others:
      op = leaf_op(i)
      if op.dim <= exact_other_dim:
        mean_a[paths[i]] = _exact_trace(op.matvec, op.dim, wdtype) / op.dim
      else:
        mean_a[paths[i]] = mean_eigenvalue(op.matvec, op.dim, num_samples,
                                           jax.random.fold_in(k_a, i), method=method,
                                           dtype=dtype).value
    scal = scaling.local_hessian_scalars(spec_leaves[ki], leaves[ki], paths[ki])
    return mw, mz, mean_a, scal

  mw, mz, mean_a, scal = measure(params, z, key)
  dim_w = int(np.prod(jnp.shape(leaves[ki])))
  dim_z = sum(int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(z))
  return ScalarComparison(mw.value, mw.stderr, scal.m_w, mz.value, mz.stderr, scal.m_z, mean_a,
                          scal.m_a, dim_w, dim_z)


# ----------------------------------------------------------------------------------------------
# Supplement §B: back-propagation through BatchNorm for the back-matching loss (eqs. 7–10)
# ----------------------------------------------------------------------------------------------


class BNBackMatchingGrads(NamedTuple):
  """Gradients of ``ℓ = ½ Σ_n ‖t_n − z_n‖²`` through dense + BatchNorm (supplement eqs. 7–10).

  Attributes:
    z: the block output ``z_b = γ (z̃ − E[z̃]) / sqrt(Var[z̃] + ε) + β``, ``(m, n_out)``.
    z_tilde: the pre-normalization output ``z̃ = z_{b-1} W``.
    dl_dz: eq. 7, ``z_b − t``.
    dl_dvar: ``∂ℓ/∂Var[z̃]``, ``(n_out,)``.
    dl_dmean: ``∂ℓ/∂E[z̃]``, ``(n_out,)``.
    dl_dz_tilde: eq. 8.
    dl_dz_prev: eq. 9, ``(m, m_in)``.
    dl_dkernel: eq. 10, ``(m_in, n_out)`` (Flax layout).
  """

  z: jax.Array
  z_tilde: jax.Array
  dl_dz: jax.Array
  dl_dvar: jax.Array
  dl_dmean: jax.Array
  dl_dz_tilde: jax.Array
  dl_dz_prev: jax.Array
  dl_dkernel: jax.Array


@functools.partial(jax.jit, static_argnames=("epsilon",))
def bn_dense_backmatching_grads(kernel: jax.Array, z_prev: jax.Array, target: jax.Array,
                                scale: Optional[jax.Array] = None,
                                offset: Optional[jax.Array] = None,
                                epsilon: float = 1e-5) -> BNBackMatchingGrads:
  r"""Back-propagation of the back-matching loss through a dense layer with BatchNorm.

  The block is ``z̃ = z_{b-1} W`` (Flax layout ``W: (m_in, n_out)``, batch of ``m`` rows),
  ``z_b = γ (z̃ − E[z̃]) / sqrt(Var[z̃] + ε) + β`` with batch statistics (biased variance, as
  Flax), and the loss ``ℓ = ½ Σ_n ‖t_n − z_{b,n}‖²`` (the z-sub-problem's sum of SPEC §2; the
  θ-sub-problem's mean is this divided by ``m``). Written out as in supplement §B, with
  ``σ² = Var[z̃] + ε``:

  .. math::

    \frac{∂ℓ}{∂z_b} = z_b − t \quad (7)

    \frac{∂ℓ}{∂\tilde z} = \frac{∂ℓ}{∂z_b}\frac{γ}{σ}
      + \frac{∂ℓ}{∂\mathrm{Var}}\frac{2(\tilde z − E\tilde z)}{m}
      + \frac{1}{m}\frac{∂ℓ}{∂E\tilde z} \quad (8)

    \frac{∂ℓ}{∂\mathrm{Var}} = −\frac{1}{2σ^3}\sum_n \frac{∂ℓ}{∂z_{b,n}} γ (\tilde z_n − E\tilde z),
    \qquad \frac{∂ℓ}{∂E\tilde z} = −\frac{1}{σ}\sum_n \frac{∂ℓ}{∂z_{b,n}} γ
    \;(+\ \tfrac{∂ℓ}{∂\mathrm{Var}}\cdot(−\tfrac{2}{m})\textstyle\sum_n(\tilde z_n − E\tilde z) = 0)

    \frac{∂ℓ}{∂z_{b-1}} = \frac{∂ℓ}{∂\tilde z} W^\top \quad (9), \qquad
    \frac{∂ℓ}{∂W} = z_{b-1}^\top \frac{∂ℓ}{∂\tilde z} \quad (10).

  (The supplement writes ``W`` as ``n_out × m_in`` and column vectors, hence its transposes.)
  A bias added before BatchNorm gets gradient ``Σ_n ∂ℓ/∂z̃_n = 0``.

  Args:
    kernel: ``W``, ``(m_in, n_out)``.
    z_prev: ``z_{b-1}``, ``(m, m_in)``.
    target: ``t = z_b^{k+1/2}``, ``(m, n_out)``.
    scale: BatchNorm ``γ`` (default 1).
    offset: BatchNorm ``β`` (default 0).
    epsilon: BatchNorm ``ε`` (Flax's default 1e-5).

  Returns:
    A :class:`BNBackMatchingGrads`.

  Example:
    >>> g = bn_dense_backmatching_grads(W, z_prev, target)  # doctest: +SKIP
    >>> z_half = z_prev - g.dl_dz_prev  # one unit step on the z-sub-problem  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §B, eqs. 7–10; Ioffe & Szegedy, ICML 2015.
  """
  m = z_prev.shape[0]
  n_out = kernel.shape[-1]
  gamma = jnp.ones((n_out,), kernel.dtype) if scale is None else scale
  beta = jnp.zeros((n_out,), kernel.dtype) if offset is None else offset
  z_tilde = z_prev @ kernel
  mean = jnp.mean(z_tilde, axis=0)
  centered = z_tilde - mean
  var = jnp.mean(jnp.square(centered), axis=0)
  inv_sigma = jax.lax.rsqrt(var + epsilon)
  z = gamma * centered * inv_sigma + beta
  dl_dz = z - target  # (7)
  dl_dxhat = dl_dz * gamma
  dl_dvar = jnp.sum(dl_dxhat * centered, axis=0) * (-0.5) * inv_sigma ** 3
  dl_dmean = (-inv_sigma * jnp.sum(dl_dxhat, axis=0)
              + dl_dvar * (-2.0 / m) * jnp.sum(centered, axis=0))
  dl_dz_tilde = dl_dxhat * inv_sigma + dl_dvar * 2.0 * centered / m + dl_dmean / m  # (8)
  dl_dz_prev = dl_dz_tilde @ kernel.T  # (9)
  dl_dkernel = z_prev.T @ dl_dz_tilde  # (10)
  return BNBackMatchingGrads(z, z_tilde, dl_dz, dl_dvar, dl_dmean, dl_dz_tilde, dl_dz_prev,
                             dl_dkernel)


# ----------------------------------------------------------------------------------------------
# Supplement §C: convolution as im2col, its local Hessians (eqs. 14–19)
# ----------------------------------------------------------------------------------------------

Padding = Union[str, int, Sequence[tuple[int, int]]]


def _pairs(v, n, what):
  if isinstance(v, int):
    return (v,) * n
  v = tuple(int(x) for x in v)
  if len(v) != n:
    raise ValueError(f"optax_bm.hessian: {what} needs {n} entries, got {v}.")
  return v


def conv_pads(input_hw: Sequence[int], window: Sequence[int], stride: Union[int, Sequence[int]],
              padding: Padding) -> tuple[tuple[int, int], ...]:
  """Explicit ``(low, high)`` padding per spatial axis, as ``lax.conv_general_dilated`` uses."""
  n = len(window)
  strides = _pairs(stride, n, "stride")
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"optax_bm.hessian: padding {padding!r} not supported (SAME, VALID, "
                       "int or (low, high) pairs).")
    pads = jax.lax.padtype_to_pads(tuple(input_hw), tuple(window), strides, padding.upper())
  elif isinstance(padding, int):
    pads = [(padding, padding)] * n
  else:
    pads = [tuple(p) for p in padding]
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if len(pads) != n or any(lo < 0 or hi < 0 for lo, hi in pads):
    raise ValueError(f"optax_bm.hessian: bad padding {padding!r} for a {n}-d window.")
  return pads


def _out_hw(input_hw, window, strides, pads):
  return tuple((p + lo + hi - h) // s + 1
               for p, h, s, (lo, hi) in zip(input_hw, window, strides, pads))


def im2col(x: jax.Array, window: Sequence[int], stride: Union[int, Sequence[int]] = 1,
           padding: Padding = "SAME") -> jax.Array:
  r"""The im2col matrices ``a_i2c`` of a batch of NHWC images (supplement §C, eq. 14).

  Column ``u = u_1 q_2 + u_2`` of example ``x``'s matrix holds the input values that the kernel
  meets at output position ``(u_1, u_2)``, in the order of a Flax kernel ``(h, w, m_in, n_out)``
  reshaped to ``(h·w·m_in, n_out)``: row ``(i·w + j)·m_in + c`` is input channel ``c`` at
  window offset ``(i, j)`` (zero where the window hangs over the padding).

  Args:
    x: ``(N, p_1, p_2, m_in)``.
    window: ``(h, w)``.
    stride: int or ``(s_1, s_2)``.
    padding: ``"SAME"``, ``"VALID"``, an int, or ``((lo, hi), (lo, hi))``, as Flax/lax.

  Returns:
    ``(N, h·w·m_in, q_1·q_2)``.

  Example:
    >>> a = im2col(x, (3, 3), 1, "SAME")  # doctest: +SKIP
    >>> b_col = kernel_row(kernel) @ a  # eq. 14: (N, n_out, q1*q2)  # doctest: +SKIP

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eq. 14; Chellapilla, Puri & Simard (2006).
  """
  window = tuple(int(w) for w in window)
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads(x.shape[1:3], window, strides, padding)
  return _im2col(x, window, strides, pads)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _im2col(x, window, strides, pads):
  n, p1, p2, c = x.shape
  q1, q2 = _out_hw((p1, p2), window, strides, pads)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  cols = []
  for i in range(window[0]):
    for j in range(window[1]):
      cols.append(xp[:, i:i + strides[0] * (q1 - 1) + 1:strides[0],
                     j:j + strides[1] * (q2 - 1) + 1:strides[1], :])
  a = jnp.stack(cols, axis=3)  # (N, q1, q2, h*w, m_in)
  return a.reshape(n, q1 * q2, window[0] * window[1] * c).transpose(0, 2, 1)


def kernel_row(kernel: jax.Array) -> jax.Array:
  """``W_row``, ``(n_out, h·w·m_in)``: one row per output feature (supplement §C)."""
  return kernel.reshape(-1, kernel.shape[-1]).T


def kernel_col(kernel: jax.Array) -> jax.Array:
  """``W_col``, ``(m_in, h·w·n_out)``: one row per input feature (supplement §C)."""
  return jnp.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1)


def conv_im2col(kernel: jax.Array, x: jax.Array, stride: Union[int, Sequence[int]] = 1,
                padding: Padding = "SAME") -> jax.Array:
  r"""A convolution as one matrix product per example (supplement eq. 14).

  .. math::

    b_{col}(x) = W_{row}\, a_{i2c}(x),

  returned in NHWC. Equals ``lax.conv_general_dilated(x, kernel, stride, padding,
  dimension_numbers=("NHWC", "HWIO", "NHWC"))`` (Flax's ``nnx.Conv`` without bias).

  Args:
    kernel: ``(h, w, m_in, n_out)``.
    x: ``(N, p_1, p_2, m_in)``.
    stride: int or pair.
    padding: as :func:`im2col`.

  Returns:
    ``(N, q_1, q_2, n_out)``.

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eq. 14.
  """
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  q1, q2 = _out_hw(x.shape[1:3], kernel.shape[:2], strides, pads)
  return _conv_im2col(kernel, x, strides, pads, (q1, q2))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _conv_im2col(kernel, x, strides, pads, out_hw):
  b_col = kernel_row(kernel) @ _im2col(x, kernel.shape[:2], strides, pads)  # (N, n, q1 q2)
  return b_col.transpose(0, 2, 1).reshape(x.shape[0], *out_hw, kernel.shape[-1])


def conv_kernel_hessian(x: jax.Array, window: Sequence[int], n_out: int,
                        stride: Union[int, Sequence[int]] = 1, padding: Padding = "SAME", *,
                        block_only: bool = False) -> jax.Array:
  r"""The local Hessian of a convolution's kernel, ``H_W = E_x a_{i2c} a_{i2c}^T`` (eq. 17).

  For the θ-sub-problem ``ℓ = (1/2N) Σ_n ‖t_n − W_{row} a_{i2c}(x_n)‖²`` (SPEC §2, §5), the
  Hessian with respect to each row of ``W_row`` (one output feature) is the same matrix

  .. math::

    H_{W_n} = \frac{1}{N}\sum_{n=1}^{N} a_{i2c}(x_n)\, a_{i2c}(x_n)^\top
    = \frac{1}{N}\sum_n \sum_{u} a_{·u}(x_n) a_{·u}(x_n)^\top ,

  an expectation over the batch of a sum over the ``q_1 q_2`` output positions. Over the whole
  kernel, flattened in Flax's order ``(h, w, m_in, n_out)`` (output feature fastest), the
  Hessian is block diagonal over output features with identical blocks:
  ``H_W = H_{W_n} ⊗ I_{n_out}``.

  Args:
    x: the convolution's input, ``(N, p_1, p_2, m_in)``.
    window: ``(h, w)``.
    n_out: output features.
    stride: int or pair.
    padding: as :func:`im2col`.
    block_only: return the ``(h·w·m_in)²`` block ``H_{W_n}`` instead of the full matrix.

  Returns:
    ``(h·w·m_in·n_out, h·w·m_in·n_out)`` (or the block).

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eq. 17.
  """
  window = tuple(int(w) for w in window)
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads(x.shape[1:3], window, strides, padding)
  return _conv_kernel_hessian(x, window, int(n_out), strides, pads, bool(block_only))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _conv_kernel_hessian(x, window, n_out, strides, pads, block_only):
  a = _im2col(x, window, strides, pads)
  block = jnp.einsum("npu,nru->pr", a, a) / x.shape[0]
  if block_only:
    return block
  return jnp.kron(block, jnp.eye(n_out, dtype=block.dtype))


def conv_as_matrix(kernel: jax.Array, input_hw: Sequence[int],
                   stride: Union[int, Sequence[int]] = 1,
                   padding: Padding = "SAME") -> jax.Array:
  r"""``W_a``: one example's convolution as an explicit (sparse, stored dense) matrix (eq. 19).

  Row ``(u_1 q_2 + u_2)·n_out + k`` (output ``k`` at ``(u_1, u_2)``, NHWC order), column
  ``(v_1 p_2 + v_2)·m_in + j`` (input ``j`` at ``(v_1, v_2)``, NHWC order); column
  ``(j, v_1, v_2)`` is the supplement's ``w_{j v_1 v_2 →}``: the weights that meet input
  location ``(j, v_1, v_2)``, scattered over ``n_out`` blocks. Built by placing kernel entries,
  not by differentiation. Small inputs only (``q_1 q_2 n_out × p_1 p_2 m_in`` entries).

  Args:
    kernel: ``(h, w, m_in, n_out)``.
    input_hw: ``(p_1, p_2)``.
    stride: int or pair.
    padding: as :func:`im2col`.

  Returns:
    ``(q_1 q_2 n_out, p_1 p_2 m_in)``.

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eqs. 15, 18–19.
  """
  h, w, m_in, n_out = kernel.shape
  p1, p2 = (int(v) for v in input_hw)
  strides = _pairs(stride, 2, "stride")
  pads = conv_pads((p1, p2), (h, w), strides, padding)
  q1, q2 = _out_hw((p1, p2), (h, w), strides, pads)
  rows, cols, taps = [], [], []
  k_idx = np.arange(n_out)
  j_idx = np.arange(m_in)
  for u1 in range(q1):
    for u2 in range(q2):
      for i in range(h):
        for jj in range(w):
          v1 = u1 * strides[0] + i - pads[0][0]
          v2 = u2 * strides[1] + jj - pads[1][0]
          if 0 <= v1 < p1 and 0 <= v2 < p2:
            r = (u1 * q2 + u2) * n_out + k_idx[:, None]
            c = (v1 * p2 + v2) * m_in + j_idx[None, :]
            rows.append(np.broadcast_to(r, (n_out, m_in)).ravel())
            cols.append(np.broadcast_to(c, (n_out, m_in)).ravel())
            taps.append(np.full(n_out * m_in, i * w + jj))
  rows, cols, taps = (np.concatenate(v) for v in (rows, cols, taps))
  return _scatter(kernel, rows, cols, taps, (q1 * q2 * n_out, p1 * p2 * m_in))


@functools.partial(jax.jit, static_argnums=(4,))
def _scatter(kernel, rows, cols, taps, shape):
  h, w, m_in, n_out = kernel.shape
  # kernel[i, jj, j, k] for the (k, j) pairs of each tap, in (k major, j minor) order.
  flat = kernel.reshape(h * w, m_in, n_out).transpose(0, 2, 1).reshape(h * w, -1)
  vals = flat[taps, jnp.tile(jnp.arange(n_out * m_in), taps.shape[0] // (n_out * m_in))]
  return jnp.zeros(shape, kernel.dtype).at[rows, cols].add(vals)


def conv_input_hessian(kernel: jax.Array, input_hw: Sequence[int],
                       stride: Union[int, Sequence[int]] = 1,
                       padding: Padding = "SAME") -> jax.Array:
  r"""The local Hessian of a convolution's input, ``H_a = W_a^T W_a`` (eqs. 18–19).

  Entry ``((j, u_1, u_2), (k, v_1, v_2))`` is ``w_{j u_1 u_2 →}^T w_{k v_1 v_2 →}`` (eq. 18),
  for the z-sub-problem ``½‖t − W_a a‖²`` of one example; a batch's ``H_z`` for a block that is
  just the convolution is ``I_N ⊗ H_a``. Rows and columns are in NHWC order.

  Args:
    kernel: ``(h, w, m_in, n_out)``.
    input_hw: ``(p_1, p_2)``.
    stride: int or pair.
    padding: as :func:`im2col`.

  Returns:
    ``(p_1 p_2 m_in, p_1 p_2 m_in)``.

  References:
    Zhang, Chen & Liu, NeurIPS 2018, supplement §C, eqs. 18–19.
  """
  wa = conv_as_matrix(kernel, input_hw, stride, padding)
  return jnp.matmul(wa.T, wa)
