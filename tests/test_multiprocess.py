"""Many processes: 2 processes × 2 CPU devices (jax.distributed, gloo) equal 1 process × 4 devices.

Every transform, with the batch sharded over all 4 devices and the FOOF/KFAC state sharded by
``nox.state_sharding``; FOOF and standard KFAC also with ``distribute_factorisations``. The
2-process run also saves its sharded FOOF state with orbax (when installed: the ``checkpoint`` extra)
and restores it exactly.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent("""
    import importlib.util, sys
    process_id, num_processes, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
      jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
    import jax.numpy as jnp, numpy as np, optax, flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import neuron_optax as nox
    assert jax.device_count() == 4 and jax.local_device_count() == 4 // num_processes, jax.devices()

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        h = nn.tanh(nn.Dense(16, param_dtype=jnp.float64)(x))
        h = nn.tanh(nn.Dense(8, param_dtype=jnp.float64)(h))
        return nn.Dense(4, param_dtype=jnp.float64)(h)

    model = Net()
    rng = np.random.default_rng(0)
    x_all = rng.normal(size=(16, 7))
    y_all = rng.integers(0, 4, size=16)
    params = model.init(jax.random.key(0), jnp.asarray(x_all))["params"]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P("data"))

    def global_array(values):
      # Each process contributes the rows its devices hold (multi-host data loading).
      return jax.make_array_from_callback(values.shape, batch, lambda index: values[index])

    x, y = global_array(x_all), global_array(y_all)
    params = jax.device_put(params, replicated)
    spread = (mesh, "data")
    transforms = {
      "foof": nox.foof(0.5, inverse_every=2),
      "foof_distributed": nox.foof(0.5, inverse_every=2, distribute_factorisations=spread),
      "kfac": nox.kfac(0.5, inverse_every=2),
      "kfac_standard_distributed": nox.kfac(0.5, damping_mode="standard", inverse_every=2,
                                            distribute_factorisations=spread),
      "natural_gradient": nox.natural_gradient(0.5),
      "natural_gradient_block": nox.natural_gradient(0.5, block_diagonal=True),
      "fngd": nox.fngd(0.1, steps_per_epoch=2, batch_size=16),
    }
    results = {}
    for name, pre in transforms.items():
      tx = optax.chain(pre, optax.sgd(0.1, momentum=0.9))
      shardings = nox.state_sharding(jax.eval_shape(tx.init, params), mesh, min_elements=1)

      def step(p, s, x, y):
        def loss_fn(p):
          return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()
        loss, grads, stats = nox.value_grad_and_stats(loss_fn)(p)
        updates, s = tx.update(grads, s, p, stats=stats)
        return optax.apply_updates(p, updates), s, loss

      step = jax.jit(step, out_shardings=(replicated, shardings, replicated))
      p, s = params, jax.jit(tx.init, out_shardings=shardings)(params)
      for _ in range(3):
        p, s, loss = step(p, s, x, y)
      for i, leaf in enumerate(jax.tree.leaves(p)):
        results[f"{name}/{i}"] = np.asarray(leaf)  # replicated: every process holds all of it
      results[f"{name}/loss"] = np.asarray(loss)
      if name == "foof" and num_processes > 1 and importlib.util.find_spec("orbax") is not None:
        import orbax.checkpoint as ocp
        path = out_dir + "/checkpoint"
        with ocp.StandardCheckpointer() as checkpointer:
          checkpointer.save(path, s)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), s)
        with ocp.StandardCheckpointer() as checkpointer:
          restored = checkpointer.restore(path, abstract)
        same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)) and a.sharding == b.sharding, s, restored)
        assert all(jax.tree.leaves(same)), same
        sharded = [leaf for leaf in jax.tree.leaves(restored) if not leaf.sharding.is_fully_replicated]
        assert sharded, "the FOOF state should be sharded"
        print("CHECKPOINT OK", len(sharded), "sharded leaves", flush=True)
    if process_id == 0:
      np.savez(f"{out_dir}/results_{num_processes}.npz", **results)
    print("DONE", process_id, flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  # The worker script lives in tmp_path: put this checkout first on its path.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  python_path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
  base = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path)
  flags = os.environ.get("XLA_FLAGS", "")  # the suite's code-generation flags (conftest), no device count
  port = str(_free_port())
  env2 = dict(base, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2")
  workers = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), "2", port, str(tmp_path)],
      env=env2,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  env4 = dict(base, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4")
  single = subprocess.run(
    [sys.executable, str(script), "0", "1", "0", str(tmp_path)], env=env4, capture_output=True, text=True, timeout=900
  )
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=900)[0])
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output
    if importlib.util.find_spec("orbax") is not None:  # optional: pip install neuron_optax[checkpoint]
      assert "CHECKPOINT OK" in output, output
  assert single.returncode == 0, single.stdout + single.stderr
  two, one = np.load(tmp_path / "results_2.npz"), np.load(tmp_path / "results_1.npz")
  assert sorted(two.files) == sorted(one.files)
  names = {key.split("/")[0] for key in one.files}
  assert len(names) == 7, names
  for key in one.files:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-12, atol=1e-13, err_msg=key)
