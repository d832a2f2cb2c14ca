"""Data: toy sets, the 8x8 digits, TFDS image sets, and deterministic checkpointable batching.

* :mod:`~jaxdiff.data.toy2d` -- labelled 2-D toy distributions drawn with ``jax.random``
  (``toy2d.sample(key, name, n)``), standardised by exactly known affine maps.
* :mod:`~jaxdiff.data.digits` -- scikit-learn's 8x8 digits (offline), scaled to ``[-1, 1]``.
* :mod:`~jaxdiff.data.tfds` -- TFDS image-classification sets (mnist, cifar10, ...) as
  random-access sources read without TensorFlow.
* :mod:`~jaxdiff.data.pipeline` -- shuffled, shardable batches whose step ``k`` is a pure
  function of ``(seed, k)``, with a JSON-serialisable iterator state.

Images are NHWC float32 in ``[-1, 1]``, labels int32, batches dicts of numpy arrays.

Only jax and numpy are needed to import this package; scikit-learn, tensorflow-datasets and
grain are optional (``pip install "jaxdiff[data]"``) and imported by the functions that use
them.
"""

from . import digits as digits
from . import pipeline as pipeline
from . import tfds as tfds
from . import toy2d as toy2d
from .digits import load_digits as load_digits
from .digits import to_levels as to_levels
from .pipeline import ArraySource as ArraySource
from .pipeline import BatchIterator as BatchIterator
from .pipeline import as_arrays as as_arrays
from .pipeline import as_source as as_source
from .pipeline import batch_at as batch_at
from .pipeline import batches as batches
from .pipeline import epoch_permutation as epoch_permutation
from .pipeline import steps_per_epoch as steps_per_epoch
from .tfds import TfdsImageSource as TfdsImageSource
from .tfds import tfds_source as tfds_source
from .tfds import to_uint8 as to_uint8

__all__ = [
    "ArraySource",
    "BatchIterator",
    "TfdsImageSource",
    "as_arrays",
    "as_source",
    "batch_at",
    "batches",
    "digits",
    "epoch_permutation",
    "load_digits",
    "pipeline",
    "steps_per_epoch",
    "tfds",
    "tfds_source",
    "to_levels",
    "to_uint8",
    "toy2d",
]
