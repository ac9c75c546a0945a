"""A learnable synthetic image-caption corpus, written as webdataset shards.

Random pixels teach a contrastive model nothing, so each image is a rendered scene (a grey
background and one or two coloured shapes) and its captions are paraphrases that describe that
scene compositionally: shape, colour, size, and position or spatial relation. Retrieval on a
held-out split then measures whether the model learned those attributes.

Every sample is drawn from its own RNG seeded by (seed, split, index), so a corpus is
byte-identical for the same arguments, independent of shard size, and splits draw independent
scenes. Shards follow the img2dataset layout (`key.jpg`, `key.txt`, `key.json`) with a
`sizes.json` sidecar of per-shard counts, which the shard reader uses for epoch lengths.

Evaluation sets from the same world (write_classification_set, write_multilabel_set,
write_retrieval_set) use CLIP_benchmark's webdataset layout (`DIR/{split}/0.tar ..`,
`nshards.txt`, `classnames.txt`, `zeroshot_classification_templates.txt`, `dataset_type.txt`)
and draw from RNG streams no training split can name, so they never repeat a training scene's
draws.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pathlib
import re

import numpy as np
from PIL import Image, ImageDraw

from cliplite_dist.data.tarfiles import SIZES_NAME, write_sizes, write_tar, write_text

# Named colours, chosen far apart in RGB and away from the grey backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 20),
    "green": (30, 160, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 50, 200),
    "pink": (255, 105, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "star")
SIZES: dict[str, float] = {"small": 0.11, "large": 0.18}  # bounding radius / image size
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # objects[0] vs objects[1]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the top part"),
    "bottom": ("at the bottom", "near the bottom", "in the bottom part"),
    "center": ("in the center", "at the center", "centered"),
}
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# "... with X {phrase}": where X lies relative to the object that "its"/"it" refers to.
ITS_PHRASES = {
    "left of": ("to its left", "on its left"),
    "right of": ("to its right", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it"),
}
SINGLE_TEMPLATES = (
    "a {a} {where}",
    "{where}, a {a}",
    "one {a} {where}",
    "a single {a}, {where}",
    "there is a {a} {where}",
)
# {a} is objects[0], {b} objects[1]; {rel} says where a is relative to b, {inv} the converse.
PAIR_TEMPLATES = (
    "a {a} {rel} a {b}",
    "a {b} {inv} a {a}",
    "a {a} with a {b} {b_its}",
    "a {b} with a {a} {a_its}",
    "{a}, {b} {b_its}",
    "two shapes: a {a} {rel} a {b}",
    "there is a {b} {inv} a {a}",
)
NUM_CAPTIONS = 4
PAIR_PROBABILITY = 0.8  # pairs give ~18k distinct scenes, singles only 480

_SUPERSAMPLE = 4  # draw shapes at 4x and box-downsample: clean anti-aliased edges at 64 px
_MARGIN = 0.03  # minimum gap between an object and the image border, as a fraction of the size
_SPLIT_RE = re.compile(r"[a-z0-9_]+")


def _regular(n: int, radius: float, start_deg: float = -90.0) -> list[tuple[float, float]]:
    step = 2 * math.pi / n
    return [(radius * math.cos(math.radians(start_deg) + i * step),
             radius * math.sin(math.radians(start_deg) + i * step)) for i in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5, 1.0), _regular(5, 0.45, -90.0 + 36.0)
    return [p for pair in zip(outer, inner) for p in pair]


def _cross(w: float = 0.33) -> list[tuple[float, float]]:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
            (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


# Unit outlines (bounding radius 1, centroid at the origin, so the centre pixel is inside).
_OUTLINES = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _regular(3, 1.0),
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "cross": _cross(),
    "star": _star(),
}


def _pick(rng: np.random.Generator, options):
    """One element of a sequence (numpy's choice() would turn strings into np.str_)."""
    return options[int(rng.integers(len(options)))]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light or dark grey, plain or a gradient, slightly tinted, with mild grain."""
    low, high = (150, 215) if rng.random() < 0.5 else (20, 80)
    start = rng.uniform(low, high)
    if rng.random() < 0.5:
        end = float(np.clip(start + rng.uniform(-40, 40), low, high))
        angle = rng.uniform(0, 2 * math.pi)
        grid = np.linspace(-0.5, 0.5, size)
        ramp = math.cos(angle) * grid[None, :] + math.sin(angle) * grid[:, None]
        tone = start + (end - start) * (ramp - ramp.min()) / (np.ptp(ramp) or 1.0)
    else:
        tone = np.full((size, size), start)
    tint = rng.uniform(-8, 8, 3)
    grain = rng.normal(0.0, rng.uniform(2, 7), (size, size, 1))
    return np.clip(tone[:, :, None] + tint + grain, 0, 255).astype(np.uint8)


def _make_object(rng: np.random.Generator, taken: tuple[str, str] | None = None) -> dict:
    """Random shape/colour/size; never the same shape and colour as `taken` (no ambiguous pair)."""
    while True:
        shape, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
        if (shape, colour) != taken:
            return {"shape": shape, "colour": colour, "size": _pick(rng, tuple(SIZES))}


def _place_single(rng: np.random.Generator, position: str, r: float) -> tuple[float, float]:
    """Centre (fractions of the image) for a lone object at a named position, jittered."""
    along, across = 0.25 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.08, 0.08)
    x, y = {"left": (along, across), "right": (1 - along, across), "top": (across, along),
            "bottom": (across, 1 - along),
            "center": (0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05))}[position]
    lo, hi = r + _MARGIN, 1 - r - _MARGIN
    return float(np.clip(x, lo, hi)), float(np.clip(y, lo, hi))


def _place_pair(rng: np.random.Generator, relation: str, r_a: float, r_b: float):
    """Centres of a and b so that `a relation b` is unambiguous and the shapes never touch.

    The separation along the relation's axis exceeds both radii plus a gap; the offset across it
    stays under 0.35 of that separation, so the direction is within ~20 degrees of the axis.
    """
    a_first = relation in ("left of", "above")
    r1, r2 = (r_a, r_b) if a_first else (r_b, r_a)
    lo = r1 + r2 + 0.08
    dist = rng.uniform(lo, max(lo, 1 - r1 - r2 - 2 * _MARGIN))
    mid = rng.uniform(r1 + _MARGIN + dist / 2, 1 - r2 - _MARGIN - dist / 2)
    offset, cross_mid = rng.uniform(-0.35, 0.35) * dist, rng.uniform(0.35, 0.65)
    along = (mid - dist / 2, mid + dist / 2)
    across = (float(np.clip(cross_mid - offset / 2, r1 + _MARGIN, 1 - r1 - _MARGIN)),
              float(np.clip(cross_mid + offset / 2, r2 + _MARGIN, 1 - r2 - _MARGIN)))
    first, second = ((along[0], across[0]), (along[1], across[1]))
    if relation in ("above", "below"):
        first, second = first[::-1], second[::-1]
    return (first, second) if a_first else (second, first)


def _draw(canvas: ImageDraw.ImageDraw, rng: np.random.Generator, obj: dict, image_size: int):
    """Draw one object, centred on pixel (x, y), in its colour with a little jitter."""
    k = _SUPERSAMPLE
    cx, cy = (obj["x"] + 0.5) * k, (obj["y"] + 0.5) * k
    r = SIZES[obj["size"]] * image_size * k
    jittered = np.clip(np.add(COLOURS[obj["colour"]], rng.integers(-8, 9, 3)), 0, 255)
    fill = tuple(int(c) for c in jittered)
    if obj["shape"] == "circle":
        canvas.ellipse((cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r), fill=fill)
    else:
        outline = [(cx + r * px, cy + r * py) for px, py in _OUTLINES[obj["shape"]]]
        canvas.polygon(outline, fill=fill)


def render_scene(rng: np.random.Generator, image_size: int = 64) -> tuple[Image.Image, dict]:
    """Render a random scene; returns the RGB image and its description.

    The description is {"objects": [{"shape", "colour", "size", "x", "y"}, ...], "relation":
    where objects[0] is relative to objects[1] (or None), "position": where a lone object is (or
    None)}; x, y are the integer pixel coordinates of each object's centre.
    """
    return _render(rng, image_size)


def _render(rng: np.random.Generator, image_size: int,
            pair: bool | None = None) -> tuple[Image.Image, dict]:
    """render_scene, optionally forcing a pair (True) or a lone object (False) instead of drawing
    the choice; with pair=None the RNG draws are exactly render_scene's."""
    first = _make_object(rng)
    if pair is None:
        pair = rng.random() < PAIR_PROBABILITY
    if pair:
        objects = [first, _make_object(rng, taken=(first["shape"], first["colour"]))]
        relation, position = _pick(rng, RELATIONS), None
        centres = _place_pair(rng, relation, *(SIZES[o["size"]] for o in objects))
    else:
        objects, relation, position = [first], None, _pick(rng, POSITIONS)
        centres = [_place_single(rng, position, SIZES[first["size"]])]
    for obj, (x, y) in zip(objects, centres):
        obj["x"] = min(int(x * image_size), image_size - 1)
        obj["y"] = min(int(y * image_size), image_size - 1)
    big = _SUPERSAMPLE * image_size
    image = Image.fromarray(_background(rng, image_size)).resize((big, big), Image.NEAREST)
    canvas = ImageDraw.Draw(image)
    for obj in objects:
        _draw(canvas, rng, obj, image_size)
    image = image.resize((image_size, image_size), Image.BOX)
    return image, {"objects": objects, "relation": relation, "position": position}


def _phrase(rng: np.random.Generator, obj: dict) -> str:
    return f"{_pick(rng, SIZE_WORDS[obj['size']])} {obj['colour']} {obj['shape']}"


def _fill(template: str, scene: dict, rng: np.random.Generator) -> str:
    objects = scene["objects"]
    if scene["relation"] is None:
        where = _pick(rng, POSITION_PHRASES[scene["position"]])
        return template.format(a=_phrase(rng, objects[0]), where=where)
    rel, inv = scene["relation"], INVERSE[scene["relation"]]
    return template.format(
        a=_phrase(rng, objects[0]), b=_phrase(rng, objects[1]),
        rel=_pick(rng, RELATION_PHRASES[rel]), inv=_pick(rng, RELATION_PHRASES[inv]),
        a_its=_pick(rng, ITS_PHRASES[rel]), b_its=_pick(rng, ITS_PHRASES[inv]))


def captions_for(scene: dict, rng: np.random.Generator, count: int = NUM_CAPTIONS) -> list[str]:
    """`count` paraphrases of the scene, each from a different template, in random order."""
    templates = PAIR_TEMPLATES if scene["relation"] is not None else SINGLE_TEMPLATES
    order = rng.permutation(len(templates))[:count]
    return [_fill(templates[i], scene, rng) for i in order]


def _split_id(split: str) -> int:
    """A stable 64-bit id for a split name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:8], "little")


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The RNG for one sample: independent across (seed, split, index), same in every process."""
    return np.random.default_rng([seed, _split_id(split), index])


def make_sample(seed: int, split: str, index: int, image_size: int = 64) -> dict:
    """One webdataset sample: {"__key__", "jpg", "txt", "json"} with bytes values but the key."""
    rng = sample_rng(seed, split, index)
    image, scene = render_scene(rng, image_size)
    captions = captions_for(scene, rng)
    key = f"{split}{index:09d}"
    meta = {"captions": captions, **scene, "key": key}
    return {"__key__": key, "jpg": _jpeg(image), "txt": captions[0].encode("utf-8"),
            "json": _json_bytes(meta)}


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, subsampling=0)  # 4:4:4 keeps small shapes' colours true
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def _write_shard(path: pathlib.Path, indices: range, seed: int, split: str,
                 image_size: int) -> None:
    write_tar(path, (make_sample(seed, split, index, image_size) for index in indices))


def _own_shard_re(split: str) -> re.Pattern:
    return re.compile(rf"{re.escape(split)}-\d{{5}}\.tar")


def _update_sizes(out_dir: pathlib.Path, split: str, counts: dict[str, int]) -> None:
    """Merge this split's counts into sizes.json, atomically (readers may be polling it).

    Entries of other splits are kept; entries of this split that this run did not write (from an
    earlier, larger run) are dropped, so the sidecar describes exactly the current shards.
    """
    sizes_path = out_dir / SIZES_NAME
    sizes = json.loads(sizes_path.read_text(encoding="utf-8")) if sizes_path.exists() else {}
    if not isinstance(sizes, dict):
        raise ValueError(f"{sizes_path} is not a JSON object of shard name -> count")
    own = _own_shard_re(split)
    merged = {name: n for name, n in sizes.items() if not own.fullmatch(name)}
    merged.update(counts)
    write_sizes(out_dir, merged)


def _remove_stale_shards(out_dir: pathlib.Path, split: str, written: dict[str, int]) -> None:
    """Delete this split's shards from an earlier, larger run, so a glob matches only this one."""
    own = _own_shard_re(split)
    for path in out_dir.glob(f"{split}-*.tar"):
        if own.fullmatch(path.name) and path.name not in written:
            path.unlink()


def _validate(num_samples, split, shard_size, image_size, seed) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not is_int(shard_size) or shard_size < 1:
        raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if not is_int(image_size) or image_size < 32:
        raise ValueError(
            f"image_size must be an integer >= 32 (shapes get unreadable below), got {image_size!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(split, str) or not _SPLIT_RE.fullmatch(split):
        raise ValueError(f"split must be a name of [a-z0-9_] characters, got {split!r}")


def write_corpus(out_dir, num_samples: int, *, split: str = "train", shard_size: int = 1000,
                 image_size: int = 64, seed: int = 0) -> list[pathlib.Path]:
    """Write `num_samples` samples to `out_dir/{split}-{NNNNN}.tar`; return the shard paths.

    Also merges the shard counts into `out_dir/sizes.json` and removes shards of this split left
    over from an earlier, larger run, so a glob of the split matches what was just written.
    """
    _validate(num_samples, split, shard_size, image_size, seed)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, counts = [], {}
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        indices = range(start, min(start + shard_size, num_samples))
        path = out / f"{split}-{shard:05d}.tar"
        _write_shard(path, indices, seed, split, image_size)
        paths.append(path)
        counts[path.name] = len(indices)
    _update_sizes(out, split, counts)
    _remove_stale_shards(out, split, counts)
    return paths


SYNTHETIC_SPLITS = (("train", "train_samples"), ("heldout", "eval_samples"))


def _split_complete(out: pathlib.Path, split: str, num_samples: int) -> bool:
    sizes_path = out / "sizes.json"
    if not sizes_path.exists():
        return False
    own = _own_shard_re(split)
    counts = {n: c for n, c in json.loads(sizes_path.read_text(encoding="utf-8")).items() if own.fullmatch(n)}
    return sum(counts.values()) == num_samples and all((out / n).exists() for n in counts)


def ensure_split(out_dir, num_samples: int, *, split: str, shard_size: int, image_size: int, seed: int) -> None:
    """`write_corpus` unless `out_dir` already holds the `num_samples` of this split."""
    out = pathlib.Path(out_dir)
    if not _split_complete(out, split, num_samples):
        write_corpus(out, num_samples, split=split, shard_size=shard_size, image_size=image_size, seed=seed)


def ensure_corpus(cfg) -> None:
    """Write the recipe's synthetic corpus (a `SyntheticConfig`) unless it is already complete:
    `{dir}/train/` and `{dir}/heldout/` (each split a directory of shards) and, when
    `classes_test_samples` > 0, `{dir}/classes/`: a zero-shot / linear-probe set in CLIP_benchmark's
    layout (test split, plus a train split of `classes_train_samples` for the probe). Call it on
    one rank only; the others wait at a barrier."""
    if cfg.train_samples <= 0:
        return
    for split, field in SYNTHETIC_SPLITS:
        if getattr(cfg, field) > 0:
            ensure_split(pathlib.Path(cfg.dir) / split, getattr(cfg, field), split=split, shard_size=cfg.shard_size,
                         image_size=cfg.image_size, seed=cfg.seed)
    classes = pathlib.Path(cfg.dir) / "classes"
    for split, num_samples in (("test", cfg.classes_test_samples), ("train", cfg.classes_train_samples)):
        nshards = classes / split / "nshards.txt"
        expected = str(-(-num_samples // cfg.shard_size))
        if num_samples > 0 and not (nshards.exists() and nshards.read_text().strip() == expected):
            write_classification_set(classes, num_samples, split=split, seed=cfg.seed,
                                     image_size=cfg.image_size, shard_size=cfg.shard_size)


# ---------------------------------------------------------------------------------------------
# Evaluation sets in CLIP_benchmark's webdataset layout:
#   DIR/classnames.txt, DIR/zeroshot_classification_templates.txt (classification kinds),
#   DIR/dataset_type.txt ("multilabel" / "retrieval"; absent for single-label classification),
#   DIR/{split}/nshards.txt and DIR/{split}/0.tar, 1.tar, ...
# Every sample also carries KEY.json: the scene (objects with their pixel centres) and its label.
# ---------------------------------------------------------------------------------------------

# Class index = colour index * len(SHAPES) + shape index.
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# Multi-label set: one label per colour, then one per shape, set when the scene has it.
LABEL_NAMES: tuple[str, ...] = (*COLOURS, *SHAPES)
# Phrased like the training captions (size word first, so "orange" never follows a bare "a").
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "one {c}.",
    "a small {c}.",
    "a large {c}.",
    "a small or large {c}.",
    "there is one {c}.",
    "a picture of one {c}.",
    "one {c} on a grey background.",
)
EVAL_KINDS: tuple[str, ...] = ("classification", "multilabel", "retrieval")
_SHARD_NAME_RE = re.compile(r"\d+\.tar")


def class_index(colour: str, shape: str) -> int:
    """The classification set's label for a `colour shape` object."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def eval_stream(kind: str, split: str) -> str:
    """The RNG stream name of an evaluation set's split. It contains '/', which training split
    names ([a-z0-9_]+) cannot, so evaluation scenes are never drawn from a training stream."""
    return f"eval/{kind}/{split}"


def make_eval_sample(kind: str, seed: int, split: str, index: int, image_size: int = 64) -> dict:
    """One evaluation sample: {"__key__", "jpg", <label>, "json"}, bytes values but the key.

    classification: "cls" (the class index as ASCII), a lone object; multilabel: "npy" (uint8
    multi-hot over LABEL_NAMES: the colours and shapes present, numpy.save format), one or two objects; retrieval: "txt" (all the
    scene's captions, one per line), one or two objects. "json" holds the scene and the label.
    """
    if kind not in EVAL_KINDS:
        raise ValueError(f"kind must be one of {EVAL_KINDS}, got {kind!r}")
    rng = sample_rng(seed, eval_stream(kind, split), index)
    image, scene = _render(rng, image_size, pair=False if kind == "classification" else None)
    key = f"{split}{index:09d}"
    meta = {**scene, "key": key}
    sample = {"__key__": key, "jpg": _jpeg(image)}
    if kind == "classification":
        (obj,) = scene["objects"]
        meta["label"] = label = class_index(obj["colour"], obj["shape"])
        sample["cls"] = str(label).encode("ascii")
    elif kind == "multilabel":
        present = {obj[attr] for obj in scene["objects"] for attr in ("colour", "shape")}
        labels = np.array([name in present for name in LABEL_NAMES], dtype=np.uint8)
        meta["labels"] = labels.tolist()
        buf = io.BytesIO()
        np.save(buf, labels, allow_pickle=False)
        sample["npy"] = buf.getvalue()
    else:
        meta["captions"] = captions = captions_for(scene, rng)
        sample["txt"] = "\n".join(captions).encode("utf-8")
    sample["json"] = _json_bytes(meta)
    return sample


def _layout_kind(root: pathlib.Path) -> str | None:
    """The kind of evaluation set already in `root`, from its metadata files, or None."""
    type_path = root / "dataset_type.txt"
    if type_path.exists():
        return type_path.read_text(encoding="utf-8").strip().lower()
    return "classification" if (root / "classnames.txt").exists() else None


def _write_eval_set(kind: str, out_dir, num_samples: int, split: str, seed: int,
                    image_size: int, shard_size: int) -> list[pathlib.Path]:
    _validate(num_samples, split, shard_size, image_size, seed)
    root = pathlib.Path(out_dir)
    existing = _layout_kind(root)
    if existing not in (None, kind):
        others = sorted(p.parent.name for p in root.glob("*/nshards.txt") if p.parent.name != split)
        if others:
            raise ValueError(
                f"{root} already holds a {existing} set (splits {others}); write the {kind} set "
                "to its own directory")
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)

    labelled = kind != "retrieval"
    meta_files = {"classnames.txt": labelled, "zeroshot_classification_templates.txt": labelled,
                  "dataset_type.txt": kind != "classification"}
    for name, wanted in meta_files.items():
        if not wanted:  # left by an earlier set of another kind in this directory
            (root / name).unlink(missing_ok=True)
    if labelled:
        names = CLASS_NAMES if kind == "classification" else LABEL_NAMES
        write_text(root / "classnames.txt", "".join(f"{n}\n" for n in names))
        write_text(root / "zeroshot_classification_templates.txt",
                   "".join(f"{t}\n" for t in ZEROSHOT_TEMPLATES))
    if kind != "classification":
        write_text(root / "dataset_type.txt", f"{kind}\n")

    paths = []
    for shard, start in enumerate(range(0, num_samples, shard_size)):
        path = split_dir / f"{shard}.tar"
        indices = range(start, min(start + shard_size, num_samples))
        write_tar(path, (make_eval_sample(kind, seed, split, i, image_size) for i in indices))
        paths.append(path)
    write_text(split_dir / "nshards.txt", f"{len(paths)}\n")
    written = {p.name for p in paths}
    for path in split_dir.glob("*.tar"):  # shards of an earlier, larger run
        if _SHARD_NAME_RE.fullmatch(path.name) and path.name not in written:
            path.unlink()
    return paths


def write_classification_set(out_dir, num_samples: int, *, split: str = "test", seed: int = 0,
                             image_size: int = 64, shard_size: int = 1000) -> list[pathlib.Path]:
    """Single-object scenes labelled with the object's "colour shape" (CLASS_NAMES; index =
    colour index * len(SHAPES) + shape index), size and position varying. Writes
    `out_dir/{split}/{0,1,...}.tar` + `nshards.txt`, and (re)writes `classnames.txt` and
    `zeroshot_classification_templates.txt`; returns the shard paths."""
    return _write_eval_set("classification", out_dir, num_samples, split, seed, image_size,
                           shard_size)


def write_multilabel_set(out_dir, num_samples: int, *, split: str = "test", seed: int = 0,
                         image_size: int = 64, shard_size: int = 1000) -> list[pathlib.Path]:
    """One- or two-object scenes labelled with a multi-hot uint8 vector over LABEL_NAMES, every
    colour and shape present (KEY.npy); classnames.txt lists LABEL_NAMES; dataset_type.txt is
    "multilabel". Returns the shard paths."""
    return _write_eval_set("multilabel", out_dir, num_samples, split, seed, image_size,
                           shard_size)


def write_retrieval_set(out_dir, num_samples: int, *, split: str = "test", seed: int = 0,
                        image_size: int = 64, shard_size: int = 1000) -> list[pathlib.Path]:
    """Scenes drawn as the training corpus draws them; KEY.txt holds all their captions, one per
    line; dataset_type.txt is "retrieval". Returns the shard paths."""
    return _write_eval_set("retrieval", out_dir, num_samples, split, seed, image_size,
                           shard_size)
