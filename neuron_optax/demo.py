"""``python -m neuron_optax.demo``: runs :mod:`neuron_optax.examples.demo` (see there)."""

from neuron_optax.examples.demo import main

if __name__ == "__main__":
  main()
