"""Console entry points: parse, build the config, call the right function. Nothing else lives here."""
from __future__ import annotations

import argparse
import sys

from cliplite_dist.config import ConfigError, load_config


def train_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cliplite-train",
        description="Train CLIP-Lite or InfoNCE from a recipe; the same command runs alone, under "
                    "torchrun and under srun, and resumes from the newest checkpoint of its run.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. objective.name=infonce data.batch_size=256 engine.zero_stage=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        parser.exit(2, f"cliplite-train: error: {exc}\n")
    from cliplite_dist.trainer import train  # heavy imports only once the config is valid

    sys.exit(train(cfg))


def synth_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cliplite-synth",
        description="Write a learnable synthetic caption corpus (rendered scenes, compositional "
                    "captions) as webdataset shards.")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from cliplite_dist.data.synthetic import write_corpus

    try:
        paths = write_corpus(args.out, args.samples, split=args.split, shard_size=args.shard_size,
                             image_size=args.image_size, seed=args.seed)
    except ValueError as exc:
        parser.exit(2, f"cliplite-synth: error: {exc}\n")
    print(f"wrote {args.samples} samples in {len(paths)} shard(s) under {args.out}")
