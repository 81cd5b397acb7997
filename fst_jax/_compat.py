"""The one module that touches ``jax.extend`` and ``jax._src``, and absorbs version differences.

Supported: jax 0.10.2 (Python 3.11) and jax 0.11.x (Python 3.12, the GPU machine's version).
Differences handled here:

* ``ClosedJaxpr`` is its own class in 0.10 and an alias of ``Jaxpr`` (carrying ``.consts``) in 0.11.
* ``scan`` counts its consts and carries with ``num_consts``/``num_carry`` in 0.10 and with the
  ``ft_in`` flat trees in 0.11.
* Lowering Pallas-Triton kernels for CUDA on a machine without a GPU: 0.10 needs nothing but
  ``lowering_platforms=("cuda",)``; 0.11+ reads the target GPU from an ``AbstractMesh`` whose
  ``abstract_device`` is a GPU (set with ``use_abstract_mesh``), and warns on every
  Pallas-Triton lowering that the backend is deprecated.
* ``shard_map`` bodies are re-traced by the primitive itself through ``subfuns``, which return a
  ``FlatTree`` (``jax._src.tree_util.FlatTree`` in 0.10, ``jax._src.flattree`` in 0.11).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend.core as jex
from jax._src import source_info_util

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

Jaxpr = jex.Jaxpr
ClosedJaxpr = jex.ClosedJaxpr
Literal = jex.Literal
DropVar = jex.DropVar
Var = jex.Var
JaxprEqn = jex.JaxprEqn
prims = jex.primitives
Tracer = jax.core.Tracer

JAXPR_TYPES = (jex.Jaxpr, jex.ClosedJaxpr)


def _find_prim(name: str) -> Any:
    """The primitive object ``name`` (``'split'``, ``'shard_map'``, ...), or None in this version."""
    prim = getattr(prims, f"{name}_p", None)
    if prim is not None:
        return prim
    import importlib  # noqa: PLC0415

    for mod in ("jax._src.lax.lax", "jax._src.shard_map", "jax._src.dispatch", "jax._src.pjit"):
        try:
            prim = getattr(importlib.import_module(mod), f"{name}_p", None)
        except ImportError:  # pragma: no cover - optional modules
            continue
        if prim is not None:
            return prim
    return None


#: Primitive objects by short name; ``None`` where this jax version has no such primitive.
P = {name: _find_prim(name) for name in (
    "dot_general", "conv_general_dilated", "jit", "closed_call", "remat", "scan", "while", "cond",
    "custom_vjp_call", "custom_jvp_call", "custom_lin", "shard_map", "convert_element_type",
    "transpose", "reshape", "squeeze", "broadcast_in_dim", "slice", "dynamic_slice", "copy", "rev", "split",
    "concatenate", "sharding_constraint", "device_put", "reduce_precision")}


#: The parameter holding the body of a call-like primitive.
CALL_JAXPR = {p: name for p, name in ((P["jit"], "jaxpr"), (P["closed_call"], "call_jaxpr")) if p is not None}


def trace_context() -> Any:
    """What ``jax.jit`` keys its caches on besides the avals: x64, the abstract mesh, ... (hashable)."""
    from jax._src import config as _config  # noqa: PLC0415

    return _config.trace_context()


def eval_closed(closed: Any, *args: Any) -> list[Any]:
    """Evaluates a closed jaxpr under the current trace (dead values freed as it goes)."""
    return jex.jaxpr_as_fun(closed)(*args)


@contextlib.contextmanager
def concrete_eval() -> Iterator[None]:
    """Evaluates jax ops eagerly here, even under a trace (``jax.ensure_compile_time_eval``).

    On jax >= 0.11 also outside any abstract mesh: eager dispatch under the abstract GPU mesh of
    :func:`lower_for_cuda` (or a user's) would demand ``lowering_platforms``.
    """
    if JAX_VERSION < (0, 11):
        with jax.ensure_compile_time_eval():
            yield
        return
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())), jax.ensure_compile_time_eval():
        yield


def jaxpr_fun(closed: Any) -> Callable[..., list[Any]]:
    """A closed jaxpr as a Python function of its inputs."""
    return jex.jaxpr_as_fun(closed)


try:  # jax >= 0.11
    from jax._src import flattree as _ft

    def _flat_tree(values: Any, aux: Any) -> Any:
        return _ft.flatten(values).with_aux(aux)

except ImportError:  # jax 0.10
    from jax._src.tree_util import FlatTree as _FlatTree

    def _flat_tree(values: Any, aux: Any) -> Any:
        return _FlatTree.flatten(values).with_aux(aux)


def open_jaxpr(j: Any) -> tuple[Any, list[Any]]:
    """(open jaxpr, consts) of a jaxpr-valued parameter, closed or open, in any version."""
    if isinstance(j, jex.ClosedJaxpr) and hasattr(j, "jaxpr") and j.jaxpr is not j:
        return j.jaxpr, list(j.consts)
    return j, list(getattr(j, "consts", ()) or ())


def scan_counts(params: dict[str, Any]) -> tuple[int, int]:
    """(num_consts, num_carry) of a scan equation."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].elts
    return len(consts), len(carry)


def while_counts(params: dict[str, Any]) -> tuple[int, int]:
    """(cond_nconsts, body_nconsts) of a while equation."""
    return params["cond_nconsts"], params["body_nconsts"]


def bind_eqn(eqn: Any, invals: Sequence[Any], params: dict[str, Any] | None = None,
             context: bool = True) -> list[Any]:
    """Re-binds an equation under the current trace, keeping its name stack and context
    (``context=False``: without the trace-time context, e.g. its abstract mesh, for eager use)."""
    params = eqn.params if params is None else params
    bind_params = eqn.primitive.get_bind_params(params)
    if isinstance(bind_params, tuple):  # jax <= 0.9.1 returned (subfuns, params)
        subfuns, bind_params = bind_params
        invals = [*subfuns, *invals]
    with eqn_context(eqn) if context else contextlib.nullcontext():
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


@contextlib.contextmanager
def eqn_context(eqn: Any) -> Iterator[None]:
    """Binds under the equation's own name stack (Flax module names) and context."""
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
        yield


def bind_shard_map(eqn: Any, invals: Sequence[Any], body: Callable[..., list[Any]]) -> list[Any]:
    """Binds a ``shard_map`` equation whose body is ``body(*args)`` instead of its jaxpr.

    The primitive re-traces ``body`` itself, inside its own manual-axes environment.
    """
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    out_specs = eqn.params["out_specs"]
    bind_params["subfuns"] = (lambda *args: _flat_tree(body(*args), out_specs),)
    with eqn_context(eqn):
        return list(eqn.primitive.bind(*invals, **bind_params))


def name_stack(eqn: Any) -> str:
    """The equation's name stack as a string, e.g. ``'MLP/Dense_0'``."""
    return str(eqn.source_info.name_stack)


def source_line(eqn: Any) -> str:
    """``file:line (function)`` of the user code that produced the equation."""
    try:
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - best effort, for display only
        return "unknown"


def like_param(orig: Any, new: Any, prim_name: str) -> Any:
    """Shapes a re-traced (closed) jaxpr like the parameter it replaces."""
    if jex.ClosedJaxpr is jex.Jaxpr or isinstance(orig, jex.ClosedJaxpr):
        return new
    if new.consts:
        raise NotImplementedError(
            f"fst_jax: rewriting the body of {prim_name!r} created constants, which an open jaxpr "
            "cannot hold; please report this with the function that triggers it")
    return new.jaxpr


# ------------------------------------------------------------------------------------------------
# Pallas-Triton lowering for CUDA without a GPU

#: The start of the ``DeprecationWarning`` that jax >= 0.11 emits for every Pallas-Triton lowering.
TRITON_DEPRECATION_MESSAGE = "The Pallas Triton backend is deprecated"

#: ``pytest.mark.filterwarnings`` / ini ``filterwarnings`` entry that ignores exactly that warning.
TRITON_DEPRECATION_FILTER = f"ignore:{TRITON_DEPRECATION_MESSAGE}:DeprecationWarning"

#: The ``device_kind`` of the GPU the kernels are lowered for (what an H100 SXM reports).
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
_H100_NUM_CORES = 132  # streaming multiprocessors of an H100 SXM


@contextlib.contextmanager
def ignore_triton_deprecation() -> Iterator[None]:
    """Ignores the Pallas-Triton deprecation warning of jax >= 0.11, and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=re.escape(TRITON_DEPRECATION_MESSAGE), category=DeprecationWarning
        )
        yield


@contextlib.contextmanager
def abstract_gpu(device_kind: str = H100_DEVICE_KIND) -> Iterator[None]:
    """Makes ``device_kind`` the target GPU of lowerings in this context (jax >= 0.11 only).

    On jax 0.10 it does nothing: there the Triton lowering needs no device.
    """
    if JAX_VERSION < (0, 11):
        yield
        return
    device = jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=_H100_NUM_CORES, platform="cuda"
    )
    mesh = jax.sharding.AbstractMesh(
        (1,), ("_fst_gpu",), (jax.sharding.AxisType.Explicit,), abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def lower_for_cuda(fn: Callable[..., Any], *args: Any) -> str:
    """Lowers ``jax.jit(fn)(*args)`` for CUDA on any machine and returns the StableHLO text.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``. A Pallas-Triton kernel shows up in the text
    as a ``stablehlo.custom_call`` to ``__gpu$xla.gpu.triton`` with the Triton module serialized in
    its backend config. Lowering runs the whole Pallas-to-Triton-IR lowering, so it catches most
    Triton lowering errors without a GPU; what the Triton compiler itself checks later
    (shared memory, registers, layouts) shows only on a GPU.
    """
    with ignore_triton_deprecation(), abstract_gpu():
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        return lowered.as_text()
