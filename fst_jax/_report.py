"""``report``: which matmuls FST sparsifies, which it leaves dense and why, and the FLOPs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from fst_jax import _compat
from fst_jax._config import FSTConfig
from fst_jax._transform import Decision, _Signature, _trace, flops

_GEMMS = ("forward", "grad_input", "grad_weight")


@dataclasses.dataclass(frozen=True)
class Row:
    """One ``dot_general`` of the traced function.

    Attributes:
      index: position in the pre-order walk (sub-jaxprs entered in place).
      name_stack: the equation's name stack (Flax module path), ``""`` at top level.
      source: ``file:line (function)`` of the user code.
      lhs, rhs: operand shapes and dtypes, e.g. ``"f32[4,8,16]"``.
      weight: ``"lhs"``, ``"rhs"`` or ``None`` (not a weight matmul).
      param_path: the weight's parameter path (``jax.tree_util.keystr``), or ``None``.
      trips: how many times one call runs it (enclosing scan lengths); ``None`` inside a while loop.
      forward, grad_input, grad_weight: ``"sparse (...)"`` or ``"dense: <reason>"``.
      flops_dense: FLOPs of the three products per call, all dense (``trips`` included; once for
        a while loop).
      flops_fst: the same with each 2:4-sparse product counted at half.

    Example:
      >>> import jax, jax.numpy as jnp, fst_jax
      >>> S = jax.ShapeDtypeStruct
      >>> cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False)
      >>> row = fst_jax.report(lambda w, x: x @ w, cfg)(S((8, 4), jnp.float32), S((2, 8, 8), jnp.float32)).rows[0]
      >>> row.param_path, row.forward, row.sparse_gemms
      ('', 'sparse', 3)
    """

    index: int
    name_stack: str
    source: str
    lhs: str
    rhs: str
    weight: str | None
    param_path: str | None
    trips: int | None
    forward: str
    grad_input: str
    grad_weight: str
    flops_dense: int
    flops_fst: int

    @property
    def sparse_gemms(self) -> int:
        """How many of the three products are 2:4-sparse."""
        return sum(getattr(self, g).startswith("sparse") for g in _GEMMS)


def _aval_str(v: Any) -> str:
    a = v.aval
    return f"{a.dtype.name}[{','.join(map(str, a.shape))}]"


def _row(i: int, d: Decision) -> Row:
    eqn = d.site.eqn
    per_gemm = flops(d.site) * (d.site.trips or 1)
    fst = sum(per_gemm // 2 if getattr(d, g).startswith("sparse") else per_gemm for g in _GEMMS)
    return Row(index=i, name_stack=_compat.name_stack(eqn), source=_compat.source_line(eqn),
               lhs=_aval_str(eqn.invars[0]), rhs=_aval_str(eqn.invars[1]),
               weight=None if d.weight_side is None else ("lhs", "rhs")[d.weight_side],
               param_path=d.param_path, trips=d.site.trips, forward=d.forward,
               grad_input=d.grad_input, grad_weight=d.grad_weight, flops_dense=3 * per_gemm,
               flops_fst=fst)


@dataclasses.dataclass(frozen=True)
class Report:
    """Every ``dot_general`` of a function with the FST decision for each of its three products.

    ``str(report)`` is a table; ``report.rows`` are :class:`Row` s.

    Example:
      >>> import jax, jax.numpy as jnp, fst_jax
      >>> S = jax.ShapeDtypeStruct
      >>> rep = fst_jax.report(lambda w, x: x @ w)(S((8, 4), jnp.float32), S((2, 8, 8), jnp.float32))
      >>> rep.flops_fst == rep.flops_dense  # a single matmul is first and last: dense by default
      True
    """

    rows: tuple[Row, ...]
    config: FSTConfig

    @property
    def flops_dense(self) -> int:
        """FLOPs of all matmul products of one training step (forward + two backward), dense."""
        return sum(r.flops_dense for r in self.rows)

    @property
    def flops_fst(self) -> int:
        """The same with 2:4-sparse products counted at half."""
        return sum(r.flops_fst for r in self.rows)

    def __str__(self) -> str:
        head = ("#", "where", "lhs x rhs", "weight", "trips", "forward", "grad_input", "grad_weight",
                "GFLOP dense/fst")
        body = []
        for r in self.rows:
            where = r.param_path or r.name_stack or "-"
            trips = "?" if r.trips is None else str(r.trips)
            body.append((str(r.index), where, f"{r.lhs} x {r.rhs}", r.weight or "-", trips, r.forward,
                         r.grad_input, r.grad_weight,
                         f"{r.flops_dense / 1e9:.4g}/{r.flops_fst / 1e9:.4g}"))
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*b) for b in body]
        n_sparse = sum(r.sparse_gemms for r in self.rows)
        ratio = self.flops_fst / self.flops_dense if self.flops_dense else 1.0
        lines.append(f"{len(self.rows)} matmuls, {n_sparse} of {3 * len(self.rows)} products 2:4-sparse; "
                     f"matmul FLOPs per step: dense {self.flops_dense:.4g}, FST {self.flops_fst:.4g} "
                     f"({ratio:.2f}x)")
        return "\n".join(lines)


def report(fn: Callable, config: FSTConfig | None = None, *, params_argnums: int | Sequence[int] = 0,
           static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = ()
           ) -> Callable[..., Report]:
    """What :func:`fst_jax.sparsify` does to each matmul of ``fn``, as a table and as data.

    Uses the same trace and the same decision function as ``sparsify``: the report is what runs.

    Args:
      fn: the function, as for ``sparsify``.
      config: an :class:`FSTConfig`; ``None`` means ``FSTConfig()``.
      params_argnums: the positional argument(s) holding the parameters.
      static_argnums: positional arguments that are not arrays.
      static_argnames: keyword arguments that are not arrays.

    Returns:
      A function taking ``fn`` 's arguments (arrays or ``jax.ShapeDtypeStruct`` s) and returning
      a :class:`Report`.

    Example:
      >>> import jax, jax.numpy as jnp, fst_jax
      >>> def loss(params, x):
      ...     for w in params:
      ...         x = jnp.tanh(x @ w)
      ...     return x.sum()
      >>> params = [jax.ShapeDtypeStruct((16, 16), jnp.float32)] * 3
      >>> rep = fst_jax.report(loss)(params, jax.ShapeDtypeStruct((4, 8, 16), jnp.float32))
      >>> [r.forward for r in rep.rows]
      ['dense: first weight matmul (skip_first)', 'sparse', 'dense: last weight matmul (skip_last)']
    """
    config = FSTConfig() if config is None else config
    if not isinstance(config, FSTConfig):
        raise TypeError(f"config must be an fst_jax.FSTConfig or None, got {type(config).__name__}")
    sig = _Signature(getattr(fn, "__name__", "fn"), params_argnums, static_argnums, static_argnames)

    def run(*args: Any, **kwargs: Any) -> Report:
        traced, _ = _trace(fn, sig, config, args, kwargs, cache=None)
        return Report(tuple(_row(i, d) for i, d in enumerate(traced.decisions)), config)

    return run
