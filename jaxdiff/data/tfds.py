r"""TensorFlow Datasets image-classification sets as random-access sources, without TensorFlow.

:func:`tfds_source` wraps ``tfds.data_source`` (tensorflow-datasets >= 4.9), which reads a
prepared dataset's ArrayRecord files with random access and decodes the examples with numpy
(PNG/JPEG through OpenCV or PIL): TensorFlow is not needed to *read*. Each element becomes

.. math::
    \{\texttt{"image"}: x / 127.5 - 1 \in [-1, 1]^{H \times W \times C}\ (\text{float32}),\quad
    \texttt{"label"}: \text{int32}\},

for uint8 images ``x``. :func:`to_uint8` inverts the scaling. Any dataset with an ``"image"``
(uint8 ``Image``) and a ``"label"`` (``ClassLabel``) feature works: mnist, fashion_mnist,
cifar10, ...; other features are dropped.

Preparing a dataset (download and conversion to ArrayRecord) is a separate, one-time step:
``tfds build mnist --file_format=array_record --data_dir=DIR``, or
``tfds_source(..., download=True)``. Writing image datasets encodes the images with
TensorFlow, so prepare them where TensorFlow is installed; the prepared files are then read
anywhere. A dataset that is not prepared under ``data_dir`` raises a ``FileNotFoundError``
that says where it looked and how to prepare it.

In tests, ``tfds.testing.mock_data(num_examples=...)`` makes :func:`tfds_source` return random
examples with the dataset's true features (no files; the default ``MockPolicy.AUTO`` and
``MockPolicy.USE_CODE`` work without TensorFlow, ``MockPolicy.USE_FILES`` needs the
dataset's metadata files).
"""

import os

import jax.numpy as jnp
import numpy as np

from ._optional import import_optional

__all__ = ["TfdsImageSource", "tfds_source", "to_uint8"]


def _features(source):
    return source.dataset_info.features


class TfdsImageSource:
    r"""Random-access view of one split of a TFDS image-classification set.

    ``source[i]`` is ``{"image": (H, W, C) float32 in [-1, 1], "label": () int32}``, with
    ``image = uint8 / 127.5 - 1``; ``len(source)`` is the number of examples. Indices are
    read one at a time from the underlying ``tfds.data_source``; use
    :func:`jaxdiff.data.batches` to iterate in shuffled, checkpointable batches.

    Attributes:
        name: the dataset name, e.g. ``"mnist"``.
        split: the split, e.g. ``"train"`` or ``"train[:90%]"``.
        image_shape: ``(H, W, C)`` from the dataset's features (``None`` for a variable size;
            such sets cannot be stacked into batches as they are).
        num_classes: number of label classes.
        info: the dataset's ``tfds.core.DatasetInfo``.

    Examples:
        >>> source = tfds_source("mnist", "train")
        >>> source[0]["image"].shape, source.num_classes
        ((28, 28, 1), 10)
    """

    def __init__(self, source, *, name: str, split: str):
        features = _features(source)
        keys = list(features.keys())
        if "image" not in keys or "label" not in keys:
            raise ValueError(
                f"TFDS dataset {name!r} must have 'image' and 'label' features for an image "
                f"classification source; it has {keys}."
            )
        image, label = features["image"], features["label"]
        # ``np_dtype`` rather than ``dtype``: the latter imports TensorFlow.
        if np.dtype(getattr(image, "np_dtype", None)) != np.uint8:
            raise ValueError(
                f"TFDS dataset {name!r}: the 'image' feature must hold uint8 images; got "
                f"{type(image).__name__} with dtype {getattr(image, 'np_dtype', None)}."
            )
        if getattr(label, "num_classes", None) is None:
            raise ValueError(
                f"TFDS dataset {name!r}: the 'label' feature must be a ClassLabel; got "
                f"{type(label).__name__}."
            )
        self._source = source
        self.name = name
        self.split = split
        self.image_shape = tuple(image.shape)
        self.num_classes = int(label.num_classes)

    @property
    def info(self):
        """The dataset's ``tfds.core.DatasetInfo`` (features, splits, citation)."""
        return self._source.dataset_info

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples.")
        example = self._source[index % len(self)]
        image = np.asarray(example["image"])
        return {
            "image": image.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
            "label": np.asarray(example["label"], np.int32),
        }

    def __repr__(self) -> str:
        return (
            f"TfdsImageSource(name={self.name!r}, split={self.split!r}, len={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def _default_data_dir(tfds) -> str:
    try:
        return str(tfds.core.constants.DATA_DIR)
    except AttributeError:
        return os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def tfds_source(name: str, split: str, *, data_dir=None, download: bool = False) -> TfdsImageSource:
    """Random-access source of a prepared TFDS image-classification split (no TensorFlow needed).

    Args:
        name: the TFDS name, optionally with config and version (``"mnist"``,
            ``"cifar10:3.0.2"``).
        split: a TFDS split string (``"train"``, ``"test"``, ``"train[:90%]"``, ...).
        data_dir: where the prepared dataset lives (default: TFDS's default, ``TFDS_DATA_DIR``
            or ``~/tensorflow_datasets``).
        download: if True, download and prepare the dataset in the ArrayRecord format when it
            is missing (needs network access, and TensorFlow to encode images). If False (the
            default), a missing dataset is an error.

    Returns:
        A :class:`TfdsImageSource`: ``source[i] = {"image": (H, W, C) float32 in [-1, 1],
        "label": int32}``.

    Raises:
        FileNotFoundError: the dataset is not prepared in the ArrayRecord format under
            ``data_dir`` (the message says how to prepare it).
        ValueError: unknown dataset name, or no ``image``/``label`` features.
        ImportError: tensorflow-datasets is not installed.

    Examples:
        >>> train = tfds_source("mnist", "train", data_dir="~/tensorflow_datasets")
        >>> batch = next(jaxdiff.data.batches(train, 128, seed=0))
        >>> batch["image"].shape, batch["label"].dtype
        ((128, 28, 28, 1), dtype('int32'))
    """
    tfds = import_optional("tensorflow_datasets", "tensorflow-datasets", "tfds_source")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (a TFDS dataset name); got {name!r}.")
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty str (a TFDS split); got {split!r}.")
    if data_dir is not None:
        data_dir = os.path.expanduser(os.fspath(data_dir))
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=bool(download))
    except tfds.core.DatasetNotFoundError:
        raise ValueError(
            f"name {name!r} is not a registered TFDS dataset (tfds.list_builders() lists them)."
        ) from None
    except (NotImplementedError, OSError) as e:
        # Without prepared files tfds falls back to the TFRecord format and reports that it has
        # no random access to it, which hides the actual cause: nothing is there.
        where = data_dir if data_dir is not None else _default_data_dir(tfds)
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in the ArrayRecord format "
            f"under data_dir={where!r}"
            + ("" if download else " and download=False")
            + ". Prepare it once, e.g. `tfds build "
            f"{name} --file_format=array_record --data_dir={where}` (where TensorFlow is "
            "installed, to encode the images), or call tfds_source(..., download=True). "
            f"(tensorflow_datasets reported: {cause})"
        ) from e
    return TfdsImageSource(source, name=name, split=split)


def to_uint8(images) -> np.ndarray:
    r"""Inverse of the image scaling: :math:`\mathrm{round}(127.5 (x + 1))`, clipped to 0..255.

    Args:
        images: float array in (about) :math:`[-1, 1]`, any shape; model samples outside are
            clipped.

    Returns:
        ``uint8`` numpy array of the same shape.

    Examples:
        >>> to_uint8(np.array([-1.0, 0.0, 1.0]))
        array([  0, 128, 255], dtype=uint8)
    """
    x = np.asarray(images)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"images must be a float array; got dtype {x.dtype}.")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("images must be finite; got NaN or inf values.")
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
