"""Structured compression of causal LMs: the shared base, the layer-by-layer engine and the methods.

Importing this package imports every compressor module, and each registers itself with the method registry
(:func:`leanfm.config.register_method`, family ``compress``): ``modegpt``, ``wanda-sp`` (an ablation), ``svd-llm``,
``flap``, ``disp``, ``slicegpt``.
The compressed-checkpoint classes live in :mod:`leanfm.models.compressed`.
"""

# import order = registration order = the order in which errors and `leanfm compress --help` list the methods
# isort: off
from leanfm.compress import modegpt  # noqa: F401
from leanfm.compress import modegpt_heads  # noqa: F401
from leanfm.compress import baselines  # noqa: F401
from leanfm.compress import flap  # noqa: F401
from leanfm.compress import disp  # noqa: F401
from leanfm.compress import slicegpt  # noqa: F401

# isort: on
from leanfm.compress.api import compress_model, save_compressed
from leanfm.compress.base import CompressionReport, LayerwiseConfig, check_architecture
from leanfm.compress.baselines import SvdLlmConfig, WandaSpConfig
from leanfm.compress.disp import DispConfig
from leanfm.compress.flap import FlapConfig
from leanfm.compress.modegpt import ModegptConfig
from leanfm.compress.slicegpt import SliceGptConfig

__all__ = [
    "CompressionReport",
    "DispConfig",
    "FlapConfig",
    "LayerwiseConfig",
    "ModegptConfig",
    "SliceGptConfig",
    "SvdLlmConfig",
    "WandaSpConfig",
    "check_architecture",
    "compress_model",
    "save_compressed",
]
