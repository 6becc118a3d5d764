"""Per-device optimizer-state bytes with nox.state_sharding on 8 forced host devices (issue #27.3).

The Transformer benchmark's CPU model (benchmarks/transformer_lm.py: d_model 64, 4 heads, 2 scanned
blocks, context 64, batch 32) with FSDP parameters: every kernel split over the 8-device "fsdp" axis
along its last axis that 8 divides (d_out first, else d_in). For FOOF, KFAC (both dampings) and FNGD it
reports the preconditioner state's bytes on the busiest device against the replicated state, which
arrays stay replicated and why, and the collectives (all-gather / all-reduce / reduce-scatter ops in
the compiled HLO) of a jitted step with a sharded vs a replicated state (parameters FSDP in both).

    python benchmarks/state_sharding.py            # writes benchmarks/results/state_sharding.json
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformer_lm  # noqa: E402

import neuron_optax as nox  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def fsdp_spec(x, devices: int) -> P:
  dims = [None] * x.ndim
  if x.ndim >= 2:
    for axis in range(x.ndim - 1, 0 if x.ndim > 2 else -1, -1):  # skip a scanned stack axis
      if x.shape[axis] % devices == 0:
        dims[axis] = "fsdp"
        break
  return P(*dims)


def collectives(compiled_text: str) -> dict:
  return {name: compiled_text.count(f" {name}(") + compiled_text.count(f" {name}-start(") for name in COLLECTIVES}


def main() -> None:
  config = transformer_lm.SETTINGS["cpu"]
  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ("fsdp",))
  model = transformer_lm.TransformerLM(
    d_model=config["d_model"], heads=config["heads"], layers=config["layers"], seq_len=config["seq_len"], scan=True
  )
  window = jnp.asarray(
    np.random.default_rng(0).integers(0, 96, size=(config["batch_size"], config["seq_len"] + 1)), jnp.int32
  )
  params = model.init(jax.random.key(0), window[:, :-1])["params"]

  def loss_fn(p, w):
    return transformer_lm.lm_loss(model, p, w)

  layouts = nox.kernel_layouts(nox.value_grad_and_stats(loss_fn)(params, window)[2])
  param_sharding = jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x, 8)), params)
  params = jax.device_put(params, param_sharding)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  foof = nox.foof(1.0, inverse_every=2, kernel_input_ndim=layouts)
  kfac = nox.kfac(1.0, inverse_every=2, kernel_input_ndim=layouts)
  standard = nox.kfac(1.0, damping_mode="standard", inverse_every=2, kernel_input_ndim=layouts)
  transforms = {
    "foof": (foof, foof),
    "foof+pad_for_sharding": (nox.pad_for_sharding(foof, 8), foof),
    "kfac": (kfac, kfac),
    "kfac+pad_for_sharding": (nox.pad_for_sharding(kfac, 8), kfac),
    "kfac_standard+pad_for_sharding": (nox.pad_for_sharding(standard, 8), standard),
  }
  fngd = nox.fngd(1.0, steps_per_epoch=10, batch_size=config["batch_size"], kernel_input_ndim=layouts)
  transforms["fngd"] = (fngd, fngd)
  rows = []
  for name, (tx, reference_tx) in transforms.items():
    shapes = jax.eval_shape(tx.init, params)
    shardings = nox.state_sharding(shapes, param_sharding)
    # The replicated reference is the unpadded transform (the padding is for sharding only).
    replicated_state = jax.jit(reference_tx.init, out_shardings=NamedSharding(mesh, P()))(params)
    sharded_state = jax.jit(tx.init, out_shardings=shardings)(params)
    kept = {}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings)):
      if sharding.is_fully_replicated and math.prod(leaf.shape) >= 1024:
        kept[jax.tree_util.keystr(path)] = list(leaf.shape)
    kept_bytes = sum(4 * math.prod(shape) for shape in kept.values())

    def step(p, s, w, tx):
      _, grads, stats = nox.value_grad_and_stats(loss_fn)(p, w)
      return tx.update(grads, s, p, stats=stats)

    hlo = {}
    runs = (
      ("replicated", reference_tx, replicated_state, NamedSharding(mesh, P())),
      ("sharded", tx, sharded_state, shardings),
    )
    for label, transform, state, out in runs:
      jitted = jax.jit(functools.partial(step, tx=transform), out_shardings=(param_sharding, out))
      hlo[label] = collectives(jitted.lower(params, state, window).compile().as_text())
      updates, _ = jitted(params, state, window)
      if label == "replicated":
        reference = updates
    difference = max(
      float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(updates))
    )
    row = dict(
      transform=name,
      state_bytes_replicated=nox.state_bytes_per_device(replicated_state),
      state_bytes_per_device_sharded=nox.state_bytes_per_device(sharded_state),
      replicated_large_arrays=kept,
      replicated_large_bytes=kept_bytes,
      collectives_step_replicated_state=hlo["replicated"],
      collectives_step_sharded_state=hlo["sharded"],
      max_abs_update_difference=difference,
    )
    row["ratio"] = row["state_bytes_per_device_sharded"] / row["state_bytes_replicated"]
    rows.append(row)
    print(
      f"{name:14s} replicated {row['state_bytes_replicated']:>9,d} B  sharded {row['state_bytes_per_device_sharded']:>9,d} B"
      f"  ratio {row['ratio']:.3f}  odd-size arrays kept whole {kept_bytes:,d} B  collectives {hlo['replicated']} -> "
      f"{hlo['sharded']}  |Δupdate| {difference:.1e}",
      flush=True,
    )
  result = dict(
    devices=8,
    model=dict(
      config, layout="scan", parameters=int(sum(x.size for x in jax.tree.leaves(params))), param_bytes=param_bytes
    ),
    jax=jax.__version__,
    rows=rows,
  )
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "state_sharding.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
