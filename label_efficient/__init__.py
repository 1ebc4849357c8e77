"""label-efficient: label-efficient training strategies for medical image segmentation."""
from .backbones import FeatureTap, build_backbone
from .data import LabelBudget, build_dataset
from .strategies import STRATEGIES, Strategy, build_strategy

__version__ = "0.1.0"
__all__ = ["STRATEGIES", "FeatureTap", "LabelBudget", "Strategy", "build_backbone", "build_dataset",
           "build_strategy", "__version__"]
