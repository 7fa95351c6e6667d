"""Methods: one file per method (or tight family), each a config dataclass plus its math.

Importing this package registers every method: each module in it is imported, and its
``@register`` decorators fill the registry.
"""

import importlib
import pkgutil

from .adalora import AdaLoraConfig
from .adapter import AdapterConfig, houlsby, parallel_adapter, pfeiffer
from .compacter import CompacterConfig
from .data_lora import CordaConfig, LoraGAConfig
from .dora import DoraConfig
from .dylora import DyLoraConfig
from .dynamic_rank import DynamicRankConfig
from .hut import HUTConfig
from .ia3 import IA3Config
from .increlora import IncreLoraConfig
from .intrinsic import IntrinsicConfig
from .layerwise import FullConfig, HftConfig, LisaConfig
from .lora import LoraConfig, LoraDelta
from .lora_sb import LoraSBConfig
from .prefix import PrefixConfig
from .prompt import PromptConfig
from .selective import BitFitConfig, LNTuningConfig
from .side import LSTConfig, QSTConfig
from .sparse import SparseConfig
from .ssf import SSFConfig
from .svd import LoraXSConfig, SVFitConfig
from .vera import VeraConfig

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["AdaLoraConfig", "AdapterConfig", "BitFitConfig", "CompacterConfig", "CordaConfig",
           "DoraConfig", "DyLoraConfig", "DynamicRankConfig", "FullConfig", "HUTConfig",
           "HftConfig", "IA3Config", "IncreLoraConfig", "IntrinsicConfig", "LNTuningConfig",
           "LSTConfig", "LisaConfig", "LoraConfig", "LoraDelta", "LoraGAConfig", "LoraSBConfig",
           "LoraXSConfig", "PrefixConfig", "PromptConfig", "QSTConfig", "SSFConfig", "SVFitConfig",
           "SparseConfig", "VeraConfig", "houlsby", "parallel_adapter", "pfeiffer"]
