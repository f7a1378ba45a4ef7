"""loralab.golore: GaLore and GoLore subspace optimizers, the ReLoRA-style wrapper, Figure 1.

GaLore (Zhao et al., arXiv 2403.03507) trains full weights with optimizer state in a low-rank
gradient subspace refreshed by SVD; GoLore (He et al., arXiv 2410.11289) refreshes it with random
Stiefel projections late in training, which converges with small-batch gradients where GaLore stalls.

Example:
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.golore import create_golore_optimizer
    >>> opt = create_golore_optimizer(tiny_llama(), 1e-3, rank=8, rand_ratio=0.8, total_steps=100)
"""

from loralab.golore.adafactor import GaLoreAdafactor, GoLoreAdafactor
from loralab.golore.adamw8bit import GaLoreAdamW8bit, GoLoreAdamW8bit, optimizer_state_bytes
from loralab.golore.factory import (
    create_galore_optimizer,
    create_golore_optimizer,
    subspace_param_groups,
)
from loralab.golore.layerwise import LayerwiseStepHandle, register_layerwise_step
from loralab.golore.optimizer import (
    GaLoreAdamW,
    GaLoreSGD,
    GoLoreAdamW,
    GoLoreSGD,
    SubspaceOptimizer,
)
from loralab.golore.relora import (
    ReLoRaCallback,
    ReLoRaConfig,
    ReLoRaLinear,
    ReLoRaModel,
    merge_and_reinit,
)
from loralab.golore.subspace import resolve_rand_step

__version__ = "0.1.0"
__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GaLoreSGD",
    "GoLoreAdafactor",
    "GoLoreAdamW",
    "GoLoreAdamW8bit",
    "GoLoreSGD",
    "LayerwiseStepHandle",
    "ReLoRaCallback",
    "ReLoRaConfig",
    "ReLoRaLinear",
    "ReLoRaModel",
    "SubspaceOptimizer",
    "create_galore_optimizer",
    "create_golore_optimizer",
    "merge_and_reinit",
    "optimizer_state_bytes",
    "register_layerwise_step",
    "resolve_rand_step",
    "subspace_param_groups",
]
