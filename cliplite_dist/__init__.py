"""cliplite_dist: distributed CLIP-Lite and InfoNCE training on DeepSpeed over webdataset shards."""

__version__ = "0.1.0"
