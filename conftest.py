"""Test settings: 8 simulated CPU devices, derandomized hypothesis, strict JAX checks."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402
import jax  # noqa: E402

hypothesis.settings.register_profile("fst", derandomize=True, deadline=None, max_examples=50)
hypothesis.settings.load_profile("fst")

jax.config.update("jax_numpy_rank_promotion", "raise")
