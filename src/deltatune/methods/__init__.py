"""Methods: one file per method (or tight family), each a config dataclass plus its math.

Importing this package registers every method.
"""

from .lora import LoraConfig, LoraDelta

__all__ = ["LoraConfig", "LoraDelta"]
