"""fst_jax: fully sparse training for JAX.

Every matrix multiplication of training (forward, grad-input and grad-weight) runs with a 2:4
structured-sparse operand, following "Towards Fully Sparse Training: Information Restoration with
Spatial Similarity" (Xu et al., AAAI 2022).

Example:
  >>> import jax, jax.numpy as jnp, fst_jax
  >>> loss = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
  >>> w, x = jnp.ones((8, 8)), jnp.ones((2, 4, 8))
  >>> cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False)
  >>> print(jax.grad(fst_jax.sparsify(loss, cfg))(w, x).shape)
  (8, 8)
"""

from fst_jax._config import FSTConfig as FSTConfig
from fst_jax._config import Rule as Rule
from fst_jax._export import Masks as Masks
from fst_jax._export import forward_masks as forward_masks
from fst_jax._export import pruned_params as pruned_params
from fst_jax._export import prune_params as prune_params
from fst_jax._masks import apply_mask as apply_mask
from fst_jax._masks import gradient_shift as gradient_shift
from fst_jax._masks import mask_2to4 as mask_2to4
from fst_jax._masks import mvue_2to4 as mvue_2to4
from fst_jax._masks import token_mask as token_mask
from fst_jax._masks import transposable_mask_2to4 as transposable_mask_2to4
from fst_jax._report import Report as Report
from fst_jax._report import Row as Row
from fst_jax._report import report as report
from fst_jax._transform import sparsify as sparsify

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # fst_jax.optax is imported on first use, so that `import fst_jax` imports no optax (an extra).
    if name == "optax":
        import importlib

        return importlib.import_module("fst_jax.optax")
    raise AttributeError(f"module 'fst_jax' has no attribute {name!r}")


__all__ = [
    "FSTConfig",
    "Masks",
    "Report",
    "Row",
    "Rule",
    "apply_mask",
    "forward_masks",
    "gradient_shift",
    "mask_2to4",
    "mvue_2to4",
    "prune_params",
    "pruned_params",
    "report",
    "sparsify",
    "token_mask",
    "transposable_mask_2to4",
]
