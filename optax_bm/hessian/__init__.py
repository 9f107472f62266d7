r"""Local Hessians of back-matching blocks: exact, matrix-free, and the supplement's formulas.

For a block ``F(θ, z)`` on a batch of ``N`` examples
(docs/method.md#5-local-hessians-measured), the local Hessians are the Gauss–Newton matrices
of the back-matching loss at the current point, normalized like the sub-problems of
back-matching (docs/method.md#2-back-matching-propagation):

.. math::

  H_θ = \frac{1}{N} J_θ^\top J_θ, \qquad H_z = J_z^\top J_z,

with ``J_θ``, ``J_z`` the Jacobians of the block's output over the whole batch (flattened).
Where the residual is zero (the target equals ``F(θ, z)``) they are the exact Hessians of
``ℓ_θ = (1/2N) Σ_n ‖t_n − F_n‖²`` and ``ℓ_z = ½ Σ_n ‖t_n − F_n‖²``. BatchNorm couples the
examples, so ``H_z`` is over the whole batch's input.

The subpackage has one module per idea; every name is also importable from
``optax_bm.hessian`` itself:

* :mod:`~optax_bm.hessian.local`: the local Hessians of one block: exact dense ones of small
  blocks (:func:`local_hessian`), matrix-free Gauss–Newton-vector products (:func:`hvp`,
  :func:`gauss_newton_operator`, and the one product they and the back-matching
  ``"gauss_newton"`` solver share, :func:`gauss_newton_matvec`);
* :mod:`~optax_bm.hessian.estimators`: on any symmetric positive semi-definite matvec,
  Lanczos with optional full reorthogonalization (:func:`lanczos`: extreme eigenvalue
  estimates), stochastic Lanczos quadrature (:func:`spectral_density`), Hutchinson and Hutch++
  traces (:func:`hutchinson_trace`, :func:`hutchpp_trace`), all in ``jax.lax`` loops so that
  they jit and keep memory at ``O(num_steps · dim)`` (Lanczos with reorthogonalization) or
  ``O(dim)``;
* :mod:`~optax_bm.hessian.comparison`: the measured mean eigenvalue next to the scalar
  local Hessians of docs/method.md#3-scalar-local-hessians (:func:`compare_with_scalars`);
* :mod:`~optax_bm.hessian.closed_forms`: the supplement's formulas as checked code:
  back-propagation of the back-matching loss through a dense layer with BatchNorm (eqs. 7–10,
  :func:`bn_dense_backmatching_grads`) and the im2col forms of a convolution and its local
  Hessians (eqs. 14–19: :func:`im2col`, :func:`conv_im2col`, :func:`conv_kernel_hessian`,
  :func:`conv_as_matrix`, :func:`conv_input_hessian`), in Flax's layouts (kernel
  ``(h, w, m_in, n_out)``, NHWC).

References:
  Zhang, Chen & Liu, *On the Local Hessian in Back-propagation*, NeurIPS 2018, §3–4 and
  supplement §B–C. Lanczos quadrature: Golub & Meurant, *Matrices, Moments and Quadrature*
  (1994); Ghorbani, Krishnan & Xiao, *An Investigation into Neural Net Optimization via Hessian
  Eigenvalue Density*, ICML 2019. Hutchinson (1989); Hutch++: Meyer, Musco, Musco & Woodruff,
  SOSA 2021.
"""

from optax_bm.hessian.local import (WRT, BlockFn, Curvature, GaussNewtonOperator, Matvec,
                                    gauss_newton_matvec, gauss_newton_operator, hvp,
                                    local_hessian)
from optax_bm.hessian.estimators import (LanczosResult, SpectralDensity, TraceEstimate,
                                         hutchinson_trace, hutchpp_trace, lanczos,
                                         mean_eigenvalue, spectral_density)
from optax_bm.hessian.comparison import ScalarComparison, compare_with_scalars
from optax_bm.hessian.closed_forms import (BNBackMatchingGrads, Padding,
                                           bn_dense_backmatching_grads, conv_as_matrix,
                                           conv_im2col, conv_input_hessian, conv_kernel_hessian,
                                           conv_pads, im2col, kernel_col, kernel_row)

__all__ = [
    # local
    "BlockFn", "Matvec", "Curvature", "WRT", "GaussNewtonOperator", "gauss_newton_matvec",
    "gauss_newton_operator", "hvp", "local_hessian",
    # estimators
    "LanczosResult", "lanczos", "SpectralDensity", "spectral_density", "TraceEstimate",
    "hutchinson_trace", "hutchpp_trace", "mean_eigenvalue",
    # comparison
    "ScalarComparison", "compare_with_scalars",
    # closed_forms
    "BNBackMatchingGrads", "bn_dense_backmatching_grads", "Padding", "conv_pads", "im2col",
    "kernel_row", "kernel_col", "conv_im2col", "conv_kernel_hessian", "conv_as_matrix",
    "conv_input_hessian",
]
