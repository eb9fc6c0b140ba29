"""hybridft: hybrid fine-tuning. Distil a fine-tuned teacher into a small student with
alpha * KD + beta * CE, from stored teacher outputs."""

from hybridft.config import RunConfig, load_config
from hybridft.errors import HybridFTError
from hybridft.losses import LossParts, LossWeights, SparseTargets, hybrid_loss, kd_loss
from hybridft.teacher_outputs import read_store, write_store, write_token_store

__version__ = "0.1.0"

__all__ = [
    "HybridFTError",
    "HybridModel",
    "LossParts",
    "LossWeights",
    "RunConfig",
    "SparseTargets",
    "hybrid_loss",
    "kd_loss",
    "load_config",
    "read_store",
    "write_store",
    "write_token_store",
]


def __getattr__(name: str):
    # `from hybridft import HybridModel`, imported on first use: it brings in transformers, which the loss
    # functions above do not need
    if name == "HybridModel":
        from hybridft.hybrid import HybridModel

        return HybridModel
    raise AttributeError(f"module 'hybridft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"HybridModel"})
