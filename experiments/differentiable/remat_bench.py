"""Time and memory of ``jax.grad`` through N-step samplers, with and without rematerialisation.

Model: a hand-written MLP denoiser (3 -> 256 -> 256 -> 256 -> 2, SiLU; float32) on a batch of
256 2-D states, DPM-Solver++(2M) on the VP process; the loss is the mean square of the samples
and the gradient is taken with respect to the network's parameters. Memory is what the compiled
executable reports (``memory_analysis()``: temp + argument + output bytes, the peak XLA plans
for); time is the median wall time of repeated calls after compilation.

A second configuration (``dims=wide_dims(2048)``, B = 64) has a state of 2048 features and a
one-hidden-layer MLP, so the carries, not the activations, dominate: there per-step remat
("full", N carries) and nested remat (~2 sqrt(N) carries) separate.

Optionally (``diffrax=True``) the same gradient through diffrax's Euler solver on the PF-ODE with
``RecursiveCheckpointAdjoint`` (diffrax's default: binomial checkpointing) and
``BacksolveAdjoint`` (solve the adjoint ODE backwards: O(1) memory, not exact for a discrete
solver), imported lazily.
"""

import statistics
import time

import jax
import jax.flatten_util
import jax.numpy as jnp

import jaxdiff
from jaxdiff import samplers, timesteps

DIMS = (3, 256, 256, 256, 2)


def wide_dims(dim):
    """A state of ``dim`` features (carries dominate memory, as for images)."""
    return (dim + 1, 256, dim)


def init_mlp(key, dims=DIMS):
    keys = jax.random.split(key, len(dims) - 1)
    return [(jax.random.normal(k, (a, b), jnp.float32) / jnp.sqrt(a),
             jnp.zeros((1, b), jnp.float32)) for k, a, b in zip(keys, dims[:-1], dims[1:])]


def mlp_denoiser(params, x, t):
    """x0_hat = x + MLP([x, t]) (a residual MLP; any smooth function serves for the benchmark)."""
    h = jnp.concatenate([x, jnp.log(t)[:, None].astype(x.dtype)], axis=-1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b)
    w, b = params[-1]
    return x + h @ w + b


def _grad_fn(process, ts, remat):
    def loss(params, x):
        out = samplers.dpm_solver_pp(None, lambda x, t, c: mlp_denoiser(params, x, t), process,
                                     x, ts, remat=remat)
        return jnp.mean(jnp.square(out))

    return jax.jit(jax.grad(loss))


def _diffrax_grad_fn(process, ts, adjoint_name):
    import diffrax  # optional dependency: imported only for this comparison

    adjoint = {"recursive_checkpoint": diffrax.RecursiveCheckpointAdjoint(),
               "backsolve": diffrax.BacksolveAdjoint()}[adjoint_name]

    def loss(params, x):
        def field(t, y, args):
            tb = jnp.full((y.shape[0],), t)
            return process.pf_velocity(y, t, mlp_denoiser(args, y, tb))

        # The grid is uniform: a constant step (diffrax's BacksolveAdjoint rejects StepTo).
        num = ts.shape[0] - 1
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field), diffrax.Euler(), t0=ts[0], t1=ts[-1],
            dt0=(ts[-1] - ts[0]) / num, y0=x, args=params, adjoint=adjoint, max_steps=num + 1)
        return jnp.mean(jnp.square(sol.ys[-1]))

    return jax.jit(jax.grad(loss))


def measure(fn, params, x, repeats):
    """Compiled memory (bytes), median seconds, compile seconds and the gradient itself."""
    start = time.perf_counter()
    compiled = fn.lower(params, x).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    return dict(bytes=int(peak), temp_bytes=int(mem.temp_size_in_bytes),
                seconds=statistics.median(times), compile_seconds=compile_s), compiled(params, x)


def run(quick=False, diffrax=True, batch=256, log=print, dims=DIMS):
    """``dims``: the MLP's layer sizes; the state has ``dims[-1]`` features."""
    process = jaxdiff.VPProcess()
    params = init_mlp(jax.random.key(0), dims)
    x = process.sample_prior(jax.random.key(1), (batch, dims[-1]), jnp.float32)
    steps = (10, 100) if quick else (10, 100, 1000)
    repeats = 3 if quick else 5
    configs = [("dpm_solver_pp", None), ("dpm_solver_pp", "full"), ("dpm_solver_pp", "nested")]
    if diffrax:
        configs += [("diffrax_euler", "recursive_checkpoint"), ("diffrax_euler", "backsolve")]
    rows, grads = [], {}
    log(f"\n== grad through N steps (MLP {dims}, B = {batch}, float32, "
        f"{jax.devices()[0].platform}) ==")
    log(f"{'method':16s} {'remat':22s} " + " ".join(f"{'N=' + str(n):>22s}" for n in steps))
    for method, remat in configs:
        cells = []
        for n in steps:
            ts = timesteps.uniform_t(process, n, dtype=jnp.float32)
            if method == "dpm_solver_pp":
                fn = _grad_fn(process, ts, remat)
            else:
                fn = _diffrax_grad_fn(process, ts, remat)
            r, grads[(method, remat, n)] = measure(fn, params, x, repeats)
            ref = grads.get((method, None if method == "dpm_solver_pp" else
                             "recursive_checkpoint", n))
            # Relative gradient difference to the exact discrete gradient of the same solver.
            r["grad_rel_diff"] = float(
                jnp.linalg.norm(jax.flatten_util.ravel_pytree(jax.tree.map(
                    jnp.subtract, grads[(method, remat, n)], ref))[0])
                / jnp.linalg.norm(jax.flatten_util.ravel_pytree(ref)[0]))
            rows.append(dict(method=method, remat=str(remat), steps=n, **r))
            cells.append(f"{r['bytes'] / 2**20:9.2f} MiB {r['seconds'] * 1e3:8.1f} ms")
        log(f"{method:16s} {str(remat):22s} " + " ".join(f"{c:>22s}" for c in cells))
    by = {(r["method"], r["remat"], r["steps"]): r["bytes"] for r in rows}
    ratios = {}
    for method, remat in configs:
        ratios[f"{method}/{remat}"] = by[(method, str(remat), steps[-1])] / by[
            (method, str(remat), steps[0])]
    for row in rows:
        if row["grad_rel_diff"] > 0:
            log(f"  {row['method']}/{row['remat']} N={row['steps']}: gradient differs from the "
                f"exact discrete one by {row['grad_rel_diff']:.2e} (relative)")
    log(f"memory ratio N={steps[-1]} / N={steps[0]}: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return dict(rows=rows, ratios=ratios, batch=batch, dims=list(dims))
