"""Tiny real webdataset shards for tests: solid-colour JPEGs with captions naming the colour."""
from __future__ import annotations

import io
import json
from pathlib import Path

import webdataset as wds
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def jpeg(rgb, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(directory: Path, num_shards: int, per_shard: int, prefix: str = "shard",
                 sizes: bool = True) -> list[str]:
    """Shards `prefix-00000.tar`...; sample keys are `{prefix}{shard}_{i}`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    names, paths = list(COLOURS), []
    for shard in range(num_shards):
        path = directory / f"{prefix}-{shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                colour = names[(shard * per_shard + i) % len(names)]
                sink.write({"__key__": f"{prefix}{shard}_{i}", "jpg": jpeg(COLOURS[colour]),
                            "txt": f"a {colour} square",
                            "json": json.dumps({"captions": [f"a {colour} square", f"{colour}"]})})
        paths.append(str(path))
    if sizes:
        (directory / "sizes.json").write_text(json.dumps({Path(p).name: per_shard for p in paths}))
    return paths
