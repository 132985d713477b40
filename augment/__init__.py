"""augment: synthetic data augmentation for chest X-ray classifier training.

Subpackages: ``augment.data`` (labels, sources, splits, cache, synthetic sets, mixing),
``augment.stages`` (one plain function per CLI command), ``augment.metrics`` (AUC, FID, KID, IS,
precision/recall, mask metrics). ``augment.runtime`` is the only module that imports Ray and
``augment.search`` the only one that touches Optuna trials.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("augment")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+src"
