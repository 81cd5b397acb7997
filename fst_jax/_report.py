"""``report``: which matmuls FST sparsifies, which it leaves dense and why, and the FLOPs."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from fst_jax import _compat
from fst_jax._config import FSTConfig
from fst_jax._decisions import Decision, Product, flops
from fst_jax._tracing import check_call, trace

#: Width of the default table.
WIDTH = 120


@dataclasses.dataclass(frozen=True)
class Row:
    """One ``dot_general`` (or convolution) of the traced function.

    Attributes:
      index: position in the pre-order walk (sub-jaxprs entered in place).
      name_stack: the equation's name stack (Flax module path), ``""`` at top level.
      source: ``file:line (function)`` of the user code.
      lhs, rhs: operand shapes and dtypes, e.g. ``"f32[4,8,16]"``.
      weight: ``"lhs"``, ``"rhs"`` or ``None`` (not a weight matmul).
      param_path: the weight's parameter path (``jax.tree_util.keystr``), or ``None``.
      trips: how many times one call runs it (enclosing scan lengths); ``None`` inside a while loop.
      forward, grad_input, grad_weight: each product as text (``str`` of its
        :class:`fst_jax._decisions.Product`): ``"sparse (...)"`` or ``"dense: <reason>"``.
      backends: what computes each of the three products: ``"xla"`` (dense GEMMs on masked
        operands, or on the kept half of the tokens), ``"pallas"``, ``"cusparselt"``, or ``"none"`` (a grad-input
        product that is not computed: the activation does not depend on the parameters).
      token_axis, tokens: the activation axis the grad-weight mask runs along and its length
        (``None`` for convolutions, whose tokens are the output positions, and non-weight matmuls).
      sr_ste: ``"parameter"`` (SR-STE once per weight entry per step), ``"per use"`` or ``"off"``.
      backend_note: why a sparse product runs on another backend than the config asks for
        (e.g. ``"cusparselt: float32 x float32 (...)"``), ``""`` otherwise.
      flops_dense: FLOPs of the products one training step computes, all dense (``trips``
        included; once for a while loop); a grad-input product counts only where the activation
        depends on the parameters (gradients are taken with respect to the parameters).
      flops_executed: the same as the backends execute them: XLA runs the forward and grad-input
        products as dense GEMMs on masked operands (full FLOPs), the compact grad-weight product
        over half of the tokens.
      flops_fst: the 2:4 ideal: every 2:4-sparse product at half.
      decision: the typed :class:`fst_jax._decisions.Decision` this row displays; the table and
        :attr:`sparse_gemms` read its products, never the text above.

    Example:
      >>> import jax, jax.numpy as jnp, fst_jax
      >>> S = jax.ShapeDtypeStruct
      >>> cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False)
      >>> row = fst_jax.report(lambda w, x: x @ w, cfg)(S((8, 4), jnp.float32), S((2, 8, 8), jnp.float32)).rows[0]
      >>> row.param_path, row.forward, row.sparse_gemms, row.token_axis, row.tokens
      ('', 'sparse', 3, 1, 8)
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
    backends: tuple[str, str, str]
    token_axis: int | None
    tokens: int | None
    sr_ste: str
    backend_note: str
    flops_dense: int
    flops_executed: int
    flops_fst: int
    decision: Decision = dataclasses.field(repr=False, compare=False)

    @property
    def sparse_gemms(self) -> int:
        """How many of the three products are 2:4-sparse."""
        return self.decision.sparse_products


def _aval_str(v: Any) -> str:
    a = v.aval
    return f"{a.dtype.name}[{','.join(map(str, a.shape))}]"


def _row(d: Decision) -> Row:
    eqn = d.site.eqn
    per_gemm = flops(d.site) * (d.site.trips or 1)
    counted = [p for p in d.products if p.backend != "none"]
    return Row(index=d.index, name_stack=_compat.name_stack(eqn), source=_compat.source_line(eqn),
               lhs=_aval_str(eqn.invars[0]), rhs=_aval_str(eqn.invars[1]),
               weight=None if d.weight_side is None else ("lhs", "rhs")[d.weight_side],
               param_path=d.param_path, trips=d.site.trips, forward=str(d.forward),
               grad_input=str(d.grad_input), grad_weight=str(d.grad_weight),
               backends=tuple(p.backend for p in d.products), token_axis=d.token_axis, tokens=d.tokens,
               sr_ste=d.sr_ste, backend_note=d.forward.note or d.grad_input.note or d.grad_weight.note,
               flops_dense=len(counted) * per_gemm,
               flops_executed=sum(int(per_gemm * p.executed) for p in counted),
               flops_fst=sum(per_gemm // 2 if p.sparse else per_gemm for p in counted), decision=d)


def _where(r: Row) -> str:
    if r.param_path is not None:
        return r.param_path or "<params>"
    return r.name_stack or "-"


_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "int8": "i8", "int32": "i32",
          "uint8": "u8"}


def _short(text: str) -> str:
    for long, short in _SHORT.items():
        text = text.replace(f"{long}[", f"{short}[")
    return text


def _compact_path(path: str) -> str:
    """``['params']['Dense_0']['kernel']`` as ``Dense_0/kernel``, for the narrow table."""
    parts = re.findall(r"\[(?:'([^']*)'|(\d+))\]", path)
    if not parts or "".join(f"['{a}']" if a else f"[{b}]" for a, b in parts) != path:
        return path
    names = [a or b for a, b in parts]
    return "/".join(names[1:] if names[0] == "params" and len(names) > 1 else names)


def _fit_left(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))] + \
        [fmt.format(*b).rstrip() for b in body]


@dataclasses.dataclass(frozen=True)
class Report:
    """Every matmul of a function with the FST decision for each of its three products.

    ``str(report)`` is a table that fits :data:`WIDTH` (120) columns: each product is ``sparse``
    or ``dense`` with a numbered note giving the reason, and the backend that runs it;
    ``report.table(full=True)`` has every field, one column each; ``report.rows`` are :class:`Row` s.

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
        """FLOPs of all matmul products of one training step (forward + backward), dense."""
        return sum(r.flops_dense for r in self.rows)

    @property
    def flops_executed(self) -> int:
        """The same as the chosen backends execute them."""
        return sum(r.flops_executed for r in self.rows)

    @property
    def flops_fst(self) -> int:
        """The 2:4 ideal: sparse products counted at half."""
        return sum(r.flops_fst for r in self.rows)

    def table(self, full: bool = False) -> str:
        """The report as text: compact (``WIDTH`` columns, reasons as notes) or ``full``.

        Example:
          >>> import jax, jax.numpy as jnp, fst_jax
          >>> S = jax.ShapeDtypeStruct
          >>> rep = fst_jax.report(lambda w, x: x @ w)(S((8, 4), jnp.float32), S((2, 8, 8), jnp.float32))
          >>> print(rep.table().splitlines()[2])
          0  <params>  f32[2,8,8] x f32[8,4]  rhs  1      dense[1]  dense[1]    dense[1]     1 (8)  -
        """
        if full:
            head = ("#", "where", "lhs x rhs", "weight", "trips", "token", "forward", "grad_input", "grad_weight",
                    "backends", "sr_ste", "GFLOP dense/executed/2:4")
            body = [(str(r.index), _where(r), f"{r.lhs} x {r.rhs}", r.weight or "-",
                     "?" if r.trips is None else str(r.trips), self._token(r), r.forward, r.grad_input,
                     r.grad_weight, "/".join(r.backends), r.sr_ste,
                     f"{r.flops_dense / 1e9:.4g}/{r.flops_executed / 1e9:.4g}/{r.flops_fst / 1e9:.4g}")
                    for r in self.rows]
            return "\n".join(_table(head, body) + [self._summary()])
        notes: dict[str, int] = {}

        def cell(p: Product, rotating: int = 0) -> str:
            """``sparse`` (+ the backend where not XLA, ``-`` where not computed) or ``dense[n]``."""
            if not p.sparse:
                return f"dense[{notes.setdefault(p.message, len(notes) + 1)}]"
            extra = f" rotating({rotating})" if rotating else ""  # the drawn pattern set's size
            if p.note and p.backend == "xla":
                return f"sparse[{notes.setdefault(f'on xla: {p.note}', len(notes) + 1)}]" + extra
            return "sparse" + {"xla": "", "none": " -"}.get(p.backend, f" {p.backend}") + extra

        def cells(d: Decision) -> tuple[str, str, str]:
            rotating = len(d.plan.patterns) if d.plan is not None else 0
            return cell(d.forward), cell(d.grad_input), cell(d.grad_weight, rotating)

        head = ("#", "where", "lhs x rhs", "w", "trips", "forward", "grad_input", "grad_weight", "token",
                "sr_ste")
        body = [(str(r.index), _fit_left(_compact_path(_where(r)), 25), _fit(_short(f"{r.lhs} x {r.rhs}"), 28),
                 r.weight or "-", "?" if r.trips is None else str(r.trips), *cells(r.decision), self._token(r),
                 {"off": "-", "parameter": "param"}.get(r.sr_ste, r.sr_ste)) for r in self.rows]
        lines = _table(head, body)
        lines += [_fit(f"[{n}] {reason}", WIDTH) for reason, n in notes.items()]
        lines += textwrap.wrap(self._summary(), WIDTH)
        return "\n".join(lines)

    @staticmethod
    def _token(r: Row) -> str:
        if r.tokens is None:
            return "-"
        return f"{r.token_axis} ({r.tokens})" if r.token_axis is not None else f"conv ({r.tokens})"

    def _summary(self) -> str:
        n_sparse = sum(r.sparse_gemms for r in self.rows)
        dense = self.flops_dense or 1
        return (f"{len(self.rows)} matmuls, {n_sparse} of {3 * len(self.rows)} products 2:4-sparse; GFLOP per "
                f"step: dense {self.flops_dense / 1e9:.4g}, executed {self.flops_executed / 1e9:.4g} "
                f"({self.flops_executed / dense:.2f}x), 2:4 ideal {self.flops_fst / 1e9:.4g} "
                f"({self.flops_fst / dense:.2f}x)")

    def __str__(self) -> str:
        return self.table()


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
    config, sig = check_call(fn, config, params_argnums, static_argnums, static_argnames)

    def run(*args: Any, **kwargs: Any) -> Report:
        traced = trace(fn, sig, config, sig.split(args, kwargs))
        return Report(tuple(_row(d) for d in traced.decisions), config)

    return run
