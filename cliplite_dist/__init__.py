"""cliplite_dist: distributed CLIP-Lite and InfoNCE training on DeepSpeed over webdataset shards."""

__version__ = "0.1.0"


def load(path):
    """(model, preprocess, tokenizer) of a folder written by `cliplite-export`; see cliplite_dist.export."""
    from cliplite_dist.export import load as load_export  # keeps `import cliplite_dist` light

    return load_export(path)
