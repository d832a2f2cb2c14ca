r"""Device meshes: data-parallel and FSDP training, and sharded sampling, with ``NamedSharding``.

The train step (:func:`jaxdiff.training.make_train_step`) and the samplers are written for one
global batch; this module only decides where arrays live and compiles them with
``jax.jit(in_shardings=..., out_shardings=...)``. XLA inserts the collectives (the gradient
all-reduce over ``data``, parameter all-gathers and gradient reduce-scatters over ``fsdp``).
Because every example draws its noise from ``fold_in(key, global index)``, the result does not
depend on the mesh: the same seed gives the same losses and parameters on 1 or 8 devices, up to
the order of floating-point sums.

Mesh axes: ``("data", "fsdp")``. Batches are split over both axes (every device holds
``B / (data * fsdp)`` examples); parameters, their averages and the optimizer state are
replicated over ``data`` and, for ``fsdp > 1``, split over ``fsdp`` along their largest
dimension divisible by it (leaves smaller than ``min_fsdp_size`` stay replicated).

Examples:
    >>> mesh = parallel.make_mesh(data=4, fsdp=2)
    >>> step = parallel.jit_train_step(make_train_step(loss_fn, opt, jit=False), mesh, state)
    >>> state = parallel.shard_state(state, mesh)
    >>> state, metrics = step(state, parallel.shard_batch(batch, mesh))
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "AXES",
    "initialize",
    "make_mesh",
    "batch_sharding",
    "shard_batch",
    "param_spec",
    "state_sharding",
    "shard_state",
    "jit_train_step",
    "sample_sharded",
]

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int | None = None, fsdp: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all of them).

    Args:
        data: size of the data-parallel axis; default ``len(devices) // fsdp``.
        fsdp: size of the parameter-sharding axis.
        devices: the devices, in mesh order.

    Examples:
        >>> mesh = make_mesh()                 # data-parallel over every device
        >>> mesh = make_mesh(data=4, fsdp=2)   # 8 devices
    """
    devices = list(jax.devices() if devices is None else devices)
    fsdp = int(fsdp)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"make_mesh: fsdp={fsdp} must be >= 1 and divide the "
                         f"{len(devices)} devices.")
    data = len(devices) // fsdp if data is None else int(data)
    if data < 1 or data * fsdp > len(devices):
        raise ValueError(f"make_mesh: data * fsdp = {data} * {fsdp} needs that many devices; "
                         f"{len(devices)} available.")
    grid = np.asarray(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis; the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(batch, mesh: Mesh):
    """Place a batch (pytree of batch-leading arrays) split over the mesh.

    In a single process ``batch`` is the global batch. With several processes
    (``jax.process_count() > 1``) it is this host's slice -- rows ``h*b .. (h+1)*b`` of the global
    batch for process ``h``, as :func:`jaxdiff.data.batches` with ``shard_index=h`` gives -- and the
    slices are assembled into one global array without copying data between hosts.

    Raises:
        ValueError: a leaf's batch size is not divisible by the number of (local) devices.
    """
    sharding = batch_sharding(mesh)
    multi = jax.process_count() > 1
    n = len(mesh.local_devices) if multi else mesh.devices.size

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"shard_batch: batch size {x.shape[:1]} must be divisible by the "
                             f"mesh's {n} {'local ' if multi else ''}devices.")
        if multi:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, batch)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> tuple[int, int]:
    """Join a multi-process run (``jax.distributed.initialize``) when one is configured.

    With explicit arguments, or on platforms where JAX detects the cluster itself (TPU pods,
    SLURM, Open MPI), this connects the processes; with nothing given and no cluster it is a
    no-op. Call it once, first thing in the training entry point.

    Returns:
        ``(process_index, process_count)``.

    Examples:
        >>> initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # GPU hosts
        >>> initialize()                                                 # TPU pod: auto-detected
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError):
            pass  # no cluster detected: a single-process run
    return jax.process_index(), jax.process_count()


def param_spec(shape: Sequence[int], mesh: Mesh, *, min_fsdp_size: int = 2**10) -> PartitionSpec:
    """FSDP rule: split the largest dimension divisible by the ``fsdp`` size, else replicate."""
    k = mesh.shape["fsdp"]
    if k == 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
        return PartitionSpec()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % k == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_sharding(state, mesh: Mesh, *, min_fsdp_size: int = 2**10):
    """Shardings for every leaf of a train state (or any pytree of parameters).

    Leaves are placed by shape alone (:func:`param_spec`), so parameters, their averages and
    the optimizer's moment estimates of the same shape share one layout; scalars (step,
    counters, keys) are replicated.
    """

    def leaf(x):
        shape = np.shape(x)
        if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, param_spec(shape, mesh, min_fsdp_size=min_fsdp_size))

    return jax.tree.map(leaf, state)


def shard_state(state, mesh: Mesh, *, min_fsdp_size: int = 2**10):
    """Place a train state on the mesh with :func:`state_sharding`.

    With several processes every process must pass the same values (e.g. built from the same
    seed); each one fills in only the shards its own devices hold.
    """
    shardings = state_sharding(state, mesh, min_fsdp_size=min_fsdp_size)
    if jax.process_count() == 1:
        return jax.device_put(state, shardings)

    def put(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.device_get(jax.random.key_data(x)))
            arr = jax.make_array_from_callback(data.shape, sharding, lambda i: data[i])
            return jax.random.wrap_key_data(arr, impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(put, state, shardings)


def jit_train_step(train_step: Callable, mesh: Mesh, state, *, min_fsdp_size: int = 2**10,
                   donate: bool = True) -> Callable:
    """Compile an unjitted train step for the mesh (state donated, batch split over devices).

    Args:
        train_step: ``make_train_step(..., jit=False)``.
        mesh: from :func:`make_mesh`.
        state: a train state (or its abstract shapes) to derive the shardings from.
        min_fsdp_size: leaves with fewer elements stay replicated.
        donate: donate the incoming state.

    Returns:
        ``step(state, batch) -> (state, metrics)``; metrics are replicated.

    Examples:
        >>> step = jit_train_step(make_train_step(loss_fn, opt, jit=False), mesh, state)
    """
    s_sharding = state_sharding(state, mesh, min_fsdp_size=min_fsdp_size)
    return jax.jit(
        train_step,
        in_shardings=(s_sharding, batch_sharding(mesh)),
        out_shardings=(s_sharding, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=(0,) if donate else (),
    )


def sample_sharded(sample_fn: Callable[..., Any], mesh: Mesh, key: jax.Array, x_init, *args,
                   cond=None, **kwargs):
    """Run a sampler with the batch split over the mesh and gather the result to the host.

    Per-example noise streams make the output equal to the single-device run for the same key
    (up to floating-point reduction order inside the denoiser).

    Args:
        sample_fn: a sampler ``(key, denoiser, process, x_init, ts, *, cond, ...)`` or any
            function ``(key, x_init, *args, cond=..., **kwargs) -> x`` batched over ``x_init``.
        mesh: from :func:`make_mesh`.
        key: typed key (replicated).
        x_init: ``(B, ...)`` with ``B`` divisible by the number of devices.
        *args, cond, **kwargs: passed through; ``cond`` leaves are split like ``x_init``.

    Returns:
        A host (numpy) array of the samples.

    Examples:
        >>> x = sample_sharded(lambda k, x0, cond=None: samplers.edm_heun(k, den, proc, x0, ts),
        ...                    mesh, key, x_init)
    """
    x_init = shard_batch(x_init, mesh)
    cond = None if cond is None else shard_batch(cond, mesh)
    fn = jax.jit(lambda k, x, c: sample_fn(k, x, *args, cond=c, **kwargs),
                 out_shardings=batch_sharding(mesh))
    return np.asarray(jax.device_get(fn(key, x_init, cond)))
