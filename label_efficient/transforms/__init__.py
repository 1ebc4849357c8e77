"""Image transforms (augmentations and filters) used by the label-efficient strategies."""
