r"""The scikit-learn 8x8 handwritten digits: a real image set that needs no download.

``sklearn.datasets.load_digits`` ships with scikit-learn: 1797 grey-level images of 8x8 pixels
with 17 grey levels :math:`v \in \{0, \dots, 16\}` and labels 0..9. They are returned NHWC as
float32 in :math:`[-1, 1]`,

.. math::
    x = v / 8 - 1 \in \{-1 + 2k/16 : k = 0, \dots, 16\},

so every level is exactly representable (bin width :math:`2/16`), and :func:`to_levels`
inverts the map (rounding and clipping model samples to the nearest level).
"""

import functools
import math
import numbers

import jax.numpy as jnp
import numpy as np

from ._optional import import_optional

__all__ = ["load_digits", "to_levels", "NUM_LEVELS", "NUM_CLASSES"]

#: Number of grey levels (0..16).
NUM_LEVELS = 17
#: Number of classes (digits 0..9).
NUM_CLASSES = 10

_SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _raw():
    datasets = import_optional("sklearn.datasets", "scikit-learn", "load_digits")
    levels, labels = datasets.load_digits(return_X_y=True)
    levels = np.asarray(levels).reshape(-1, 8, 8, 1).astype(np.uint8)
    levels.setflags(write=False)
    labels = np.asarray(labels, np.int32)
    labels.setflags(write=False)
    return levels, labels


@functools.lru_cache(maxsize=8)
def _split_indices(test_fraction, seed):
    model_selection = import_optional("sklearn.model_selection", "scikit-learn", "load_digits")
    _, labels = _raw()
    train, test = model_selection.train_test_split(
        np.arange(labels.shape[0]),
        test_size=test_fraction,
        random_state=seed,
        shuffle=True,
        stratify=labels,
    )
    # Canonical (ascending) order: shuffling is the batch iterator's job.
    return np.sort(train), np.sort(test)


def load_digits(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0):
    r"""The 8x8 digits as ``(images (N, 8, 8, 1) float32 in [-1, 1], labels (N,) int32)``.

    Images are :math:`v/8 - 1` for the grey levels :math:`v \in \{0..16\}`. The train/test
    split is stratified by class (scikit-learn's ``train_test_split`` with ``stratify``):
    ``ceil(test_fraction * 1797)`` test images, with every class split in the same proportion
    (up to rounding). It is a deterministic function of ``(test_fraction, seed)``; both splits
    are returned in ascending order of the original index, and ``"all"`` is the full set in its
    original order.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: fraction of the images held out for ``"test"``, in ``(0, 1)``.
        seed: seed of the split (a non-negative int).

    Returns:
        ``(images, labels)`` as new (writable) numpy arrays.

    Examples:
        >>> images, labels = load_digits("train")
        >>> images.shape, labels.shape
        ((1437, 8, 8, 1), (1437,))
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}; got {split!r}.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise TypeError(f"test_fraction must be a float; got {type(test_fraction).__name__}.")
    if not (0.0 < test_fraction < 1.0 and math.isfinite(test_fraction)):
        raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
    levels, labels = _raw()
    if split == "all":
        index = np.arange(labels.shape[0])
    else:
        train, test = _split_indices(float(test_fraction), int(seed))
        index = train if split == "train" else test
    images = levels[index].astype(np.float32) / np.float32(8.0) - np.float32(1.0)
    return images, labels[index].copy()


def to_levels(images) -> np.ndarray:
    r"""Grey levels of digit images: :math:`v = \mathrm{round}(8 (x + 1))`, clipped to 0..16.

    Exact inverse of :func:`load_digits`'s scaling; applied to model samples, it quantises them
    to the nearest level (values outside :math:`[-1, 1]` are clipped).

    Args:
        images: real array of any shape (numpy or jax), finite.

    Returns:
        ``uint8`` numpy array of the same shape with values in ``0..16``.

    Examples:
        >>> images, _ = load_digits("test")
        >>> levels = to_levels(images)   # the original 0..16 grey levels
    """
    x = np.asarray(images)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"images must be a float array; got dtype {x.dtype}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("images must be finite; got NaN or inf values.")
    levels = np.rint((x.astype(np.float64) + 1.0) * 8.0)
    return np.clip(levels, 0, NUM_LEVELS - 1).astype(np.uint8)
