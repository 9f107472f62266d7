"""optax_bm: scale-amended SGD (Zhang, Chen & Liu, NeurIPS 2018) as Optax transformations.

Data flow: model --annotate--> specs --block_scales--> per-leaf factors --scale_by_back_matching--> updates.
"""

from optax_bm import backmatching
from optax_bm import hessian
from optax_bm.annotate import annotate
from optax_bm.lsalr import lsalr, scale_by_lsalr
from optax_bm.scaling import (LocalHessianScalars, UnitScalars, block_scales,
                              local_hessian_scalars, unit_scalars)
from optax_bm.specs import LayerSpec, Residual, UNSCALED
from optax_bm.transform import ScaleByBackMatchingState, scale_amended_sgd, scale_by_back_matching

__version__ = "0.1.0"

__all__ = [
    "LayerSpec", "Residual", "UNSCALED", "annotate", "block_scales", "local_hessian_scalars",
    "LocalHessianScalars", "unit_scalars", "UnitScalars", "scale_by_back_matching",
    "ScaleByBackMatchingState",
    "scale_amended_sgd", "scale_by_lsalr", "lsalr", "backmatching", "hessian",
]
