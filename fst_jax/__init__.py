"""fst_jax: fully sparse training for JAX (placeholder; filled in by the core)."""

from fst_jax._config import FSTConfig as FSTConfig
from fst_jax._config import Rule as Rule
