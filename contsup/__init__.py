"""contsup: greedy local learning with context supply (arXiv 2312.07636)."""
from .errors import UsageError
from .model import ContSupNet, ModelConfig
from .wrap import wrap

__all__ = ["ContSupNet", "ModelConfig", "UsageError", "wrap"]
__version__ = "0.1.0"
