r"""The ``fit`` loop: resume, step, log (JSONL + progress bar), sample grids, checkpoint.

:func:`fit` is deliberately thin: the numerics live in the pure ``train_step``
(:func:`~jaxdiff.training.make_train_step`); the loop only moves batches in, pulls metrics out
every ``log_every`` steps (no host synchronisation in between), and writes files. Started again
with the same arguments after an interruption (even ``SIGKILL``), it resumes from the newest
readable checkpoint -- parameters, averages, optimizer, step, key and the data iterator's
position -- and ends with the same parameters, bit for bit, as an uninterrupted run.
"""

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from .checkpoint import Checkpointer
from .state import TrainState

__all__ = ["fit", "FitResult", "save_sample_grid", "read_metrics"]


class FitResult(NamedTuple):
    """Return value of :func:`fit`."""

    state: TrainState
    history: list[dict]
    resumed_from: int | None


def read_metrics(path) -> list[dict]:
    """Records of a JSONL metrics file (an unfinished last line is ignored)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _truncate_metrics(path, step):
    """Drop records logged after ``step`` (they will be logged again by the resumed run)."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def save_sample_grid(path, samples, *, reference=None, title=None):
    """Write samples as a PNG: a scatter plot for ``(N, 2)`` points, a grid for ``(N, H, W, C)``.

    Args:
        path: output file.
        samples: ``(N, 2)`` points or ``(N, H, W, C)`` images in ``[-1, 1]``.
        reference: optional ``(M, 2)`` data points drawn underneath a scatter plot.
        title: optional figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = np.asarray(samples, np.float32)
    if samples.ndim == 2 and samples.shape[1] == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        if reference is not None:
            ref = np.asarray(reference, np.float32)
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.7", label="data")
        ax.scatter(samples[:, 0], samples[:, 1], s=1, c="C0", label="samples")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", markerscale=5, fontsize=7)
    elif samples.ndim == 4:
        n, h, w, c = samples.shape
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
        for i in range(n):
            r, q = divmod(i, cols)
            grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = (
                np.clip((samples[i] + 1) / 2, 0, 1)
            )
        fig, ax = plt.subplots(figsize=(max(2, cols * 0.6), max(2, rows * 0.6)))
        ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    else:
        raise ValueError(f"save_sample_grid: samples must be (N, 2) or (N, H, W, C); got "
                         f"{samples.shape}.")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summarise(buffer, step, num_skipped, elapsed):
    host = jax.device_get(buffer)
    record = {"step": step}
    for key in host[0]:
        values = np.stack([np.asarray(m[key]) for m in host])
        if key == "skipped":
            record["skipped"] = int(values.sum())
        elif key in ("loss_bin_sum", "loss_bin_count"):
            record[key] = values.sum(axis=0).tolist()
        else:
            record[key] = float(values.mean())
    if "loss_bin_sum" in record and "loss_bin_count" in record:
        sums, counts = np.asarray(record.pop("loss_bin_sum")), np.asarray(
            record.pop("loss_bin_count"))
        record["loss_bins"] = [float(s / c) if c else None for s, c in zip(sums, counts)]
    record["num_skipped"] = int(num_skipped)
    record["steps_per_s"] = len(host) / max(elapsed, 1e-9)
    return record


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]],
    batches: Iterator[dict],
    *,
    num_steps: int,
    workdir=None,
    metadata: dict | None = None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    async_checkpoint: bool = True,
    log_every: int = 100,
    sample_every: int | None = None,
    sample_fn: Callable[[TrainState], Any] | None = None,
    progress: bool = True,
    log_fn: Callable[[dict], None] | None = None,
) -> FitResult:
    """Train ``state`` to ``num_steps`` steps, resuming from ``workdir`` if it has checkpoints.

    Files under ``workdir``: ``checkpoints/<step>/`` (see
    :class:`~jaxdiff.training.Checkpointer`), ``metrics.jsonl`` (one record per ``log_every``
    steps: mean loss, mean gradient norm, skipped updates, per-log-SNR-bin loss when the train
    step reports bins, throughput) and ``samples/step_<n>.png`` from ``sample_fn``.

    Args:
        state: the initial state (also the restore target: its shardings place the restored
            arrays).
        train_step: ``(state, batch) -> (state, metrics)``; it may donate ``state``.
        batches: an iterator of batches; if it has ``get_state``/``set_state`` its position is
            checkpointed and restored.
        num_steps: total number of steps of the run (not of this call).
        workdir: run directory; None trains without files.
        metadata: stored with every checkpoint (e.g. :func:`~jaxdiff.training.describe`).
        checkpoint_every: steps between checkpoints (a checkpoint is always written at the
            end when ``workdir`` is set).
        keep: number of checkpoints kept.
        async_checkpoint: write checkpoints in the background.
        log_every: steps between metric records.
        sample_every: steps between sample grids (needs ``sample_fn``).
        sample_fn: ``state -> samples`` (``(N, 2)`` or ``(N, H, W, C)``) for the grids.
        progress: show a tqdm progress bar.
        log_fn: called with every metric record (e.g. to print).

    Returns:
        :class:`FitResult` ``(state, history, resumed_from)``.

    Examples:
        >>> result = fit(state, train_step, batches, num_steps=2000, workdir="runs/toy2d",
        ...              checkpoint_every=500, metadata=describe(process, "eps", net))
    """
    num_steps = int(num_steps)
    if num_steps < 0:
        raise ValueError(f"fit: num_steps must be >= 0; got {num_steps}.")
    for name, value in (("log_every", log_every), ("checkpoint_every", checkpoint_every),
                        ("sample_every", sample_every)):
        if value is not None and int(value) < 1:
            raise ValueError(f"fit: {name} must be >= 1 or None; got {value}.")
    if sample_every is not None and sample_fn is None:
        raise ValueError("fit: sample_every needs a sample_fn.")

    checkpointer = None
    metrics_path = None
    resumed_from = None
    if workdir is not None:
        workdir = os.fspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=keep,
                                    async_save=async_checkpoint, metadata=metadata)
        restored, data_state = checkpointer.restore(state)
        if restored is not None:
            state = restored
            resumed_from = int(jax.device_get(state.step))
            if data_state is not None and hasattr(batches, "set_state"):
                batches.set_state(data_state)
            _truncate_metrics(metrics_path, resumed_from)
        elif os.path.exists(metrics_path):
            _truncate_metrics(metrics_path, 0)

    start = int(jax.device_get(state.step))
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, dynamic_ncols=True, mininterval=1.0)
    buffer = []
    t_log = time.perf_counter()
    try:
        for step in range(start, num_steps):
            batch = next(batches)
            state, metrics = train_step(state, batch)
            buffer.append(metrics)
            done = step + 1
            last = done == num_steps
            if done % log_every == 0 or last:
                now = time.perf_counter()
                record = _summarise(buffer, done, jax.device_get(state.num_skipped), now - t_log)
                buffer, t_log = [], now
                history.append(record)
                if metrics_path is not None:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if log_fn is not None:
                    log_fn(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
            if sample_fn is not None and sample_every is not None and workdir is not None and (
                done % sample_every == 0 or last
            ):
                os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
                save_sample_grid(os.path.join(workdir, "samples", f"step_{done:07d}.png"),
                                 sample_fn(state), title=f"step {done}")
            if checkpointer is not None and (
                (checkpoint_every is not None and done % checkpoint_every == 0) or last
            ):
                data_state = batches.get_state() if hasattr(batches, "get_state") else None
                checkpointer.save(state, data_state=data_state)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if checkpointer is not None:
            checkpointer.close()
    return FitResult(state, history, resumed_from)
