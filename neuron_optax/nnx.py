"""Flax NNX support: record each layer's neurons in one forward and one backward pass.

:func:`value_grad_and_stats` is the NNX counterpart of
:func:`neuron_optax.value_grad_and_stats`: it wraps ``loss_fn(model, *args)``,
whose first argument is an ``nnx.Module``, and returns ``(value, grads,
stats)``. ``grads`` is the ``nnx.State`` of the model's ``nnx.Param`` variables,
as ``nnx.value_and_grad(loss_fn)`` returns it, and ``stats`` maps the path of
every captured layer in that State (``('layers', 0)``, ``('linear1',)``,
``()`` for a top-level layer) to a :class:`neuron_optax.LayerStats` with
exactly the linen conventions: rows ``(n, P, d_in)`` of layer inputs (im2col
patches for convolutions), cotangents ``(n, P, d_out)`` of the **mean** loss
w.r.t. the layer outputs, and for ``fisher="mc"``/``"full"`` the Fisher
cotangents ``(S, n, P, d_out)``.

Training loop (the transforms accept ``nnx.State`` parameters and gradients, so
``nnx.Optimizer`` forwards ``stats=`` to them)::

    import optax
    from flax import nnx
    import neuron_optax as nox

    model = MLP(rngs=nnx.Rngs(0))
    tx = optax.chain(nox.foof(damping=1.0), optax.sgd(0.1, momentum=0.9))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, x, y):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads, stats = nox.nnx.value_grad_and_stats(loss_fn)(model, x, y)
      optimizer.update(model, grads, stats=stats)
      return loss

Captured layers: ``nnx.Linear``, ``nnx.LinearGeneral`` (``batch_axis`` must be
empty, axis 0 must not be contracted), ``nnx.Conv`` (same padding modes as
linen: ``SAME``/``VALID``/explicit/``CIRCULAR``/``REFLECT``/``CAUSAL``; no
groups, no mask) and ``nnx.Einsum`` where it is a plain matrix contraction:
every kernel label is either contracted with the input (and absent from the
output) or an output label (absent from the input), the contracted labels come
first in the kernel, the output lists the kernel's output labels in kernel
order, the input's first axis is not contracted, and every non-contracted input
label reaches the output (no ``...`` in the kernel, no repeated labels). Any
other ``nnx.Einsum`` (e.g. ``'nta,hab->nthb'``, whose kernel has a per-head
axis) is left uncaptured with a warning: its parameters pass through the
transforms unchanged. Subclasses of these modules are captured through their
``__call__``'s input and output. ``nnx.LoRA`` is captured as two bias-free
dense layers, ``x -> h = x·lora_a`` and ``h -> h·lora_b``, keyed by the paths
of its ``lora_a`` and ``lora_b`` leaves; the base weight of ``nnx.LoRALinear``
(or an ``nnx.LoRA``'s ``base_module``) is a layer of its own when it is
differentiated (``wrt=nnx.LoRAParam`` freezes it). ``nnx.MultiHeadAttention``
is captured through its ``query``/``key``/``value``/``out`` ``LinearGeneral``
layers. ``nnx.Embed`` is captured with one-hot input rows kept as token ids,
and its ``attend`` (a tied output layer) adds that use's rows.

How the layers are intercepted (NNX has no method interceptor; see
:mod:`neuron_optax._src.nnx_recording`): the model is split into its
differentiated state (``wrt``, by default ``nnx.Param``) and the rest; inside
the differentiated function a copy is merged from that state
(``nnx.merge(..., copy=True)``), and for the duration of ``loss_fn`` each
captured layer of the *copy* has its ``__class__`` swapped for a cached
subclass whose ``__call__`` records the input rows and adds a zero
perturbation to the output (restored when ``loss_fn`` returns or raises; the
user's model object is never touched; the active recording is a context
variable scoped to the call). A first pass
under ``jax.eval_shape`` records the output shapes; the real pass
differentiates w.r.t. the parameters and the zero perturbations together, so
the output cotangents cost no extra backward pass. Updates the loss makes to
non-parameter variables (``BatchStat``, RNG counts, ``sow``n intermediates)
are written back to the model, as ``nnx.value_and_grad`` does. This works eagerly, under ``nnx.jit``
and under ``jax.jit``.

Cost: the same as the linen path and ``nnx.value_and_grad``: one forward and
one backward pass (``fisher="full"`` adds a vmapped VJP over ``positions ×
classes`` cotangent sets, ``"mc"`` over one set), plus one extra trace of the
loss under ``jax.eval_shape`` (trace time only, nothing runs; under ``jit``
it is paid once per compilation). Memory: each captured layer keeps its input
rows (for a convolution the im2col patches, ``prod(kernel_size)`` times its
input) and its output cotangents until the transform has used them.

Other NNX arguments: ``loss_fn(model, *args, **kwargs)`` may take further NNX
objects besides the model (an ``nnx.Rngs`` for dropout, a second module with
state, ``nnx.Metric``s), positionally, by keyword or inside pytrees, as with
``nnx.value_and_grad``: they are split together with the model (shared
references stay shared), merged inside the differentiated function, where
``loss_fn`` may use and mutate them, and their updated state (RNG counts, batch
statistics) is written back. Only the model's (the first argument's)
``nnx.Param`` variables are differentiated and only its layers are captured;
a layer shared with another argument counts as the model's.

Layers inside NNX transforms: ``nnx.scan``/``nnx.vmap`` copy the modules they
get; a captured layer's copy carries its layer's path (a static attribute set
on the private copy while ``loss_fn`` runs), so its calls are recorded too.
Over stacked modules (built with ``nnx.vmap``, ``in_axes=0`` for their state)
each call reads two zero probes stored as Variables of the kernel's type next
to the kernel, which the transform slices like the kernel (see
:mod:`neuron_optax._src.capture_probes`); ``nnx.remat`` and ``nnx.jit`` work the
same way. A layer whose weights serve several iterations of a vmap/scan, or
called inside ``nnx.cond``/``nnx.while_loop``, raises ``NotImplementedError``
rather than returning statistics that disagree with the gradient. For
``fisher="mc"``/``"full"`` ``loss_fn`` must call the model (its ``__call__``)
exactly once, directly, and the model must return one array (logits or
predictions).

Kernel layout: the transforms split a kernel into input and output axes by
``kernel_input_ndim`` ("all but the last", attention ``query/key/value``: 1).
For stacked modules and other multi-axis ``nnx.LinearGeneral``/``nnx.Einsum``
outputs pass ``kernel_input_ndim=nox.nnx.kernel_layouts(model)``, which
reads the layout off the modules.
"""

from neuron_optax._src.nnx import captured_layers, kernel_layouts, value_grad_and_stats

__all__ = ["value_grad_and_stats", "kernel_layouts", "captured_layers"]
