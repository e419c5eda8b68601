"""greg_fast: growing-regularization pruning (GReg-1 / GReg-2) for PyTorch convnets."""
from . import models
from .compaction import compact, output_change
from .io import load, save
from .weights import load_weights
from .backend import backends
from .masks import apply_masks
from .engine import GrowingReg
from .schedule import PHASES
from .hyper import METHODS, Hyper
from .capture import UntraceableModelError
from .plan import plan, stage_ratios
from .result import Plan
from .units import GRANULARITIES, LayerPlan, n_prune_for

__version__ = "0.1.0"
__all__ = ["compact", "output_change", "load", "load_weights", "save", "GRANULARITIES", "METHODS", "PHASES", "GrowingReg", "Hyper", "LayerPlan", "Plan", "UntraceableModelError",
           "apply_masks", "backends", "models", "n_prune_for", "plan", "stage_ratios", "__version__"]
