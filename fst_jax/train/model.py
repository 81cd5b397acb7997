"""The main job's models: the Flax module of ``--model`` and its parameters and predict function.

The modules themselves are in :mod:`fst_jax.models`; this module picks one by name, with the
main job's default width and depth, and initializes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fst_jax.models import CNN, MLP, MLPNNX, ResNet, Transformer
from fst_jax.train.data import NUM_TOKENS, _check_model

__all__ = ["DEFAULT_DEPTH", "DEFAULT_WIDTH", "init_model", "make_model"]

DEFAULT_WIDTH = {"mlp": 256, "transformer": 64, "cnn": 64, "resnet": 32, "mlp_nnx": 256}
DEFAULT_DEPTH = {"mlp": 3, "transformer": 2, "cnn": 3, "resnet": 2, "mlp_nnx": 3}
NUM_HEADS = 4
CNN_WINDOW = 3

Params = Any
PredictFn = Callable[[Params, jax.Array], jax.Array]


def make_model(
    model: str,
    width: int,
    depth: int,
    num_classes: int = 10,
    *,
    num_tokens: int = NUM_TOKENS,
    in_features: int | None = None,
    seed: int = 0,
) -> nn.Module | nnx.Module:
    """Builds the Flax model for ``--model``.

    Args:
      model: ``"mlp"`` (``depth`` hidden layers of ``width``), ``"transformer"`` (``depth``
        blocks of width ``width``, 4 heads), ``"cnn"`` (``depth`` convolutions of ``width``
        channels, window 3), ``"resnet"`` (a stem and ``depth`` residual blocks of two 3-wide
        convolutions of ``width`` channels, GroupNorm with ``gcd(width, 8)`` groups) or
        ``"mlp_nnx"`` (the MLP in Flax NNX).
      width: the hidden width (MLPs), ``d_model`` (transformer) or channels (CNN, ResNet).
      depth: the number of hidden layers (MLPs), transformer blocks, convolutions (CNN) or
        residual blocks (ResNet).
      num_classes: the number of output logits.
      num_tokens: the number of tokens (transformer).
      in_features: the input width (``mlp_nnx`` only: NNX modules are created with their
        parameters).
      seed: the initialization seed (``mlp_nnx`` only: ``nnx.Rngs(seed)``).

    Returns:
      The unbound linen module, or for ``mlp_nnx`` the initialized NNX module.

    Raises:
      ValueError: ``model`` is not one of :data:`~fst_jax.train.data.MODELS`, or ``mlp_nnx``
        without ``in_features``.

    Example:
      >>> from fst_jax.train import make_model
      >>> make_model("mlp", width=32, depth=2).features
      (32, 32)
    """
    _check_model(model)
    if model == "mlp":
        return MLP(features=(width,) * depth, num_classes=num_classes)
    if model == "cnn":
        return CNN(features=(width,) * depth, window=CNN_WINDOW, num_classes=num_classes)
    if model == "resnet":
        return ResNet(features=width, num_blocks=depth, num_groups=math.gcd(width, 8),
                      num_classes=num_classes)
    if model == "transformer":
        return Transformer(
            num_tokens=num_tokens,
            d_model=width,
            num_heads=NUM_HEADS,
            num_layers=depth,
            num_classes=num_classes,
        )
    if in_features is None:
        raise ValueError("make_model('mlp_nnx', ...) needs in_features (the input width)")
    return MLPNNX(in_features, (width,) * depth, num_classes, rngs=nnx.Rngs(seed))


def init_model(
    model: str, width: int, depth: int, x_example: np.ndarray, seed: int, num_classes: int = 10
) -> tuple[Params, PredictFn]:
    """The initial parameters and the ``predict_fn(params, x) -> logits`` of ``--model``.

    Linen models are initialized with ``jax.random.key(seed)`` (one jitted ``init``); the NNX
    model with ``nnx.Rngs(seed)`` and split with ``nnx.split(model, nnx.Param, ...)``: its
    parameter state is the ``params`` (the first argument of ``predict_fn``, and so of the loss,
    which is what :func:`fst_jax.sparsify` treats as the weights) and ``predict_fn`` merges it
    back with the graph (``nnx.merge``).

    Args:
      model: one of :data:`~fst_jax.train.data.MODELS`.
      width: see :func:`make_model`.
      depth: see :func:`make_model`.
      x_example: inputs in the model's layout (only the shape of one example is used).
      seed: the initialization seed.
      num_classes: the number of output logits.

    Returns:
      ``(params, predict_fn)``.

    Raises:
      ValueError: ``model`` is not one of :data:`~fst_jax.train.data.MODELS`.

    Example:
      >>> import numpy as np
      >>> from fst_jax.train import init_model
      >>> params, predict = init_model("mlp_nnx", 16, 1, np.zeros((2, 40), np.float32), seed=0)
      >>> predict(params, np.zeros((3, 40), np.float32)).shape
      (3, 10)
    """
    _check_model(model)
    x_example = np.asarray(x_example)
    module = make_model(
        model,
        width,
        depth,
        num_classes,
        num_tokens=x_example.shape[1] if x_example.ndim == 3 else NUM_TOKENS,
        in_features=x_example.shape[-1],
        seed=seed,
    )
    if isinstance(module, nnx.Module):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)

        def nnx_predict(p: Params, x: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, p, rest)(x)

        return params, nnx_predict
    # One jitted init (eager init dispatches, and compiles, every initializer op separately).
    params = jax.jit(module.init)(jax.random.key(seed), jnp.asarray(x_example[:1]))["params"]

    def linen_predict(p: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": p}, x)

    return params, linen_predict
