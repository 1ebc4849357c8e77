"""Backbone zoo and the feature-tap mechanism."""
from .taps import (FeatureTap, batchnorm_layers, blocks, forward_until, get_head, load_parts, out_channels,
                   part_modules, resolve_tap_points, set_head)
from .zoo import BACKBONES, SegmentationNet, build_backbone

__all__ = ["BACKBONES", "FeatureTap", "SegmentationNet", "batchnorm_layers", "blocks", "build_backbone", "forward_until",
           "get_head", "load_parts", "out_channels", "part_modules", "resolve_tap_points", "set_head"]
