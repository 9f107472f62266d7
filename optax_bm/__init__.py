"""optax_bm: scale-amended SGD (Zhang, Chen & Liu, NeurIPS 2018) as Optax transformations."""

from optax_bm.specs import LayerSpec, UNSCALED
from optax_bm.scaling import block_scales, local_hessian_scalars, LocalHessianScalars

__version__ = "0.1.0"
from optax_bm.transform import scale_by_back_matching, scale_amended_sgd, ScaleByBackMatchingState
from optax_bm.lsalr import scale_by_lsalr, lsalr
from optax_bm.annotate import annotate
