"""Networks of the strategies that are not segmentation backbones (GAN generators and discriminators); the
backbones are in ``label_efficient.backbones``."""
from .gan import MaskGenerator, PatchDiscriminator, VAEDiscriminator
from .slice_transformer import SliceAttention, SliceDiscriminator, SliceGenerator

__all__ = ["MaskGenerator", "PatchDiscriminator", "SliceAttention", "SliceDiscriminator", "SliceGenerator",
           "VAEDiscriminator"]
