"""Small Flax models (linen, and one nnx) for the examples and the ``fst-jax train`` command.

The models are ordinary Flax code: nothing in them knows about FST. Sparse training comes from
wrapping the *loss function* with :func:`fst_jax.sparsify`, which rewrites the weight matmuls
that the models' ``nn.Dense``, ``nn.MultiHeadDotProductAttention`` and ``nnx.Linear`` layers emit.

* :class:`MLP`: linen multilayer perceptron on flat inputs ``[B, D]``.
* :class:`Transformer`: linen pre-LayerNorm encoder classifier on tokens ``[B, T, P]``.
* :class:`CNN`: linen 1-D convolutional network on tokens ``[B, T, C]``, each convolution written
  as :func:`unfold_windows` followed by ``nn.Dense`` (a matmul, not ``lax.conv``).
* :class:`ResNet`: linen residual CNN with ``nn.Conv`` (``lax.conv_general_dilated``) over signals
  ``[B, L, C]`` (1-D) or images ``[B, H, W, C]`` (2-D).
* :class:`MLPNNX`: the :class:`MLP` written in Flax NNX (``nnx.Linear``), for training through
  ``nnx.split`` / ``nnx.merge``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["CNN", "MLP", "MLPNNX", "ResNet", "ResidualBlock", "Transformer", "TransformerBlock", "unfold_windows"]


class MLP(nn.Module):
    """A multilayer perceptron: ``Dense → gelu`` per hidden layer, then a ``Dense`` head.

    Attributes:
      features: the width of each hidden layer, e.g. ``(256, 256, 256)``.
      num_classes: the number of output logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax.models import MLP
      >>> model = MLP(features=(32, 32), num_classes=10)
      >>> x = jnp.ones((4, 64))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> model.apply({"params": params}, x).shape
      (4, 10)
    """

    features: Sequence[int]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps inputs ``[..., D]`` to logits ``[..., num_classes]``.

        Args:
          x: the input features, ``[..., D]``.

        Returns:
          The logits, ``[..., num_classes]``.
        """
        for width in self.features:
            x = nn.gelu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes, name="head")(x)


class TransformerBlock(nn.Module):
    """A pre-LayerNorm transformer encoder block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``.

    Attributes:
      num_heads: the number of attention heads (must divide the model width).
      mlp_ratio: the hidden width of the MLP as a multiple of the model width.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax.models import TransformerBlock
      >>> block = TransformerBlock(num_heads=2)
      >>> x = jnp.ones((2, 4, 16))
      >>> params = block.init(jax.random.key(0), x)["params"]
      >>> block.apply({"params": params}, x).shape
      (2, 4, 16)
    """

    num_heads: int = 4
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to tokens ``[B, T, d_model]``.

        Args:
          x: the token embeddings, ``[B, T, d_model]``.

        Returns:
          The updated token embeddings, same shape.
        """
        d_model = x.shape[-1]
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=d_model)(y)
        x = x + y
        y = nn.LayerNorm()(x)
        y = nn.gelu(nn.Dense(self.mlp_ratio * d_model)(y))
        y = nn.Dense(d_model)(y)
        return x + y


class Transformer(nn.Module):
    """A small pre-LayerNorm transformer encoder classifier over patch tokens.

    Input patches ``[B, T, P]`` → ``Dense`` embedding → learned positional embedding →
    ``num_layers`` :class:`TransformerBlock` s → mean over tokens → ``LayerNorm`` → ``Dense`` head.

    Attributes:
      num_tokens: ``T``, the number of tokens (patches) per example.
      d_model: the model width (divisible by ``num_heads``).
      num_heads: the number of attention heads.
      num_layers: the number of transformer blocks.
      mlp_ratio: the hidden width of each block's MLP as a multiple of ``d_model``.
      num_classes: the number of output logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax.models import Transformer
      >>> model = Transformer(num_tokens=8, d_model=16, num_heads=2, num_layers=1, num_classes=10)
      >>> x = jnp.ones((4, 8, 8))  # 4 examples, 8 tokens of 8 features
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> model.apply({"params": params}, x).shape
      (4, 10)
    """

    num_tokens: int
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps patch tokens ``[B, T, P]`` to logits ``[B, num_classes]``.

        Args:
          x: the patches, ``[B, T, P]`` with ``T == num_tokens``.

        Returns:
          The logits, ``[B, num_classes]``.

        Raises:
          ValueError: ``x`` is not 3-D or its token count is not ``num_tokens``.
        """
        if x.ndim != 3 or x.shape[1] != self.num_tokens:
            raise ValueError(
                f"Transformer expects patches of shape [B, {self.num_tokens}, P], got {x.shape}"
            )
        x = nn.Dense(self.d_model, name="embed")(x)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (self.num_tokens, self.d_model)
        )
        x = x + jnp.expand_dims(pos, 0).astype(x.dtype)
        for _ in range(self.num_layers):
            x = TransformerBlock(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)(x)
        x = jnp.mean(x, axis=1)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(self.num_classes, name="head")(x)


def unfold_windows(x: jax.Array, window: int) -> jax.Array:
    """The sliding windows of a token sequence, concatenated: ``[B, T, C] → [B, T, window·C]``.

    Output token ``t`` holds input tokens ``t − (window−1)//2 … t + window//2`` (zeros outside
    the sequence, "SAME" padding), window position major, channel minor. ``nn.Dense`` on the
    result is a stride-1 1-D convolution of width ``window`` written as one matmul, which
    :func:`fst_jax.sparsify` treats as a weight matmul with ``K = window·C`` and token axis ``T``.

    Args:
      x: the tokens, ``[..., T, C]``.
      window: the number of tokens per window (>= 1).

    Returns:
      The windows, ``[..., T, window·C]``.

    Raises:
      ValueError: ``x`` has fewer than 2 dimensions or ``window < 1``.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax.models import unfold_windows
      >>> x = jnp.arange(4.0).reshape(1, 4, 1)  # 4 tokens of 1 channel: 0 1 2 3
      >>> print(unfold_windows(x, 3)[0])
      [[0. 0. 1.]
       [0. 1. 2.]
       [1. 2. 3.]
       [2. 3. 0.]]
    """
    if x.ndim < 2:
        raise ValueError(f"unfold_windows expects tokens [..., T, C], got shape {x.shape}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"unfold_windows: window must be an int >= 1, got {window!r}")
    seq = x.shape[-2]
    left = (window - 1) // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(left, window - 1 - left), (0, 0)]
    padded = jnp.pad(x, pad)
    return jnp.concatenate([padded[..., i : i + seq, :] for i in range(window)], axis=-1)


class CNN(nn.Module):
    """A 1-D convolutional classifier over a token sequence, every convolution a matmul.

    Tokens ``[B, T, C]`` → per layer: :func:`unfold_windows` then ``Dense(width) → gelu`` (a
    "SAME" stride-1 convolution of width ``window``) → flatten ``[B, T·width]`` → ``Dense``
    head. The sequence length stays ``T`` throughout, so the grad-weight product of every
    convolution has the token axis ``T`` to sparsify (``T % 4 == 0`` is needed for that).

    Attributes:
      features: the number of channels of each convolution, e.g. ``(64, 64, 64)``.
      window: the convolution width in tokens.
      num_classes: the number of output logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax.models import CNN
      >>> model = CNN(features=(16, 16), num_classes=10)
      >>> x = jnp.ones((4, 8, 5))  # 4 examples, 8 tokens of 5 samples
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> model.apply({"params": params}, x).shape
      (4, 10)
      >>> params["conv_0"]["kernel"].shape  # window 3 × 5 channels in, 16 out
      (15, 16)
    """

    features: Sequence[int]
    window: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps tokens ``[B, T, C]`` to logits ``[B, num_classes]``.

        Args:
          x: the tokens, ``[B, T, C]``.

        Returns:
          The logits, ``[B, num_classes]``.

        Raises:
          ValueError: ``x`` is not 3-D.
        """
        if x.ndim != 3:
            raise ValueError(f"CNN expects tokens of shape [B, T, C], got {x.shape}")
        for i, width in enumerate(self.features):
            x = nn.gelu(nn.Dense(width, name=f"conv_{i}")(unfold_windows(x, self.window)))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="head")(x)


class ResidualBlock(nn.Module):
    """A pre-activation residual block: ``x + conv(act(norm(conv(act(norm(x))))))``, 3-wide kernels.

    With ``strides=2`` the first convolution halves every spatial size (rounding up, "SAME"
    padding) and the shortcut is a 2-wide average pool with stride 2, so the block has no
    projection weights and the channel count stays the same.

    Attributes:
      features: the channel count (in and out).
      strides: 1, or 2 to downsample.
      num_groups: the groups of each ``nn.GroupNorm`` (must divide ``features``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax.models import ResidualBlock
      >>> block = ResidualBlock(features=8, strides=2, num_groups=4)
      >>> x = jnp.ones((2, 8, 8, 8))
      >>> params = block.init(jax.random.key(0), x)["params"]
      >>> block.apply({"params": params}, x).shape
      (2, 4, 4, 8)
    """

    features: int
    strides: int = 1
    num_groups: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``[B, *spatial, features]``.

        Args:
          x: the feature map, channels last.

        Returns:
          The feature map, spatial sizes divided by ``strides`` (rounded up).
        """
        nsp = x.ndim - 2
        y = nn.Conv(self.features, (3,) * nsp, strides=self.strides)(
            nn.relu(nn.GroupNorm(num_groups=self.num_groups)(x)))
        y = nn.Conv(self.features, (3,) * nsp)(nn.relu(nn.GroupNorm(num_groups=self.num_groups)(y)))
        if self.strides != 1:
            x = nn.avg_pool(x, (2,) * nsp, strides=(2,) * nsp, padding="SAME")
        return x + y


class ResNet(nn.Module):
    """A small residual CNN with real convolutions, 1-D or 2-D by the input's rank.

    ``[B, L, C]`` (1-D) or ``[B, H, W, C]`` (2-D) → 3-wide ``nn.Conv`` stem to ``features``
    channels → ``num_blocks`` :class:`ResidualBlock` s (block ``i >= 1`` with ``i`` odd downsamples
    by 2 when ``downsample``) → ``GroupNorm → relu`` → global average pool → ``Dense`` head. As in
    the FST paper, the stem (the first weight matmul, few input channels) and the classifier (the
    last) are what ``FSTConfig(skip_first=True, skip_last=True)`` leaves dense; every block
    convolution is sparsified in all three products.

    Normalization is ``nn.GroupNorm``, not ``nn.BatchNorm``: it needs no ``batch_stats``
    collection, so the model is a pure ``apply(params, x)`` like the others (one loss function for
    training and evaluation), and it does not depend on the batch.

    Attributes:
      features: the channel count of the stem and every block.
      num_blocks: the number of residual blocks (two convolutions each).
      downsample: halve the spatial sizes at blocks 1, 3, 5, ...
      num_groups: the groups of each ``nn.GroupNorm`` (must divide ``features``).
      num_classes: the number of output logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax.models import ResNet
      >>> model = ResNet(features=8, num_blocks=2, num_groups=4)
      >>> signal = jnp.ones((4, 40, 1))  # 1-D: 4 signals of 40 samples
      >>> params = model.init(jax.random.key(0), signal)["params"]
      >>> model.apply({"params": params}, signal).shape
      (4, 10)
      >>> params["ResidualBlock_0"]["Conv_0"]["kernel"].shape  # width 3, 8 channels in and out
      (3, 8, 8)
      >>> images = jnp.ones((4, 8, 8, 1))  # 2-D: 4 images of 8x8 pixels
      >>> model.apply(model.init(jax.random.key(0), images), images).shape
      (4, 10)
    """

    features: int = 32
    num_blocks: int = 2
    downsample: bool = False
    num_groups: int = 8
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, L, C]`` or ``[B, H, W, C]`` to logits ``[B, num_classes]``.

        Args:
          x: signals or images, channels last.

        Returns:
          The logits, ``[B, num_classes]``.

        Raises:
          ValueError: ``x`` is not 3-D or 4-D, or ``num_groups`` does not divide ``features``.
        """
        if x.ndim not in (3, 4):
            raise ValueError(
                f"ResNet expects signals [B, L, C] or images [B, H, W, C], got shape {x.shape}")
        if self.features % self.num_groups:
            raise ValueError(f"ResNet: num_groups={self.num_groups} must divide features={self.features}")
        nsp = x.ndim - 2
        x = nn.Conv(self.features, (3,) * nsp, name="stem")(x)
        for i in range(self.num_blocks):
            x = ResidualBlock(self.features, strides=2 if self.downsample and i % 2 else 1,
                              num_groups=self.num_groups)(x)
        x = nn.relu(nn.GroupNorm(num_groups=self.num_groups)(x))
        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        return nn.Dense(self.num_classes, name="head")(x)


class MLPNNX(nnx.Module):
    """The :class:`MLP` in Flax NNX: ``Linear → gelu`` per hidden layer, then a ``Linear`` head.

    NNX modules hold their parameters, so they are created from ``in_features`` and an
    ``nnx.Rngs``. To train one with :func:`fst_jax.sparsify`, split it into its graph and its
    parameter state and pass the state as the loss's first argument (the ``params_argnums`` of
    ``sparsify``), merging them back inside the loss.

    Args:
      in_features: the input width ``D``.
      features: the width of each hidden layer.
      num_classes: the number of output logits.
      rngs: the random streams for the initialization.

    Example:
      >>> import jax, jax.numpy as jnp, optax, fst_jax
      >>> from flax import nnx
      >>> from fst_jax.models import MLPNNX
      >>> model = MLPNNX(64, (32, 32), 10, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(model, nnx.Param)
      >>> def loss(params, x, y):
      ...     logits = nnx.merge(graphdef, params)(x)
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      >>> x, y = jnp.ones((8, 64)), jnp.zeros((8,), jnp.int32)
      >>> grads = jax.grad(fst_jax.sparsify(loss))(params, x, y)
      >>> grads["layers"][1]["kernel"][...].shape
      (32, 32)
    """

    def __init__(
        self, in_features: int, features: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs
    ) -> None:
        layers = []
        for width in features:
            layers.append(nnx.Linear(in_features, width, rngs=rngs))
            in_features = width
        self.layers = nnx.List(layers)
        self.head = nnx.Linear(in_features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps inputs ``[..., D]`` to logits ``[..., num_classes]``.

        Args:
          x: the input features, ``[..., D]``.

        Returns:
          The logits, ``[..., num_classes]``.
        """
        for layer in self.layers:
            x = nnx.gelu(layer(x))
        return self.head(x)
