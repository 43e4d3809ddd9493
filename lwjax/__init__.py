"""lwjax: cache-aware layer-wise deployment of Flax models.

The public surface re-exports only; code lives in small modules under ``lwjax``,
``lwjax.models`` and ``lwjax.passes``.
"""

from lwjax import baselines as baselines
from lwjax import distributed as distributed
from lwjax import errors as errors
from lwjax import hardware as hardware
from lwjax import models as models
from lwjax._api import analyze as analyze
from lwjax._api import layerwise_shard as layerwise_shard
from lwjax._api import plan as plan
from lwjax.causal_lm import CausalLM as CausalLM
from lwjax.causal_lm import causal_lm as causal_lm
from lwjax.generate import Generator as Generator
from lwjax.generate import layerwise_generate as layerwise_generate
from lwjax.passes.compression import Compression as Compression
from lwjax.passes.footprint import Footprint as Footprint
from lwjax.passes.partition import partition_layers as partition_layers
from lwjax.plan import Plan as Plan
from lwjax.plan import Stage as Stage
from lwjax.report import ModelReport as ModelReport
from lwjax.sharded import ShardedModel as ShardedModel

__version__ = "0.1.0"
