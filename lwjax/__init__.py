"""lwjax: cache-aware layer-wise deployment of Flax models.

The public surface re-exports only; code lives in small modules under ``lwjax``,
``lwjax.models`` and ``lwjax.passes``.
"""

from lwjax import errors as errors
from lwjax import models as models

__version__ = "0.1.0"
