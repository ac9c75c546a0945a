"""cliplite_dist: distributed CLIP-Lite and InfoNCE training on DeepSpeed over webdataset shards."""
import os

__version__ = "0.1.0"

# Large CPU tensors (a loader worker's batch, activations of CPU training) on transparent huge
# pages: faulting in a fresh 47 MB batch buffer took 26 ms without and 5.6 ms with (one fault per
# 2 MB instead of per 4 kB). torch reads this once, at its first large allocation, so it is set
# on import, before any; a value already in the environment (0 to turn it off) is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def load(path):
    """(model, preprocess, tokenizer) of a folder written by `cliplite-export`; see cliplite_dist.export."""
    from cliplite_dist.export import load as load_export  # keeps `import cliplite_dist` light

    return load_export(path)
