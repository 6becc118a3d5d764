"""Implementation of neuron_optax; the public API is ``neuron_optax`` (``nox``) and ``neuron_optax.nnx``."""
