"""Scale-out benchmark: step time, throughput and compile time on 1/2/4/8 devices.

    python3 experiments/scale_bench.py [--model toy2d|digits|cifar] [--batch B] [--steps N]
                                       [--devices 1,2,4,8] [--bf16] [--quick]

Model presets (all class-conditional, EDM preconditioning and loss):

* ``toy2d``  -- the MLP of ``experiments/toy2d`` (2-D points; default batch 512);
* ``digits`` -- the UNet of ``experiments/digits`` (8x8x1 images; default batch 64);
* ``cifar``  -- a CIFAR-10-sized UNet (32x32x3; base 128 channels, multipliers (1, 2, 2, 2),
  2 residual blocks per level, attention at 16x16: the DDPM++ CIFAR-10 layout; batch 128).

Throughput is the global batch over the median step time (images/s for the image presets).
``--quick`` runs a functional check (batch 4, 3 steps, 1 and 2 devices, 2 saves), e.g. the
CIFAR-sized preset on a CPU. The full GPU measurement::

    python3 experiments/scale_bench.py --model cifar --bf16 --devices 1      # one GPU
    python3 experiments/scale_bench.py --model cifar --bf16                  # 1/2/4/8 GPUs

On CPU the devices are fake (``jax_num_cpu_devices``, set here before JAX starts), so the
numbers are functional, not a speed-up: all "devices" share the same cores. On a GPU/TPU host
the same script measures real scaling.

Also measures checkpointing with asynchronous vs synchronous writes: how long
``Checkpointer.save`` blocks the step loop, and how long until the checkpoint is durable
(``save`` plus ``wait``). Every save starts after the previous one is durable, as in a loop
whose checkpoint interval is longer than a write. Prints tables and writes
``outputs/scale_bench_<model>.json``.
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

DEFAULT_BATCH = {"toy2d": 512, "digits": 64, "cifar": 128}


def preset(model: str):
    """``(net name, net config, example shape)`` of a model preset."""
    if model == "toy2d":
        from experiments.toy2d.config import get_config

        nc = get_config().net
        return "mlp", {"dim": 2, "hidden": nc.hidden, "depth": nc.depth,
                       "emb_dim": nc.emb_dim, "num_classes": 8}, (2,)
    if model == "digits":
        from experiments.digits.config import get_config

        nc = get_config().net
        return "unet", {"channels": 1, "image_size": 8, "base_channels": nc.base_channels,
                        "channel_mult": list(nc.channel_mult),
                        "num_res_blocks": nc.num_res_blocks,
                        "attn_resolutions": list(nc.attn_resolutions),
                        "num_heads": nc.num_heads, "num_classes": 10}, (8, 8, 1)
    if model == "cifar":
        return "unet", {"channels": 3, "image_size": 32, "base_channels": 128,
                        "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
                        "attn_resolutions": [16], "num_heads": 1, "num_classes": 10}, (32, 32, 3)
    raise ValueError(f"unknown model {model!r}; choose toy2d, digits or cifar.")


def _median_ms(values):
    import numpy as np

    return 1e3 * float(np.median(values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(DEFAULT_BATCH), default="toy2d")
    parser.add_argument("--batch", type=int, default=None, help="global batch (preset default)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per device count")
    parser.add_argument("--devices", default=None, help="device counts (default 1,2,4,8)")
    parser.add_argument("--saves", type=int, default=None, help="timed checkpoint saves per mode")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    parser.add_argument("--quick", action="store_true",
                        help="functional check: batch 4, 3 steps, devices 1,2, 2 saves (explicit "
                             "options still apply)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    defaults = (dict(batch=4, steps=3, devices="1,2", saves=2) if args.quick else
                dict(batch=DEFAULT_BATCH[args.model], steps=20, devices="1,2,4,8", saves=5))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batch_size = args.batch
    counts = [int(c) for c in args.devices.split(",")]
    out_path = args.out or os.path.join(
        "outputs", f"scale_bench_{args.model}{'_quick' if args.quick else ''}.json")

    import jax

    try:
        jax.config.update("jax_num_cpu_devices", max(counts))
    except RuntimeError:
        pass  # backends already initialised (e.g. imported elsewhere)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxdiff
    from jaxdiff import nets, parallel, training

    name, config, shape = preset(args.model)
    process = jaxdiff.EDMProcess(sigma_data=0.5 if len(shape) == 3 else 1.0)
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(batch_size, *shape)).astype(np.float32),
             "label": rng.integers(0, config["num_classes"], size=batch_size).astype(np.int32)}
    averages = [training.EMA(0.999)]

    def build():
        net = nets.create(name, config, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(net)
        apply = nets.make_apply(graphdef, process, "edm")
        loss_fn = training.diffusion_loss_fn(apply, process, prediction="edm", weighting="edm",
                                             time_sampling="lognormal", cond_dropout=0.1,
                                             null_cond=net.null_cond)
        opt, _ = training.make_optimizer(1e-3)
        state = training.create_train_state(jax.random.key(0), nnx.to_pure_dict(params), opt,
                                            averages=averages)
        step = training.make_train_step(loss_fn, opt, averages=averages, jit=False,
                                        compute_dtype=jnp.bfloat16 if args.bf16 else None)
        return state, step

    rows = []
    for n in counts:
        if n > len(jax.devices()):
            print(f"skipping {n} devices: only {len(jax.devices())} available")
            continue
        if batch_size % n:
            print(f"skipping {n} devices: batch {batch_size} is not divisible by {n}")
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
        step_ms = _median_ms(times)
        rows.append({"devices": n, "compile_s": compile_s, "step_ms": step_ms,
                     "examples_per_s": 1e3 * batch_size / step_ms,
                     "final_loss": float(m["loss"])})
        del state, compiled
    if not rows:
        raise SystemExit("no device count could run; see the messages above.")
    for r in rows:
        r["step_time_ratio_to_first"] = r["step_ms"] / rows[0]["step_ms"]

    # Checkpoint writes: how long save() blocks the loop, and how long until the files are
    # durable. Each save waits for the previous one first, so it measures its own cost only.
    state, _ = build()
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.params))
    state_mb = sum(x.nbytes for x in jax.tree.leaves(
        (state.params, state.averages, state.opt_state))) / 2**20
    saving = {}
    for mode in ("async", "sync"):
        with tempfile.TemporaryDirectory() as d:
            ckpt = training.Checkpointer(d, async_save=mode == "async", keep=2)
            ckpt.save(state)  # warm-up (directory, handlers)
            ckpt.wait()
            blocked, durable = [], []
            for i in range(1, args.saves + 1):
                at_step = state.replace(step=state.step + i)
                jax.block_until_ready(at_step.step)
                t0 = time.perf_counter()
                ckpt.save(at_step)
                t1 = time.perf_counter()
                ckpt.wait()
                t2 = time.perf_counter()
                blocked.append(t1 - t0)
                durable.append(t2 - t0)
            ckpt.close()
        saving[mode] = {"blocked_ms": _median_ms(blocked), "durable_ms": _median_ms(durable)}

    unit = "examples/s" if args.model == "toy2d" else "images/s"
    print(f"{args.model} ({num_params / 1e6:.2f} M parameters), global batch {batch_size}, "
          f"{'bf16' if args.bf16 else 'float32'} compute, backend {jax.default_backend()}, "
          f"median of {args.steps} steps")
    print(f"{'devices':>8} {'compile s':>10} {'step ms':>9} {unit:>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['devices']:>8} {r['compile_s']:>10.2f} {r['step_ms']:>9.2f} "
              f"{r['examples_per_s']:>11.1f} {r['step_time_ratio_to_first']:>6.2f}")
    print(f"checkpoint of {state_mb:.1f} MiB (params, average, optimizer), median of "
          f"{args.saves} saves:")
    print(f"{'mode':>8} {'blocks loop ms':>15} {'durable ms':>11}")
    for mode, s in saving.items():
        print(f"{mode:>8} {s['blocked_ms']:>15.1f} {s['durable_ms']:>11.1f}")
    record = {"model": args.model, "net": name, "net_config": config, "num_params": num_params,
              "batch": batch_size, "steps": args.steps, "bf16": args.bf16,
              "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
              "throughput_unit": unit, "rows": rows,
              "checkpoint": {"state_mib": state_mb, "saves": args.saves, **saving}}
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out_path}")
    return record


if __name__ == "__main__":
    main()
