"""One process of the multi-host mSAM test (run by tests/test_multihost.py, not by pytest).

Usage: python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT OUT_FILE

Every process owns 2 CPU devices; ``jax.distributed`` with gloo collectives joins
them into one global mesh. The same script runs on a TPU pod slice or a GPU cluster:
drop the two CPU settings and call ``jax.distributed.initialize()`` with no
arguments (TPU, SLURM and Open MPI fill them in), or with the coordinator address,
the number of processes and this process's id.
"""

from __future__ import annotations

import sys

import jax

LOCAL_DEVICES = 2


def main(process_id: int, num_processes: int, port: int, out_file: str) -> None:
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=num_processes,
    process_id=process_id,
  )
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import samx
  from tests import helpers
  from tests.test_msam import LR, RHO, STEPS, global_batches

  mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  params = helpers.to_jax(helpers.make_problem(0)[0], np.float32)
  results = {}
  for name, tx in {
    "msam": samx.msam(optax.sgd(LR), rho=RHO, axis_name="d"),
    "sam": samx.sam(optax.sgd(LR), rho=RHO, axis_name="d"),
  }.items():

    def step(params, state, batch, tx=tx):
      # JAX's defaults: shard_map checks replication, so the clean gradient is taken
      # with respect to params cast to varying (each device's own gradient).
      local = jax.lax.pcast(params, "d", to="varying")
      grads = jax.grad(helpers.loss_jax)(local, batch)
      grad_fn = lambda w: jax.grad(helpers.loss_jax)(w, batch)
      updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), state

    with jax.set_mesh(mesh):
      sharded = jax.jit(jax.shard_map(step, in_specs=(P(), P(), P("d")), out_specs=(P(), P())))
      p, s = params, tx.init(params)
      for batch in global_batches(STEPS):
        batch = jax.tree.map(
          lambda x: jax.make_array_from_callback(
            x.shape, NamedSharding(mesh, P("d")), lambda index, x=x: x[index]
          ),
          batch,
        )
        p, s = sharded(p, s, batch)
    results[name] = {k: np.asarray(v.addressable_shards[0].data) for k, v in p.items()}
  # Hyperparameters that differ between processes are refused at init, on every process.
  mismatch = samx.looksam(optax.sgd(LR), rho=RHO, k=2 + process_id, axis_name="d")
  try:
    mismatch.init(params)
    raised = ""
  except ValueError as err:
    raised = str(err)
  matching = samx.looksam(optax.sgd(LR), rho=RHO, k=2, axis_name="d")
  matching.init(params)  # the same configuration everywhere: no error
  np.savez(
    f"{out_file}.{process_id}.npz",
    raised=np.asarray(raised),
    **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()},
  )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
