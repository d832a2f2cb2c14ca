"""Multi-process data-parallel training of a small conditional MLP, with orbax checkpoints.

Every process runs this same script; each reads its own slice of every global batch
(``data.batches(..., shard_index=process, num_shards=processes)``), the train step runs on the
global ``(data, fsdp)`` mesh over all processes' devices, and checkpoints are written by all
processes together (orbax). Launch recipes:

* Two processes on one machine (CPU, 4 devices each) -- also what the tests run::

      for i in 0 1; do
        python3 experiments/multihost.py --coordinator localhost:12355 --num-processes 2 \\
            --process-id $i --local-devices 4 --workdir outputs/multihost &
      done; wait

* Multi-GPU hosts: one process per host (all local GPUs), the same ``--coordinator``
  (host:port of process 0), ``--num-processes`` and a distinct ``--process-id`` per host.
* TPU pods: run the script on every host with no flags; ``jax.distributed.initialize()``
  detects the pod.

Writes ``<workdir>/checkpoints`` and, from process 0, ``<workdir>/final_params.npz``.
"""

import argparse
import os
import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--local-devices", type=int, default=None,
                        help="fake CPU devices per process (CPU testing)")
    parser.add_argument("--workdir", default=os.path.join("outputs", "multihost"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--fsdp", type=int, default=1)
    args = parser.parse_args(argv)

    import jax

    if args.local_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    from jaxdiff import parallel

    process, processes = parallel.initialize(args.coordinator, args.num_processes,
                                             args.process_id)

    import numpy as np
    from flax import nnx

    import jaxdiff
    from jaxdiff import data, nets, training

    mesh = parallel.make_mesh(fsdp=args.fsdp)
    net = nets.create("mlp", {"dim": 2, "hidden": 64, "depth": 2, "emb_dim": 16,
                              "num_classes": 8}, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    process_ = jaxdiff.EDMProcess(sigma_data=1.0)
    apply = nets.make_apply(graphdef, process_, "edm")
    loss_fn = training.diffusion_loss_fn(apply, process_, prediction="edm", weighting="edm",
                                         time_sampling="lognormal", cond_dropout=0.2,
                                         null_cond=net.null_cond)
    opt, _ = training.make_optimizer(2e-3, warmup_steps=2)
    averages = [training.EMA(0.9)]
    state = training.create_train_state(jax.random.key(0), nnx.to_pure_dict(params), opt,
                                        averages=averages)
    step = parallel.jit_train_step(
        training.make_train_step(loss_fn, opt, averages=averages, jit=False), mesh, state)
    state = parallel.shard_state(state, mesh)

    x, labels = data.toy2d.sample(jax.random.key(1), "8gaussians", 4096)
    global_batch = 64
    batches = data.batches({"x": np.asarray(x), "label": np.asarray(labels)},
                           global_batch // processes, seed=0, shard_index=process,
                           num_shards=processes)

    class Global:
        """Host slices in, global arrays out (for ``fit``), with the iterator's state."""

        def __next__(self):
            return parallel.shard_batch(next(batches), mesh)

        def get_state(self):
            return batches.get_state()

        def set_state(self, s):
            batches.set_state(s)

    result = training.fit(state, step, Global(), num_steps=args.steps, workdir=args.workdir,
                          metadata=training.describe(process_, "edm", net),
                          checkpoint_every=max(1, args.steps // 2), progress=False,
                          log_every=max(1, args.steps // 2))
    flat = {jax.tree_util.keystr(p): np.asarray(jax.device_get(v.addressable_data(0)))
            for p, v in jax.tree_util.tree_leaves_with_path(result.state.params)}
    if process == 0:
        np.savez(os.path.join(args.workdir, "final_params.npz"), **flat)
    print(f"process {process}/{processes}: {jax.device_count()} devices, step "
          f"{int(jax.device_get(result.state.step))}, last loss {result.history[-1]['loss']:.4f}")


if __name__ == "__main__":
    main()
