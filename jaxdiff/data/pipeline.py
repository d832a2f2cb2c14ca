r"""Deterministic, checkpointable, shardable batches over any random-access source.

A *source* is anything with ``len(source)`` and ``source[i]`` for ``0 <= i < len(source)``:
an :class:`ArraySource` (a dict of equally long arrays, read with vectorised indexing; plain
dicts and arrays are wrapped automatically), a :class:`~jaxdiff.data.tfds.TfdsImageSource`, a
grain or tfds data source, or a list of dicts. Elements are dicts of arrays (a bare array
element or a bare array source is stored under the key ``"x"``); a batch is a dict of numpy
arrays with a leading batch axis.

**Index arithmetic.** With ``n`` examples, ``b = batch_size`` examples per shard (host),
``S = num_shards`` shards and the *global* batch ``G = b S``, there are
``K = floor(n / G)`` steps per epoch with ``drop_remainder=True`` (the last ``n - K G``
examples of each epoch's order are skipped) or ``ceil(n / G)`` without (the last global batch
is short). Global step ``k`` belongs to epoch ``e = k // K`` at position ``j = k % K``, and
shard ``h`` receives

.. math::
    \text{indices}(k, h) = \pi_e[\,jG + hb \;:\; \min(jG + (h+1)b,\ (j+1)G,\ n)\,],

where :math:`\pi_e` is the permutation of epoch ``e``: every example appears exactly once per
epoch (except the dropped remainder), each epoch has a fresh order, shard ``h`` holds rows
``h b .. (h+1) b - 1`` of the global batch, the shards are disjoint and their concatenation in
shard order is the global batch. Without ``drop_remainder`` the short final global batch is
split by the same rule, so the last shards may receive short or empty batches: multi-host
training should keep ``drop_remainder=True``.

The batch of step ``k`` is a pure function of ``(seed, k)`` (:func:`batch_at`), so an
iterator's state is just its step (:meth:`BatchIterator.get_state`, a small JSON-serialisable
dict). A state can be restored into an iterator with another ``(shard_index, num_shards)``
as long as the global batch ``G`` is the same (e.g. after moving to another topology).

**Permutations.** :math:`\pi_e` sorts the examples by a 64-bit hash (SplitMix64's
finaliser, a bijection) of ``index XOR key(seed, e)``. It is defined here bit for bit, so
batches and checkpoints do not depend on the numpy version, and different ``(seed, epoch)``
pairs give unrelated orders (unlike seeding epoch ``e`` with ``seed + e``, which makes seed 0's
second epoch seed 1's first).

grain's ``MapDataset.shuffle(seed).repeat().batch(...)`` gives checkpointable random access
too, but its batches straddle epoch boundaries (an example can appear twice in one batch),
its epoch ``e`` is shuffled with ``seed + e``, and it shards the dataset rather than the rows
of a global batch; hence the explicit arithmetic above. Every source here also works as a
grain data source (``grain.MapDataset.source(source)``) for pipelines that want grain's
transformations.
"""

import functools
import math
import numbers
from collections.abc import Mapping

import numpy as np

__all__ = [
    "ArraySource",
    "BatchIterator",
    "as_source",
    "as_arrays",
    "batches",
    "batch_at",
    "epoch_permutation",
    "steps_per_epoch",
]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_DEFAULT_KEY = "x"
_STATE_KEYS = ("step", "seed", "global_batch_size", "num_examples", "drop_remainder")


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


class ArraySource:
    """In-memory random-access source: a dict of arrays with a common leading length.

    ``source[i]`` is the dict of rows ``{k: a[i]}``; :meth:`take` gathers many rows with one
    vectorised index per array. jax arrays are copied to host numpy arrays once.

    Args:
        arrays: mapping from names to arrays of shape ``(n, ...)`` (the same ``n``).

    Examples:
        >>> images, labels = jaxdiff.data.load_digits("train")
        >>> source = ArraySource({"image": images, "label": labels})
        >>> len(source), source[0]["image"].shape
        (1437, (8, 8, 1))
    """

    def __init__(self, arrays: Mapping):
        if not isinstance(arrays, Mapping) or not arrays:
            raise TypeError(
                "arrays must be a non-empty dict of arrays (e.g. {'image': x, 'label': y}); got "
                f"{type(arrays).__name__}."
            )
        converted = {}
        for k, v in arrays.items():
            if not isinstance(k, str):
                raise TypeError(f"arrays keys must be str; got {k!r}.")
            v = np.asarray(v)
            if v.ndim < 1:
                raise ValueError(f"arrays[{k!r}] must have a leading example axis; got a scalar.")
            converted[k] = v
        lengths = {k: v.shape[0] for k, v in converted.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must all have the same leading length; got {lengths}.")
        self._arrays = converted
        self._len = next(iter(lengths.values()))

    @property
    def arrays(self) -> dict:
        """The stored numpy arrays (not copies)."""
        return dict(self._arrays)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} is out of range for {self._len} examples.")
        return {k: v[index] for k, v in self._arrays.items()}

    def take(self, indices) -> dict:
        """Rows ``indices`` (int array ``(m,)``) of every array: a dict of ``(m, ...)`` arrays."""
        indices = np.asarray(indices, np.int64)
        return {k: np.take(v, indices, axis=0) for k, v in self._arrays.items()}

    def __repr__(self) -> str:
        shapes = {k: (v.shape, str(v.dtype)) for k, v in self._arrays.items()}
        return f"ArraySource(len={self._len}, arrays={shapes})"


def as_source(data):
    """Wrap ``data`` as a random-access source (unchanged if it already is one).

    A dict of arrays becomes an :class:`ArraySource`; a bare array ``(n, ...)`` becomes
    ``ArraySource({"x": data})``; any other object with ``__len__`` and ``__getitem__`` (a
    :class:`~jaxdiff.data.tfds.TfdsImageSource`, a grain source, a list of dicts) is used as it
    is. Tuples are refused, to avoid treating ``(images, labels)`` as a 2-element dataset.

    Examples:
        >>> source = as_source({"x": np.zeros((10, 2)), "label": np.arange(10)})
    """
    if isinstance(data, ArraySource):
        return data
    if isinstance(data, Mapping):
        return ArraySource(data)
    if isinstance(data, tuple):
        raise TypeError(
            "source must be a dict of arrays, an array or a random-access source; got a tuple. "
            "Name the parts, e.g. batches({'image': images, 'label': labels}, ...)."
        )
    if hasattr(data, "__array__") and hasattr(data, "shape") and hasattr(data, "dtype"):
        return ArraySource({_DEFAULT_KEY: data})
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return data
    raise TypeError(
        "source must be a dict of arrays, an array, or an object with __len__ and __getitem__; "
        f"got {type(data).__name__}."
    )


def _as_dict(element):
    return element if isinstance(element, Mapping) else {_DEFAULT_KEY: element}


def _fetch(source, indices) -> dict:
    """The examples ``indices`` of a source, stacked into a dict of numpy arrays."""
    if isinstance(source, ArraySource):
        return source.take(indices)
    elements = [_as_dict(source[int(i)]) for i in indices]
    if not elements:  # an empty shard of a short final batch: keep the element shapes
        template = _as_dict(source[0])
        return {k: np.zeros((0,) + np.shape(v), np.asarray(v).dtype) for k, v in template.items()}
    keys = list(elements[0].keys())
    try:
        return {k: np.stack([np.asarray(e[k]) for e in elements]) for k in keys}
    except ValueError as e:
        raise ValueError(
            f"the elements of the source cannot be stacked into a batch (different shapes?): {e}"
        ) from e


def as_arrays(source) -> dict:
    """The whole dataset as a dict of numpy arrays, in index order (for small sets).

    For an :class:`ArraySource` (or a dict of arrays) these are the stored arrays themselves;
    any other source is read element by element.

    Examples:
        >>> images, labels = jaxdiff.data.load_digits("all")
        >>> as_arrays({"image": images, "label": labels})["image"].shape
        (1797, 8, 8, 1)
    """
    source = as_source(source)
    if isinstance(source, ArraySource):
        return source.arrays
    n = _num_examples(source)
    return _fetch(source, np.arange(n))


# ------------------------------------------------------------------------------------------------
# Permutations and index arithmetic
# ------------------------------------------------------------------------------------------------


def _mix_int(x: int) -> int:
    """SplitMix64 step on a Python int (exact 64-bit wrap-around)."""
    x = (x + _GAMMA) & _MASK64
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    """SplitMix64 step on a uint64 array (numpy array arithmetic wraps modulo 2**64)."""
    x = x + np.uint64(_GAMMA)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MUL1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MUL2)
    return x ^ (x >> np.uint64(31))


def _check_int(value, name, *, minimum=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}.")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {name} = {value}.")
    return value


def _check_seed(seed):
    seed = _check_int(seed, "seed")
    if seed > _MASK64:
        raise ValueError(f"seed must be < 2**64; got {seed}.")
    return seed


@functools.lru_cache(maxsize=8)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    key = _mix_int(_mix_int(seed) ^ epoch)
    hashed = _mix_array(np.arange(num_examples, dtype=np.uint64) ^ np.uint64(key))
    # The hash is a bijection of the (distinct) indices, so there are no ties to break.
    perm = np.argsort(hashed, kind="stable").astype(np.int64)
    perm.setflags(write=False)
    return perm


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    r"""The order :math:`\pi_e` in which epoch ``epoch`` visits the examples.

    ``argsort(splitmix64(arange(n) XOR key))`` with ``key = splitmix64(splitmix64(seed) XOR
    epoch)`` (64-bit arithmetic): a pure, numpy-version-independent function of
    ``(num_examples, seed, epoch)``.

    Returns:
        A read-only int64 array of shape ``(num_examples,)``, a permutation of
        ``0 .. num_examples - 1``.

    Examples:
        >>> epoch_permutation(5, seed=0, epoch=0)
        array([0, 1, 3, 4, 2])
    """
    num_examples = _check_int(num_examples, "num_examples", minimum=1)
    return _permutation(num_examples, _check_seed(seed), _check_int(epoch, "epoch"))


def _check_batching(num_examples, batch_size, shard_index, num_shards, drop_remainder):
    batch_size = _check_int(batch_size, "batch_size", minimum=1)
    num_shards = _check_int(num_shards, "num_shards", minimum=1)
    shard_index = _check_int(shard_index, "shard_index")
    if shard_index >= num_shards:
        raise ValueError(
            f"shard_index must lie in [0, num_shards) = [0, {num_shards}); got {shard_index}."
        )
    if not isinstance(drop_remainder, (bool, np.bool_)):
        raise TypeError(f"drop_remainder must be a bool; got {type(drop_remainder).__name__}.")
    if num_examples < 1:
        raise ValueError("the source is empty (len(source) == 0).")
    global_batch = batch_size * num_shards
    if drop_remainder and global_batch > num_examples:
        raise ValueError(
            f"batch_size * num_shards = {batch_size} * {num_shards} = {global_batch} exceeds the "
            f"{num_examples} examples of the source, so drop_remainder=True would leave no batch; "
            "use a smaller batch_size or drop_remainder=False."
        )
    return batch_size, shard_index, num_shards, bool(drop_remainder)


def _num_examples(source) -> int:
    try:
        return int(len(source))
    except TypeError as e:
        raise TypeError(f"source must have a length (random access); got {type(source)}.") from e


def _steps(num_examples, global_batch, drop_remainder):
    if drop_remainder:
        return num_examples // global_batch
    return math.ceil(num_examples / global_batch)


def steps_per_epoch(
    num_examples: int, batch_size: int, *, num_shards: int = 1, drop_remainder: bool = True
) -> int:
    """Global steps per epoch: ``n // G`` with ``drop_remainder``, else ``ceil(n / G)``.

    ``G = batch_size * num_shards`` is the global batch.

    Examples:
        >>> steps_per_epoch(1437, 64)
        22
    """
    num_examples = _check_int(num_examples, "num_examples")
    batch_size, _, num_shards, drop_remainder = _check_batching(
        num_examples, batch_size, 0, num_shards, drop_remainder
    )
    return _steps(num_examples, batch_size * num_shards, drop_remainder)


def _indices_at(num_examples, step, seed, batch_size, shard_index, num_shards, drop_remainder):
    global_batch = batch_size * num_shards
    epoch, position = divmod(step, _steps(num_examples, global_batch, drop_remainder))
    batch_start = position * global_batch
    batch_stop = min(batch_start + global_batch, num_examples)
    start = min(batch_start + shard_index * batch_size, batch_stop)
    stop = min(start + batch_size, batch_stop)
    return _permutation(num_examples, seed, epoch)[start:stop]


def batch_at(
    source,
    step: int,
    batch_size: int,
    *,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    drop_remainder: bool = True,
) -> dict:
    """The batch of global step ``step`` for shard ``shard_index``: a pure function of the inputs.

    See the module docstring for the index arithmetic. ``batches(...)`` yields exactly
    ``batch_at(..., step=0)``, ``batch_at(..., step=1)``, ...

    Args:
        source: a dict of arrays, an array, or a random-access source (see :func:`as_source`).
        step: the global step, ``>= 0`` (it may run over many epochs).
        batch_size: examples per shard (the per-host batch).
        seed: the shuffling seed, a non-negative int.
        shard_index: this shard (host), in ``[0, num_shards)``.
        num_shards: number of shards (hosts) that split every global batch.
        drop_remainder: skip the examples that do not fill a whole global batch.

    Returns:
        A dict of numpy arrays with leading axis ``batch_size`` (shorter only for the last batch
        of an epoch without ``drop_remainder``).

    Examples:
        >>> data = {"x": np.arange(10.0)[:, None], "label": np.arange(10)}
        >>> batch_at(data, 7, 4, seed=0)["x"].shape
        (4, 1)
    """
    source = as_source(source)
    n = _num_examples(source)
    batch_size, shard_index, num_shards, drop_remainder = _check_batching(
        n, batch_size, shard_index, num_shards, drop_remainder
    )
    step = _check_int(step, "step")
    seed = _check_seed(seed)
    indices = _indices_at(n, step, seed, batch_size, shard_index, num_shards, drop_remainder)
    return _fetch(source, indices)


# ------------------------------------------------------------------------------------------------
# The iterator
# ------------------------------------------------------------------------------------------------


class BatchIterator:
    """Endless iterator over shuffled batches, with a JSON-serialisable state.

    ``next(it)`` returns :func:`batch_at` of the current step and advances it; epochs follow one
    another with fresh permutations. :meth:`get_state` / :meth:`set_state` save and restore the
    position, so a restored iterator continues with bitwise the same batches as an
    uninterrupted one. Create it with :func:`batches`.

    Examples:
        >>> it = batches({"x": np.arange(100.0)}, 8, seed=0)
        >>> first = next(it)
        >>> state = it.get_state()               # {"step": 1, "seed": 0, ...}
        >>> second = next(it)
        >>> it.set_state(state)
        >>> np.array_equal(next(it)["x"], second["x"])
        True
    """

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        seed: int,
        shard_index: int = 0,
        num_shards: int = 1,
        drop_remainder: bool = True,
    ):
        self._source = as_source(source)
        self._num_examples = _num_examples(self._source)
        (self._batch_size, self._shard_index, self._num_shards, self._drop_remainder) = (
            _check_batching(self._num_examples, batch_size, shard_index, num_shards, drop_remainder)
        )
        self._seed = _check_seed(seed)
        self._steps_per_epoch = _steps(
            self._num_examples, self.global_batch_size, self._drop_remainder
        )
        self._step = 0

    # -- properties --------------------------------------------------------------------------

    @property
    def source(self):
        """The random-access source being iterated."""
        return self._source

    @property
    def step(self) -> int:
        """The global step of the next batch."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._step // self._steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch (see :func:`steps_per_epoch`)."""
        return self._steps_per_epoch

    @property
    def batch_size(self) -> int:
        """Examples per shard and step."""
        return self._batch_size

    @property
    def global_batch_size(self) -> int:
        """Examples per step over all shards: ``batch_size * num_shards``."""
        return self._batch_size * self._num_shards

    # -- iteration ---------------------------------------------------------------------------

    def indices(self, step: int) -> np.ndarray:
        """Source indices of this shard's batch at global step ``step`` (read-only int64)."""
        step = _check_int(step, "step")
        return _indices_at(
            self._num_examples,
            step,
            self._seed,
            self._batch_size,
            self._shard_index,
            self._num_shards,
            self._drop_remainder,
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = _fetch(self._source, self.indices(self._step))
        self._step += 1
        return batch

    # -- checkpointing -----------------------------------------------------------------------

    def get_state(self) -> dict:
        """The position as a JSON-serialisable dict of ints and bools.

        ``{"step", "seed", "global_batch_size", "num_examples", "drop_remainder"}``: the step
        plus what :meth:`set_state` checks, so that a state is never restored into an iterator
        that would produce other batches.
        """
        return {
            "step": self._step,
            "seed": self._seed,
            "global_batch_size": self.global_batch_size,
            "num_examples": self._num_examples,
            "drop_remainder": self._drop_remainder,
        }

    def set_state(self, state: Mapping) -> None:
        """Restore a position saved by :meth:`get_state` (possibly by another shard layout).

        Raises:
            ValueError: the state is malformed, or was saved for another seed, global batch
                size, dataset size or ``drop_remainder``.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from get_state(); got {type(state).__name__}.")
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"state is missing the keys {missing}; got keys {sorted(state)}.")
        step = _check_int(state["step"], "state['step']")
        current = self.get_state()
        for k in _STATE_KEYS[1:]:
            if state[k] != current[k] or isinstance(state[k], bool) != isinstance(current[k], bool):
                raise ValueError(
                    f"state was saved with {k}={state[k]!r} but this iterator has "
                    f"{k}={current[k]!r}; it would not continue the same sequence of batches."
                )
        self._step = step

    def __repr__(self) -> str:
        return (
            f"BatchIterator(step={self._step}, batch_size={self._batch_size}, "
            f"shard={self._shard_index}/{self._num_shards}, seed={self._seed}, "
            f"num_examples={self._num_examples}, drop_remainder={self._drop_remainder})"
        )


def batches(
    source,
    batch_size: int,
    *,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    drop_remainder: bool = True,
) -> BatchIterator:
    """Shuffled, endless, checkpointable batches of a random-access source.

    Host ``h`` of ``n`` hosts passes ``shard_index=h, num_shards=n`` and its per-host
    ``batch_size = b``: it receives rows ``h b .. (h+1) b - 1`` of each global batch of
    ``n b`` examples, and all hosts see the same global batches as one host with
    ``batch_size = n b`` would. Epochs reshuffle with the permutation of ``(seed, epoch)``
    (:func:`epoch_permutation`); see the module docstring for the exact arithmetic.

    Args:
        source: a dict of arrays, an array, or a random-access source (see :func:`as_source`).
        batch_size: examples per shard and step (the per-host batch), ``>= 1``.
        seed: the shuffling seed, a non-negative int.
        shard_index: this shard, in ``[0, num_shards)``.
        num_shards: number of shards (hosts), ``>= 1``.
        drop_remainder: skip the examples that do not fill a whole global batch, so every batch
            has ``batch_size`` rows (then ``batch_size * num_shards <= len(source)`` is required).

    Returns:
        A :class:`BatchIterator`; ``next(it)`` is a dict of numpy arrays ``(batch_size, ...)``.

    Raises:
        ValueError: ``batch_size <= 0``, a global batch larger than the source with
            ``drop_remainder``, ``shard_index`` outside ``[0, num_shards)``, a negative seed or
            an empty source.

    Examples:
        >>> images, labels = jaxdiff.data.load_digits("train")
        >>> it = batches({"image": images, "label": labels}, 64, seed=0)
        >>> batch = next(it)                      # batch["image"]: (64, 8, 8, 1) float32
        >>> saved = json.dumps(it.get_state())    # store with the model checkpoint
    """
    return BatchIterator(
        source,
        batch_size,
        seed=seed,
        shard_index=shard_index,
        num_shards=num_shards,
        drop_remainder=drop_remainder,
    )
