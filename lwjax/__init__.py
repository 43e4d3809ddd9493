"""lwjax: cache-aware layer-wise deployment of Flax models.

The public surface re-exports only; code lives in small modules under ``lwjax``,
``lwjax.models`` and ``lwjax.passes``.
"""

from lwjax import errors as errors
from lwjax import models as models
from lwjax._api import analyze as analyze
from lwjax.passes.compression import Compression as Compression
from lwjax.passes.footprint import Footprint as Footprint
from lwjax.passes.partition import partition_layers as partition_layers
from lwjax.report import ModelReport as ModelReport

__version__ = "0.1.0"
