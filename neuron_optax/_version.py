"""The package version: the one place it is written (read by pyproject.toml and ``neuron_optax.__version__``)."""

__version__ = "0.1.0"
