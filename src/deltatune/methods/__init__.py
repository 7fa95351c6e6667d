"""Methods: one file per method (or tight family), each a config dataclass plus its math.

Importing this package registers every method: each module in it is imported, and its
``@register`` decorators fill the registry.
"""

import importlib
import pkgutil

from .lora import LoraConfig, LoraDelta

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["LoraConfig", "LoraDelta"]
