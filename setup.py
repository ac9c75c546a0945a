"""Install with `pip install -e ".[dev]"`.

torch/torchvision come from the package registry (the CUDA build also runs on CPU); DeepSpeed is
installed from source with no ops precompiled, so it JIT-builds only what a run needs.
"""
from setuptools import find_packages, setup

setup(
    name="cliplite_dist",
    version="0.1.0",
    description="Distributed CLIP-Lite and InfoNCE training on DeepSpeed over streamed webdataset shards",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cliplite_dist", "cliplite_dist.*"]),
    package_data={"cliplite_dist": ["model_configs/*.json"]},
    install_requires=[
        "torch>=2.4",  # fused AdamW built over parameters still on the CPU (engine.build_optimizer)
        "torchvision",
        "open_clip_torch>=3.0",
        "deepspeed>=0.16",
        "fsspec",
        "aiohttp",  # fsspec's http(s):// shards
        "s3fs>=2024.2",  # s3:// shards and run directories (older ones predate fsspec's async API)
        "braceexpand",
        "tensorboard",
        "submitit>=1.5",
        "pyyaml",
        "pillow",
        "simplejpeg>=1.7",  # libjpeg-turbo decoding into a given buffer (cliplite_dist/data/jpeg.py)
        "numpy",
        "safetensors",
    ],
    extras_require={
        "gcs": ["gcsfs"],  # gs:// shards and run directories
        # loopback S3 and GCS servers; webdataset as the reference reader and writer of the format
        "dev": ["pytest>=8", "pytest-timeout", "matplotlib", "moto[server]", "gcsfs", "gcp-storage-emulator",
                "webdataset>=1.0"],
    },
    entry_points={
        "console_scripts": [
            "cliplite-train=cliplite_dist.cli:train_main",
            "cliplite-synth=cliplite_dist.cli:synth_main",
            "cliplite-submit=cliplite_dist.cli:submit_main",
            "cliplite-status=cliplite_dist.cli:status_main",
            "cliplite-export=cliplite_dist.cli:export_main",
            "cliplite-eval=cliplite_dist.cli:eval_main",
            "cliplite-prep=cliplite_dist.cli:prep_main",
        ]
    },
)
