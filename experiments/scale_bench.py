"""Scale-out benchmark: step time, throughput and compile time on 1/2/4/8 devices.

    python3 experiments/scale_bench.py [--model mlp|unet] [--batch 256] [--steps 20]

On CPU the devices are fake (``--xla_force_host_platform_device_count``, set here before JAX
starts), so the numbers are functional, not a speed-up: all "devices" share the same cores. On a
GPU/TPU host the same script measures real scaling. Also measures how long ``Checkpointer.save``
blocks the step loop with asynchronous vs synchronous writes. Prints a table and writes
``outputs/scale_bench.json``.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "unet"), default="mlp")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--out", default=os.path.join("outputs", "scale_bench.json"))
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]

    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(counts))
    except RuntimeError:
        pass  # backends already initialised (e.g. imported elsewhere)
    import numpy as np
    from flax import nnx

    import jaxdiff
    from jaxdiff import nets, parallel, training

    if args.model == "mlp":
        name, config, shape = "mlp", {"dim": 2, "hidden": 256, "depth": 3, "num_classes": 8}, (2,)
    else:
        name, config, shape = "unet", {"channels": 1, "image_size": 8, "base_channels": 32,
                                       "channel_mult": [1, 2], "num_res_blocks": 1,
                                       "attn_resolutions": [4], "num_classes": 8}, (8, 8, 1)
    process = jaxdiff.EDMProcess(sigma_data=1.0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(args.batch, *shape)).astype(np.float32),
             "label": rng.integers(0, 8, size=args.batch).astype(np.int32)}

    def build():
        net = nets.create(name, config, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(net)
        apply = nets.make_apply(graphdef, process, "edm")
        loss_fn = training.diffusion_loss_fn(apply, process, prediction="edm", weighting="edm",
                                             time_sampling="lognormal", cond_dropout=0.1,
                                             null_cond=net.null_cond)
        opt, _ = training.make_optimizer(1e-3)
        state = training.create_train_state(jax.random.key(0), nnx.to_pure_dict(params), opt,
                                            averages=[training.EMA(0.999)])
        return state, training.make_train_step(loss_fn, opt, averages=[training.EMA(0.999)],
                                               jit=False)

    rows = []
    for n in counts:
        if n > len(jax.devices()):
            continue
        mesh = parallel.make_mesh(devices=jax.devices()[:n])
        state, step_fn = build()
        step = parallel.jit_train_step(step_fn, mesh, state)
        state = parallel.shard_state(state, mesh)
        b = parallel.shard_batch(batch, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, b).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, b)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, b)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        rows.append({"devices": n, "compile_s": compile_s, "step_ms": 1e3 * med,
                     "examples_per_s": args.batch / med})
    base = rows[0]["step_ms"]
    for r in rows:
        r["step_time_ratio_to_1"] = r["step_ms"] / base

    # How long save() blocks the loop: async copies device -> host and returns.
    blocking = {}
    state, _ = build()
    for mode in (True, False):
        with tempfile.TemporaryDirectory() as d:
            ckpt = training.Checkpointer(d, async_save=mode, keep=2)
            ckpt.save(state.replace(step=state.step + 0))  # warm-up (directory, handlers)
            waits = []
            for i in range(1, 6):
                t0 = time.perf_counter()
                ckpt.save(state.replace(step=state.step + i))
                waits.append(time.perf_counter() - t0)
            ckpt.close()
        blocking["async" if mode else "sync"] = 1e3 * float(np.median(waits))

    print(f"{args.model}, global batch {args.batch}, backend {jax.default_backend()}, "
          f"median of {args.steps} steps")
    print(f"{'devices':>8} {'compile s':>10} {'step ms':>9} {'examples/s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['devices']:>8} {r['compile_s']:>10.2f} {r['step_ms']:>9.2f} "
              f"{r['examples_per_s']:>11.0f} {r['step_time_ratio_to_1']:>6.2f}")
    print(f"checkpoint save blocks the loop: async {blocking['async']:.1f} ms, "
          f"sync {blocking['sync']:.1f} ms (median of 5)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "batch": args.batch, "backend": jax.default_backend(),
                   "rows": rows, "save_blocking_ms": blocking}, f, indent=2)
    return rows, blocking


if __name__ == "__main__":
    main()
