"""largebatch: LAMB and LARS exactly as the paper defines them, and the large-batch training recipe.

The optimizers need torch alone; training, tasks, studies and reports come with ``largebatch[train]``.
"""
from .optim import (
    PRESETS,
    Lamb,
    Lars,
    Preset,
    StepInBackward,
    create_optimizer,
    describe_groups,
    get_preset,
    param_groups,
    step_in_backward,
    trust_ratio,
)

__version__ = "0.1.0"
__all__ = ["Lamb", "Lars", "create_optimizer", "param_groups", "describe_groups", "PRESETS", "Preset",
           "get_preset", "trust_ratio", "step_in_backward", "StepInBackward", "__version__"]
