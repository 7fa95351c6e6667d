"""deltatune: parameter-efficient fine-tuning ("delta tuning") for PyTorch models.

    import deltatune as dt

    model = dt.inject(model, dt.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]),
                      name="sst2")
    dt.summary(model)
    dt.save(model, "out/sst2", name="sst2")
"""

__version__ = "0.1.0"

# Load (and so register) every method first: importing the `methods` subpackage binds the name
# `methods` in this namespace, and the function `methods()` imported below must win.
from . import decoding, merging, optim, quant, recipes
from . import methods as _methods_package  # noqa: F401
from .core.accounting import Cost, Summary, cost, summary
from .core.config import DeltaConfig, config_from_dict
from .core.delta import Delta
from .core.errors import (
    AdapterFileError,
    AdapterNameError,
    ConfigError,
    DeltaError,
    MergeError,
    ShapeMismatchError,
    StateError,
    TargetError,
)
from .core.hotswap import hotswap, hotswap_tensors, prepare_hotswap
from .core.inject import inject
from .core.lifecycle import (
    activate,
    active_adapters,
    adapters,
    delete,
    disabled,
    merge,
    merged_adapters,
    unload,
    unmerge,
)
from .core.per_sample import generate, per_sample
from .core.registry import get_method, methods, register
from .core.schedule import Schedule, Scheduler
from .core.state import load, save
from .core.structures import StructureMap, register_structure
from .methods import (
    AdaLoraConfig,
    AdapterConfig,
    BitFitConfig,
    CompacterConfig,
    CordaConfig,
    DoraConfig,
    DyLoraConfig,
    DynamicRankConfig,
    FullConfig,
    HftConfig,
    HUTConfig,
    IA3Config,
    IncreLoraConfig,
    IntrinsicConfig,
    LisaConfig,
    LNTuningConfig,
    LoraConfig,
    LoraGAConfig,
    LoraSBConfig,
    LoraXSConfig,
    LSTConfig,
    PrefixConfig,
    PromptConfig,
    QSTConfig,
    SparseConfig,
    SSFConfig,
    SVFitConfig,
    VeraConfig,
    houlsby,
    parallel_adapter,
    pfeiffer,
)
from .optim import GaLore
from .train.checkpointing import enable_gradient_checkpointing

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterNameError",
    "BitFitConfig",
    "CompacterConfig",
    "ConfigError",
    "CordaConfig",
    "Cost",
    "Delta",
    "DeltaConfig",
    "DeltaError",
    "DoraConfig",
    "DyLoraConfig",
    "DynamicRankConfig",
    "FullConfig",
    "GaLore",
    "HUTConfig",
    "HftConfig",
    "IA3Config",
    "IncreLoraConfig",
    "IntrinsicConfig",
    "LNTuningConfig",
    "LSTConfig",
    "LisaConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraSBConfig",
    "LoraXSConfig",
    "MergeError",
    "PrefixConfig",
    "PromptConfig",
    "QSTConfig",
    "SSFConfig",
    "SVFitConfig",
    "Schedule",
    "Scheduler",
    "ShapeMismatchError",
    "SparseConfig",
    "StateError",
    "StructureMap",
    "Summary",
    "TargetError",
    "VeraConfig",
    "__version__",
    "activate",
    "active_adapters",
    "adapters",
    "config_from_dict",
    "cost",
    "decoding",
    "delete",
    "disabled",
    "enable_gradient_checkpointing",
    "generate",
    "get_method",
    "hotswap",
    "hotswap_tensors",
    "houlsby",
    "inject",
    "load",
    "merge",
    "merged_adapters",
    "merging",
    "methods",
    "optim",
    "parallel_adapter",
    "per_sample",
    "pfeiffer",
    "prepare_hotswap",
    "quant",
    "recipes",
    "register",
    "register_structure",
    "save",
    "summary",
    "unload",
    "unmerge",
]
