"""optax_bm: scale-amended SGD (Zhang, Chen & Liu, NeurIPS 2018) as Optax transformations."""

from optax_bm.specs import LayerSpec, UNSCALED
from optax_bm.scaling import block_scales, local_hessian_scalars, LocalHessianScalars

__version__ = "0.1.0"
