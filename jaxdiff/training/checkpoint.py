r"""Self-describing, topology-independent checkpoints (orbax) and :func:`load_denoiser`.

A checkpoint directory holds one sub-directory per saved step (orbax ``CheckpointManager``),
each with three items:

* ``state`` -- the :class:`~jaxdiff.training.TrainState` arrays (params, averages, optimizer
  state, step, key data, counters), written by orbax's ``StandardSave`` (from a host snapshot
  in one process, as global arrays across processes); the restore target decides the layout,
  so it restores onto any device mesh or sharding;
* ``meta`` -- JSON: the process (class and fields), the prediction kind, the network's name and
  config, the averages kept, and any user fields; enough to rebuild a denoiser with no code;
* ``data`` -- JSON: the data iterator's position, so a resumed run sees the same batches.

Restoring walks back from the newest step: a checkpoint that fails to restore is reported with a
warning, moved aside to ``<directory>.corrupt/<step>`` (never deleted), and the previous one is
used.
"""

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .. import processes as processes_lib
from .state import TrainState

__all__ = [
    "Checkpointer",
    "LoadedModel",
    "load_model",
    "load_denoiser",
    "describe",
    "process_to_config",
    "process_from_config",
]

FORMAT = "jaxdiff-checkpoint"
FORMAT_VERSION = 1


def process_to_config(process) -> dict:
    """JSON-serialisable description ``{"class": name, "fields": {...}}`` of a process.

    Examples:
        >>> process_to_config(jaxdiff.VPProcess())["class"]
        'VPProcess'
    """
    cls = type(process)
    if getattr(processes_lib, cls.__name__, None) is not cls:
        raise TypeError(
            f"process_to_config: {cls.__name__} is not a jaxdiff.processes class; "
            "only library processes can be described in a checkpoint."
        )
    fields = {}
    for f in dataclasses.fields(process):
        if not f.init:
            continue
        value = np.asarray(getattr(process, f.name))
        if not np.all(np.isfinite(value)) and value.dtype.kind == "f":
            raise ValueError(f"process_to_config: field {f.name} is not finite.")
        if value.ndim == 0:
            fields[f.name] = value.item()
        else:
            fields[f.name] = {"array": value.tolist(), "dtype": str(value.dtype)}
    return {"class": cls.__name__, "fields": fields}


def process_from_config(config: Mapping) -> Any:
    """Rebuild a process from :func:`process_to_config`'s output.

    Examples:
        >>> p = process_from_config(process_to_config(jaxdiff.EDMProcess(sigma_data=0.5)))
    """
    name = config.get("class") if isinstance(config, Mapping) else None
    cls = getattr(processes_lib, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, processes_lib.AbstractProcess)):
        raise ValueError(f"process_from_config: unknown process class {name!r}.")
    kwargs = {}
    for key, value in config.get("fields", {}).items():
        if isinstance(value, Mapping):
            value = jnp.asarray(np.asarray(value["array"], dtype=value["dtype"]))
        kwargs[key] = value
    return cls(**kwargs)


def describe(process, prediction: str, net, **extra) -> dict:
    """Checkpoint metadata that makes a checkpoint self-describing (see :func:`load_model`).

    Args:
        process: the forward process the network is trained for.
        prediction: the network's prediction kind, as passed to :func:`jaxdiff.nets.make_denoiser`.
        net: the network module (its name and config come from :func:`jaxdiff.nets.config_of`).
        **extra: further JSON-serialisable fields (e.g. the experiment config).

    Examples:
        >>> meta = describe(jaxdiff.VPProcess(), "eps", net, experiment="toy2d")
    """
    from .. import nets

    name, config = nets.config_of(net)
    meta = {
        "process": process_to_config(process),
        "prediction": prediction,
        "net": {"name": name, "config": dict(config)},
        **extra,
    }
    json.dumps(meta)
    return meta


def _state_tree(state: TrainState) -> dict:
    return {
        "step": state.step,
        "params": state.params,
        "averages": dict(state.averages),
        "opt_state": state.opt_state,
        "key_data": jax.random.key_data(state.key),
        "num_skipped": state.num_skipped,
        "num_updates": state.num_updates,
    }


def _abstract(tree):
    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


class _DifferentRun(ValueError):
    """The directory holds a checkpoint written with other metadata."""


def _host_snapshot(tree):
    """A host copy of ``tree`` that owns its memory (the device buffers may then be donated).

    ``jax.device_get`` starts every device-to-host transfer before waiting for any. On the CPU
    backend device memory is host memory and it returns views of the buffers; those are copied,
    so that donating the state neither clobbers the snapshot nor is silently skipped.
    """

    def own(src, host):
        on_cpu = isinstance(src, jax.Array) and all(d.platform == "cpu" for d in src.devices())
        return np.array(host, copy=True) if on_cpu else host

    return jax.tree.map(own, tree, jax.device_get(tree))


class Checkpointer:
    r"""Saves and restores :class:`~jaxdiff.training.TrainState` with metadata (orbax).

    With ``async_save`` the step loop is blocked only while the arrays are copied to host
    memory: in a single process, ``save`` takes a host snapshot of the state and a background
    thread (owning the snapshot) writes it with orbax; with several processes, orbax's own
    asynchronous writer is used (it copies this process's shards to the host and writes them in
    the background). Either way at most one save is in flight: the next ``save``, :meth:`wait`,
    :meth:`restore` and :meth:`close` first wait for it, and an error raised while writing in the
    background is re-raised there. Synchronous and asynchronous saves write the same files.

    Args:
        directory: where the step sub-directories live (created if missing).
        keep: how many most recent checkpoints to keep.
        async_save: write in the background (``save`` returns once the arrays are on the host);
            call :meth:`wait` (or :meth:`close`) before reading them.
        metadata: JSON-serialisable description stored with every checkpoint (see
            :func:`load_model` for the fields it uses: ``process``, ``prediction``, ``net``).

    Examples:
        >>> ckpt = Checkpointer("run/checkpoints", keep=3, metadata=meta)
        >>> ckpt.save(state, data_state=batches.get_state())
        >>> state, data_state = ckpt.restore(state)
        >>> ckpt.close()
    """

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True, metadata=None):
        if int(keep) < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1; got {keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        self.async_save = bool(async_save)
        self.metadata = {} if metadata is None else dict(metadata)
        json.dumps(self.metadata)  # fail now, not in a background thread
        # Global arrays spanning several processes cannot be snapshotted by one process: there
        # every process hands its shards to orbax's collective asynchronous writer instead.
        self._multiprocess = jax.process_count() > 1
        self._executor = None
        self._pending = None
        self._manager = self._make_manager()

    def _make_manager(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            enable_async_checkpointing=self.async_save and self._multiprocess,
            create=True,
            cleanup_tmp_directories=True,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        """Saved steps, ascending (after any save in flight has finished)."""
        self.wait()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState, *, data_state=None, force: bool = True) -> bool:
        """Save ``state`` at its step (with the data iterator state).

        Returns whether it saved (with ``async_save``: whether it started the save; an error
        while writing is raised by the next call). Blocks until the previous save is durable
        (re-raising its error, if any) and, with ``async_save``, until ``state`` is copied to
        the host; ``state`` may be donated as soon as this returns.
        """
        self.wait()
        step = int(jax.device_get(state.step))
        if not force and not self._manager.should_save(step):
            return False
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, **self.metadata}
        json.dumps(data_state)  # fail now, not in a background thread
        tree = _state_tree(state)
        if self._multiprocess:
            return self._write(step, tree, meta, data_state)
        tree = _host_snapshot(tree)
        if not self.async_save:
            return self._write(step, tree, meta, data_state)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="jaxdiff-checkpoint")
        self._pending = self._executor.submit(self._write, step, tree, meta, data_state)
        return True

    def _write(self, step, tree, meta, data_state) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave({"state": data_state}),
        )
        return bool(self._manager.save(step, args=args, force=True))

    def wait(self):
        """Block until background saves are on disk; re-raise a background save's error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        self._manager.wait_until_finished()

    def close(self):
        """Finish pending saves (re-raising their error) and release the manager."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._manager.close()

    def _quarantine(self, step: int):
        self.wait()
        src = os.path.join(self.directory, str(step))
        dest_root = self.directory.rstrip(os.sep) + ".corrupt"
        os.makedirs(dest_root, exist_ok=True)
        dest = os.path.join(dest_root, str(step))
        if os.path.exists(dest):
            shutil.rmtree(dest)
        if os.path.exists(src):
            shutil.move(src, dest)
        self._manager.close()
        self._manager = self._make_manager()

    def _check_same_run(self, meta, step):
        """Refuse to resume a run whose metadata differs (another config in the same dir)."""
        if not self.metadata or not isinstance(meta, dict):
            return
        saved = {k: v for k, v in meta.items() if k not in ("format", "version", "step")}
        if json.loads(json.dumps(self.metadata)) != saved:
            changed = sorted(k for k in set(saved) | set(self.metadata)
                             if saved.get(k) != json.loads(json.dumps(self.metadata.get(k))))
            raise _DifferentRun(
                f"{self.directory} holds a checkpoint (step {step}) of a different run: its "
                f"metadata differs in {changed}. Use another directory, or remove it to start "
                "over; nothing was changed."
            )

    def restore(self, target: TrainState, *, step: int | None = None):
        """Restore onto ``target``'s structure, dtypes and shardings.

        Args:
            target: a state of the same structure (e.g. freshly created); its arrays' shardings
                decide where the restored arrays live, so a checkpoint written on one mesh
                restores onto another.
            step: a specific step (no fallback), or None for the newest readable one.

        Returns:
            ``(state, data_state)``, or ``(None, None)`` if the directory holds no checkpoint.

        Raises:
            Exception: a background save that failed (see :meth:`wait`).
            ValueError: the checkpoint's metadata differs from this checkpointer's (a run with
                another config in the same directory); nothing is moved or deleted.
        """
        steps = [step] if step is not None else self.all_steps()[::-1]
        abstract = _abstract(_state_tree(target))
        treedef = jax.tree.structure(abstract)
        for s in steps:
            try:
                meta = self._manager.restore(
                    s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
                self._check_same_run(meta, s)
                out = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract),
                        data=ocp.args.JsonRestore(),
                    ),
                )
                tree = jax.tree.unflatten(treedef, jax.tree.leaves(out["state"]))
            except _DifferentRun:
                raise
            except Exception as err:  # noqa: BLE001 -- any failure means unreadable
                if step is not None:
                    raise
                warnings.warn(
                    f"Checkpoint at step {s} in {self.directory} could not be restored "
                    f"({type(err).__name__}: {err}); moving it to {self.directory}.corrupt "
                    "and trying the previous one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._quarantine(s)
                continue
            state = TrainState(
                step=tree["step"],
                params=tree["params"],
                averages=tree["averages"],
                opt_state=tree["opt_state"],
                key=jax.random.wrap_key_data(
                    tree["key_data"], impl=jax.random.key_impl(target.key)
                ),
                num_skipped=tree["num_skipped"],
                num_updates=tree["num_updates"],
            )
            return state, out["data"]["state"]
        return None, None


class LoadedModel(NamedTuple):
    """What :func:`load_model` rebuilds from a checkpoint."""

    denoiser: Any
    process: Any
    prediction: str
    graphdef: Any
    params: Any
    null_cond: Any
    metadata: dict
    step: int


def _checkpoint_dir(path) -> str:
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_model: no directory at {path}.")
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def load_model(path, *, average: str | None = "auto", step: int | None = None) -> LoadedModel:
    """Rebuild the network, process and denoiser stored in a checkpoint directory.

    Args:
        path: a checkpoint directory (or a run directory holding ``checkpoints/``).
        average: which parameters: ``"auto"`` (the first average if any, else the raw
            parameters), None (raw parameters) or an average's name (e.g. ``"ema_0.999"``).
        step: a specific step; default the newest readable one.

    Returns:
        A :class:`LoadedModel`; ``.denoiser(x, t, cond=None)`` is ready for any sampler.

    Examples:
        >>> model = load_model("runs/toy2d")
        >>> x = jaxdiff.sample(key, model.denoiser, model.process, (1000, 2), method="heun")
    """
    from flax import nnx

    from .. import nets

    directory = _checkpoint_dir(path)
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
    )
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(
            f"load_model: {directory} contains no checkpoint (expected numbered step directories "
            "written by jaxdiff.training.Checkpointer)."
        )
    candidates = [step] if step is not None else steps[::-1]
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    errors = []
    for s in candidates:
        try:
            # Restore onto this process's first device, whatever mesh wrote the checkpoint.
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                manager.item_metadata(s)["state"],
            )
            out = manager.restore(
                s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                           meta=ocp.args.JsonRestore())
            )
        except Exception as err:  # noqa: BLE001
            if step is not None:
                raise
            errors.append(f"step {s}: {type(err).__name__}: {err}")
            warnings.warn(f"load_model: checkpoint at step {s} is unreadable ({err}); trying "
                          "the previous one.", RuntimeWarning, stacklevel=2)
            continue
        break
    else:
        raise ValueError(f"load_model: no readable checkpoint in {directory}: {errors}")
    manager.close()
    meta = out["meta"]
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_model: {directory} step {s} is not a jaxdiff checkpoint.")
    for field in ("process", "prediction", "net"):
        if field not in meta:
            raise ValueError(
                f"load_model: checkpoint metadata lacks {field!r}; save with "
                "Checkpointer(metadata=describe(...)) to make it self-describing."
            )
    process = process_from_config(meta["process"])
    # Only the structure is needed: an abstract build skips the (slow, eager) initialisers.
    net = nnx.eval_shape(lambda: nets.create(meta["net"]["name"], meta["net"]["config"],
                                             rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(net)
    tree = out["state"]
    if average == "auto":
        names = sorted(tree.get("averages", {}))
        average = names[0] if names else None
    if average is None:
        params = tree["params"]
    elif average in tree.get("averages", {}):
        params = tree["averages"][average]
    else:
        raise ValueError(
            f"load_model: average {average!r} not in checkpoint; have "
            f"{sorted(tree.get('averages', {}))}."
        )
    params = jax.tree.map(jnp.asarray, params)
    denoiser = nets.make_denoiser(graphdef, params, process, meta["prediction"])
    null_cond = getattr(net, "null_cond", None)
    return LoadedModel(denoiser, process, meta["prediction"], graphdef, params, null_cond, meta, s)


def load_denoiser(path, *, average: str | None = "auto", step: int | None = None):
    """The ready :class:`~jaxdiff.Denoiser` stored in a checkpoint (see :func:`load_model`).

    Examples:
        >>> denoiser = load_denoiser("runs/toy2d")
    """
    return load_model(path, average=average, step=step).denoiser
