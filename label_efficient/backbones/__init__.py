"""Backbone zoo and the feature-tap mechanism."""
from .taps import FeatureTap, batchnorm_layers, get_head, resolve_tap_points, set_head
from .zoo import BACKBONES, SegmentationNet, build_backbone

__all__ = ["BACKBONES", "FeatureTap", "SegmentationNet", "batchnorm_layers", "build_backbone", "get_head",
           "resolve_tap_points", "set_head"]
