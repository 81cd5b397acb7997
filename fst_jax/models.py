"""Small Flax linen models for the examples and the ``fst-jax train`` command.

The models are ordinary Flax code: nothing in them knows about FST. Sparse training comes from
wrapping the *loss function* with :func:`fst_jax.sparsify`, which rewrites the weight matmuls
that the models' ``nn.Dense`` and ``nn.MultiHeadDotProductAttention`` layers emit.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MLP", "Transformer", "TransformerBlock"]


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
