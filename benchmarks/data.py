"""Data pipeline samples/s per worker against its ceilings, for PIL and the trainer's decoding
(simplejpeg, libjpeg-turbo; torchvision.io as a reference), with the crop resized in the worker
or left to the training device.

A data-loader worker is one process running one intra-op thread with glibc keeping freed memory
(`pipeline.configure_worker`), so every cell runs in a single process configured the same way,
without DataLoader workers (but for the loader-worker rows): samples/s here is per worker. Rates
are given per CPU-second of that process (a worker with a core to itself; other jobs on a shared
machine do not skew them) and per wall second, with the CPU share between them.
Stages, measured on the same shards:

  read            raw tar read (`iterate_samples`): I/O + tar parsing, the ceiling of them all
  tokenise        captions -> tokens alone, in batches: open_clip's tokenizer vs the trainer's
                  BatchTokenizer (cliplite_dist/data/tokens.py: the same ids)
  decode          JPEG bytes held in memory -> RGB image: PIL vs the trainer's
                  (transforms.decode_uint8: simplejpeg for JPEGs), and torchvision.io.decode_image
  decode+augment  + what a worker applies after decoding: open_clip's transform on PIL images
                  (crop, to float, normalise) vs the trainer's: the same crop in transforms.v2 on
                  uint8 tensors (cliplite_dist/data/transforms.py; the trainer normalises on the
                  device, so a worker never does), resized in the worker (resize "worker", the
                  CPU default) or only drawn (resize "device", data.resize_on=device, the CUDA
                  default: the whole image and its box go to the device)
  pipeline        BatchStream batches (read, shuffle block, decode, augment, caption pick,
                  tokenise, batch); the simplejpeg rows are what the trainer runs (with the crop
                  resized on the device, JPEGs are decoded straight into the batch's shared
                  memory). Reported as % of the same decoder's decode-only ceiling and of
                  decode + augment.
  loader worker   the same stream run by one real DataLoader worker (`pipeline.make_loader`, as the
                  trainer builds it), timed by the worker's CPU seconds (from /proc): adds handing
                  each batch to the training process through shared memory
  device resize   what resize "device" leaves to the training device (cut and resize every crop
                  of a batch + normalise), timed on this machine's CPU at one thread: the reason CPU
                  runs resize in the workers instead (a GPU does it in well under a millisecond)

With --device-rows (on a GPU) it measures the training device's share instead: a batch of 256
whole images with their crop boxes (the per-GPU batch of the GPU recipes) copied from pinned
memory to the GPU, and resized + normalised there by one batched resampling (what the trainer
runs) against one interpolate per crop (the reference; the CPU's path). `--device cpu --quick`
runs the same code at 16 images (gpu_check.py's CPU rehearsal).

Shards hold synthetic caption scenes, written once into --cache-dir and reused: 64 px for
tiny-vit (the tiny-cpu recipe), 256 px (img2dataset's default size) and 512 px for ViT-B-32
(stored larger than its 224 px crop, as web corpora are), because decode cost grows with pixels.

    python benchmarks/data.py --machine-name NAME           # 2000 samples per size, 5 passes
    python benchmarks/data.py --quick --machine-name NAME   # 500 samples per size, 3 passes
    python benchmarks/data.py --device-rows --machine-name h200   # the GPU's share (~1 min)
"""
from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torchvision import transforms as T

from cliplite_dist.config import DataConfig, ModelConfig, SyntheticConfig
from cliplite_dist.data.badsamples import BadDataCounter
from cliplite_dist.data.pipeline import PREFETCH_BATCHES, SampleDecoder, BatchStream, configure_worker, make_loader
from cliplite_dist.data.reader import iterate_samples
from cliplite_dist.data.shards import Corpus
from cliplite_dist.data.synthetic import ensure_corpus
from cliplite_dist.data.tokens import BatchTokenizer
from cliplite_dist.data.imagebatch import RaggedImages, collate_images
from cliplite_dist.data.transforms import (DeviceTransform, decode_pil, decode_torchvision, decode_uint8,
                                           uint8_train_transform)
from cliplite_dist.models import Towers, build_towers
from common import (add_common_args, cpu_model, entry_point, markdown_table, pyplot, results_folder, run_cells,
                    save_figure, timed, write_results)

SETS = (("tiny-vit", 64), ("ViT-B-32", 256), ("ViT-B-32", 512))  # (model, side of the stored JPEGs in px)
SHARD_SIZE, FULL_SHARDS, QUICK_SHARDS = 500, 4, 1
FULL_REPEATS, QUICK_REPEATS = 5, 3
BATCH_SIZE, SHUFFLE_BUFFER = 64, 1000  # the tiny-cpu recipe's loader
CAPTION_KEY = "json:captions"
IMAGE_KEYS = tuple(DataConfig().image_keys.split(";"))
DECODERS = ("PIL", "simplejpeg")  # open_clip's way, the trainer's
# (stage, decoder, where the crop is resized) per set of shards, in table order
STAGES = (("read", "-", "-"), ("tokenise", "open_clip", "-"), ("tokenise", "ours", "-"), ("decode", "PIL", "-"),
          ("decode", "torchvision.io", "-"), ("decode", "simplejpeg", "-"),
          ("decode+augment", "PIL", "worker"), ("decode+augment", "simplejpeg", "worker"),
          ("decode+augment", "simplejpeg", "device"), ("pipeline", "PIL", "worker"),
          ("pipeline", "simplejpeg", "worker"), ("pipeline", "simplejpeg", "device"),
          ("loader", "simplejpeg", "worker"), ("loader", "simplejpeg", "device"),
          ("device resize", "simplejpeg", "device"))
STAGE_LABELS = {"read": "raw tar read", "tokenise": "tokenise", "decode": "decode",
                "decode+augment": "decode + augment", "pipeline": "full pipeline",
                "loader": "full pipeline in a loader worker",
                "device resize": "device resize + normalise (CPU)"}


# ---- shards ------------------------------------------------------------------------------------
def ensure_shards(cache: Path, image_px: int, num_shards: int) -> list[str]:
    """The first `num_shards` shards of `image_px` scenes. The full set is always written (once,
    then reused) so quick and full runs share one cache; 256 px scenes take longer to render than
    to measure."""
    root = cache / f"{image_px}px-{SHARD_SIZE}"
    ensure_corpus(SyntheticConfig(dir=str(root), train_samples=FULL_SHARDS * SHARD_SIZE,
                                  shard_size=SHARD_SIZE, image_size=image_px))
    return [str(path) for path in sorted((root / "train").glob("train-*.tar"))[:num_shards]]


# ---- the decoders and their train transforms ---------------------------------------------------
# torchvision.io alone: the trainer's JPEG decoder before simplejpeg, for reference
DECODE: dict[str, Callable] = {"PIL": decode_pil, "torchvision.io": decode_torchvision, "simplejpeg": decode_uint8}


def train_transform(decoder: str, pil_transform: T.Compose, resize: str = "worker") -> Callable:
    """What a worker applies after decoding: open_clip's PIL transform (to normalised floats), or
    the trainer's uint8 crop, resized or not (normalisation happens on the training device)."""
    return pil_transform if decoder == "PIL" else uint8_train_transform(pil_transform, resize=resize == "worker")


def make_decoder(decoder: str, pil_transform: T.Compose, resize: str = "worker") -> SampleDecoder:
    return SampleDecoder(train_transform(decoder, pil_transform, resize), CAPTION_KEY, IMAGE_KEYS,
                         decode=DECODE[decoder])


def make_stream(urls: list[str], decoder: SampleDecoder, tokenizer: Callable,
                batch_size: int = BATCH_SIZE) -> BatchStream:
    """One rank's stream as the trainer builds it (rank 0 of 1; run in-process it is one slot)."""
    cfg = DataConfig(batch_size=batch_size, shuffle_buffer=SHUFFLE_BUFFER, caption_key=CAPTION_KEY)
    return BatchStream([Corpus(tuple(urls))], cfg, decoder, tokenizer, rank=0, world_size=1, seed=0)


# ---- stages: each returns how many samples it processed -----------------------------------------
def _count(items: Iterable) -> int:
    return sum(1 for _ in items)


def read_stage(urls: Iterable[str]) -> int:
    return _count(iterate_samples(urls, BadDataCounter()))


def decode_stage(images: list[bytes], decode: Callable) -> int:
    return _count(decode(data) for data in images)


def augment_stage(images: list[bytes], decode: Callable, transform: Callable) -> int:
    return _count(transform(decode(data)) for data in images)


def tokenise_stage(captions: list[str], tokenizer: Callable, batch_size: int = BATCH_SIZE) -> int:
    return sum(len(tokenizer(captions[i:i + batch_size])) for i in range(0, len(captions), batch_size))


def device_stage(crops: list, transform: DeviceTransform) -> int:
    """Cut, resize and normalise batches of whole images with crop boxes as the training device would."""
    return sum(len(transform(batch)) for batch in crops)


def pipeline_stage(batches: Iterator[tuple], count: int) -> int:
    """Images in the next `count` batches of a running stream: the steady state of a worker, one
    read per decoded sample (filling the shuffle buffer happens once per epoch, not per pass).
    Each batch is released once counted, as the trainer releases it once on the device."""
    samples = 0
    for images, _, info in itertools.islice(batches, count):
        samples += len(images)
        info.release()
    return samples


def worker_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process's live children: the loader's
    worker. /proc counts in clock ticks (10 ms), a percent of a pass."""
    ticks = 0
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the file
    return ticks / os.sysconf("SC_CLK_TCK")


def loader_passes(batches: Iterator[tuple], count: int, repeats: int) -> tuple[int, float, float]:
    """(samples, median wall s, median worker CPU s) of `repeats` passes of `count` batches from a
    running loader. Each pass first takes the batches the worker prefetched while nobody asked,
    so the window sees the worker produce about `count` batches (it may be one batch into the
    next when the window closes: the rate errs low by up to 1 / count)."""
    walls, cpus = [], []
    for _ in range(repeats):
        pipeline_stage(batches, PREFETCH_BATCHES)
        wall, cpu = time.perf_counter(), worker_cpu_seconds()
        samples = pipeline_stage(batches, count)
        walls.append(time.perf_counter() - wall)
        cpus.append(worker_cpu_seconds() - cpu)
    return samples, statistics.median(walls), statistics.median(cpus)


# ---- one cell ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_shards(urls: tuple[str, ...]) -> tuple[list[bytes], list[str]]:
    """Images and captions held in memory, so decode, augment and tokenise time no reading."""
    images, captions = [], []
    for sample in iterate_samples(urls, BadDataCounter()):
        images.append(sample["jpg"])
        captions.append(sample["txt"].decode("utf-8"))
    return images, captions


@functools.lru_cache(maxsize=1)
def towers(model: str) -> Towers:
    """Built once per model (cells come grouped by model); only transforms and tokenizer are used."""
    return build_towers(ModelConfig(name=model))


def stage_runner(cell: dict) -> Callable[[], int]:
    """One pass of an in-process stage (loader cells run through `loader_passes`)."""
    urls = tuple(cell["urls"])
    images, captions = load_shards(urls)
    tower = towers(cell["model"])
    stage, decoder, resize = cell["stage"], cell["decoder"], cell["resize"]
    tokenizer = BatchTokenizer(tower.tokenizer)  # what the trainer's stream tokenises with
    if stage == "read":
        return lambda: read_stage(urls)
    if stage == "tokenise":
        return lambda: tokenise_stage(captions, tower.tokenizer if decoder == "open_clip" else tokenizer)
    if stage == "decode":
        return lambda: decode_stage(images, DECODE[decoder])
    if stage == "decode+augment":
        transform = train_transform(decoder, tower.train_transform, resize)
        return lambda: augment_stage(images, DECODE[decoder], transform)
    if stage == "device resize":
        crop = train_transform(decoder, tower.train_transform, resize)
        crops = [collate_images([crop(decode_uint8(data)) for data in images[i:i + BATCH_SIZE]])
                 for i in range(0, len(images), BATCH_SIZE)]
        transform = DeviceTransform(tower.train_transform, torch.device("cpu"), torch.float32)
        return lambda: device_stage(crops, transform)
    batches = iter(cell_stream(cell))
    return lambda: pipeline_stage(batches, len(images) // BATCH_SIZE)


def cell_stream(cell: dict) -> BatchStream:
    """The trainer's stream over the cell's shards, with the cell's decoder and resize placement."""
    tower = towers(cell["model"])
    decoder = make_decoder(cell["decoder"], tower.train_transform, cell["resize"])
    return make_stream(list(cell["urls"]), decoder, BatchTokenizer(tower.tokenizer))


def timed_passes(run: Callable[[], int], repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of `repeats` passes. Other jobs on a shared machine stretch
    wall time but hardly this process's CPU time, so per-CPU-second rates stay comparable across
    cells, and CPU / wall tells how contended a cell was (1.0: it had a core to itself)."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def measure(cell: dict) -> dict:
    """Rates over whole passes; the first pass warms caches (page cache, lazy imports) and counts
    the samples. A loader cell runs its own worker, stopped before the next cell."""
    configure_worker()  # what every loader worker runs first: one thread, freed memory kept
    if cell["stage"] == "loader":
        batches = iter(make_loader(cell_stream(cell), workers=1, pin_memory=False))
        count = len(load_shards(tuple(cell["urls"]))[0]) // BATCH_SIZE
        pipeline_stage(batches, count)
        samples, wall, cpu = loader_passes(batches, count, cell["repeats"])
        del batches  # the last reference: the iterator stops and joins its worker here
    else:
        run = stage_runner(cell)
        samples = run()
        wall, cpu = timed_passes(run, cell["repeats"])
    return {"model": cell["model"], "image_px": cell["image_px"], "stage": cell["stage"],
            "decoder": cell["decoder"], "resize": cell["resize"], "samples": samples, "repeats": cell["repeats"],
            "samples_per_cpu_s": round(samples / cpu, 1), "samples_per_s": round(samples / wall, 1),
            "cpu_share": round(cpu / wall, 2)}


# ---- the grid and the report -------------------------------------------------------------------
def build_cells(args: argparse.Namespace) -> list[dict]:
    cells = []
    for model, image_px in SETS:
        num_shards = QUICK_SHARDS if args.quick else FULL_SHARDS
        urls = ensure_shards(Path(args.cache_dir), image_px, num_shards)
        base = {"model": model, "image_px": image_px, "urls": urls,
                "repeats": QUICK_REPEATS if args.quick else FULL_REPEATS}
        cells += [{**base, "stage": stage, "decoder": decoder, "resize": resize} for stage, decoder, resize in STAGES]
    return cells


def _rates(rows: list[dict]) -> dict[tuple, float]:
    return {(r["model"], r["image_px"], r["stage"], r["decoder"], r["resize"]): r["samples_per_cpu_s"] for r in rows}


def add_ceiling(rows: list[dict]) -> list[dict]:
    """Each pipeline row's rate as % of its decoder's decode-only ceiling on the same shards, and
    of its decode+augment (the rest of the gap is reading, tokenising and batching), per
    CPU-second, which contention from other jobs does not skew."""
    rate = _rates(rows)

    def pct(row: dict, stage: str, resize: str) -> float:
        ceiling = rate[row["model"], row["image_px"], stage, row["decoder"], resize]
        return round(100 * row["samples_per_cpu_s"] / ceiling, 1)

    return [{**r, "pct_of_decode": pct(r, "decode", "-"), "pct_of_augment": pct(r, "decode+augment", r["resize"])}
            if r["stage"] in ("pipeline", "loader") else r for r in rows]


# (label, numerator, denominator) per set of shards; each side is (stage, decoder, resize)
COMPARISONS = [(f"{STAGE_LABELS[stage]}: simplejpeg ÷ PIL", (stage, "simplejpeg", resize), (stage, "PIL", resize))
               for stage, resize in (("decode", "-"), ("decode+augment", "worker"), ("pipeline", "worker"))] + [
    ("decode: simplejpeg ÷ torchvision.io", ("decode", "simplejpeg", "-"), ("decode", "torchvision.io", "-")),
    ("tokenise: ours ÷ open_clip", ("tokenise", "ours", "-"), ("tokenise", "open_clip", "-")),
    ("full pipeline: resize on device ÷ in worker", ("pipeline", "simplejpeg", "device"),
     ("pipeline", "simplejpeg", "worker"))]


def speedups(rows: list[dict]) -> list[list]:
    """Per set of shards: the trainer's decoding ÷ PIL (crop resized in the worker) for each stage
    after reading, simplejpeg's decode ÷ torchvision.io's, our tokenizer ÷ open_clip's, and the
    full pipeline with the resize left to the device ÷ in the worker."""
    rate = _rates(rows)
    return [[model, px, label, f"{rate[(model, px, *a)] / rate[(model, px, *b)]:.2f}x"]
            for model, px in SETS for label, a, b in COMPARISONS]


def _table_row(row: dict) -> list:
    pcts = ([f"{row['pct_of_decode']:.0f}%", f"{row['pct_of_augment']:.0f}%"]
            if "pct_of_decode" in row else ["", ""])
    return [row["model"], row["image_px"], STAGE_LABELS[row["stage"]], row["decoder"], row["resize"],
            f"{row['samples_per_cpu_s']:.0f}", f"{row['samples_per_s']:.0f}", f"{row['cpu_share']:.2f}", *pcts]


def render_markdown(rows: list[dict]) -> str:
    first = rows[0]
    intro = (f"One process, one torch thread (= one loader worker); medians of {first['repeats']} "
             f"passes over {first['samples']} samples (pipeline: whole batches of {BATCH_SIZE}, "
             f"shuffle buffer {SHUFFLE_BUFFER}). samples/CPU-s is a worker's rate with a core to "
             "itself; wall samples/s is what this run saw, CPU share = CPU / wall (below 1: other "
             "jobs took the core). resize: where the crop is resized (data.resize_on). Full "
             "pipeline as % of the same decoder's decode only and of its decode + augment, per "
             "CPU-s. The device resize row is the training device's work, not a worker's.")
    table = markdown_table(
        ["model", "image px", "stage", "decoder / tokenizer", "resize", "samples/CPU-s", "wall samples/s", "CPU share",
         "% of decode", "% of decode + augment"], [_table_row(r) for r in rows])
    ratio = markdown_table(["model", "image px", "comparison", "ratio"], speedups(rows))
    return f"{intro}\n\n{table}\n\n{ratio}\n"


def plot(rows: list[dict], path: Path) -> None:
    """Horizontal bars per model, log scale: the stages span more than an order of magnitude."""
    plt = pyplot()

    colours = {("open_clip", "-"): "tab:blue", ("ours", "-"): "tab:orange", ("PIL", "worker"): "tab:blue",
               ("PIL", "-"): "tab:blue", ("torchvision.io", "-"): "tab:purple", ("simplejpeg", "worker"): "tab:orange",
               ("simplejpeg", "-"): "tab:orange", ("simplejpeg", "device"): "tab:green", ("-", "-"): "tab:grey"}
    sets = list(dict.fromkeys((r["model"], r["image_px"]) for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.5), squeeze=False)
    for ax, (model, px) in zip(axes[0], sets):
        mine = [r for r in rows if (r["model"], r["image_px"]) == (model, px)]
        bars = ax.barh(range(len(mine)), [r["samples_per_cpu_s"] for r in mine],
                       color=[colours[r["decoder"], r["resize"]] for r in mine])
        ax.bar_label(bars, labels=[f"{r['samples_per_cpu_s']:.0f}" for r in mine], padding=2, fontsize=7)
        labels = [STAGE_LABELS[r["stage"]] + ("" if r["decoder"] == "-" else f" · {r['decoder']}")
                  + (f" · resize on {r['resize']}" if r["resize"] != "-" else "") for r in mine]
        ax.set_yticks(range(len(mine)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        # a fixed base keeps bar lengths comparable between panels; headroom for the labels
        ax.set_xlim(10, 3 * max(r["samples_per_cpu_s"] for r in mine))
        ax.set_xlabel("samples per CPU-second, one worker (log scale)")
        ax.set_title(f"{model} ({px} px JPEGs)")
    save_figure(fig, path)


# ---- the training device's share, on a GPU -------------------------------------------------------
DEVICE_SETS = (("ViT-B-32", 256), ("ViT-B-32", 512))
DEVICE_BATCH, DEVICE_REPEATS = 256, 20
QUICK_DEVICE_BATCH, QUICK_DEVICE_REPEATS = 16, 2


def device_batch(cache: Path, model: str, image_px: int, size: int,
                 pin: bool = True) -> tuple[RaggedImages, T.Compose]:
    """`size` whole images with their crop boxes as a worker sends them (pinned, as the loader's
    pinning thread leaves them), and the model's train transform."""
    root = cache / f"{image_px}px-device-{size}"
    ensure_corpus(SyntheticConfig(dir=str(root), train_samples=size, shard_size=size, image_size=image_px))
    images, _ = load_shards(tuple(str(path) for path in sorted((root / "train").glob("train-*.tar"))))
    pil_transform = towers(model).train_transform
    crop = uint8_train_transform(pil_transform, resize=False)
    batch = collate_images([crop(decode_uint8(data)) for data in images])
    return (batch.pin_memory() if pin else batch), pil_transform


def device_rows(cache: Path, gpu: torch.device, size: int, repeats: int) -> list[dict]:
    """ms per batch (median of `repeats`, synchronised) of each step the training device takes
    with data.resize_on=device."""
    rows = []
    for model, image_px in DEVICE_SETS:
        batch, pil_transform = device_batch(cache, model, image_px, size, pin=gpu.type == "cuda")
        on_gpu = batch.to(gpu)
        transform = DeviceTransform(pil_transform, gpu, torch.bfloat16)
        steps = {"copy to the GPU (pinned)": lambda: batch.to(gpu, non_blocking=True),
                 "resize + normalise, batched (the trainer's)": lambda: transform(on_gpu),
                 "resize, batched": lambda: transform.resize(on_gpu),
                 "resize, one interpolate per crop": lambda: transform.resize_each(on_gpu)}
        for step, run in steps.items():
            seconds = timed(run, repeats)
            rows.append({"model": model, "image_px": image_px, "batch": size, "step": step,
                         "ms_per_batch": round(1000 * seconds, 3), "samples_per_s": round(size / seconds)})
            print(rows[-1], flush=True)
    return rows


def write_device_rows(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    size, repeats = (QUICK_DEVICE_BATCH, QUICK_DEVICE_REPEATS) if args.quick else (DEVICE_BATCH, DEVICE_REPEATS)
    rows = device_rows(Path(args.cache_dir), device, size, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"
    table = markdown_table(["model", "image px", "batch", "step", "ms per batch", "samples/s"],
                           [[r["model"], r["image_px"], r["batch"], r["step"], f"{r['ms_per_batch']:.2f}",
                             f"{r['samples_per_s']:,}"] for r in rows])
    intro = (f"The training device's share with data.resize_on=device on one {name}: whole images and crop "
             f"boxes (open_clip's, scale 0.9-1) of {size} images; medians of {repeats} "
             "synchronised runs. Resized to 224 px, normalised to bf16.")
    folder = results_folder("data", args.machine_name, args.results_dir)
    write_results(folder, rows, f"{intro}\n\n{table}\n", device_rows=True, batch_size=size)
    print(table)
    print(f"written to {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--cache-dir", default="/tmp/cliplite-bench-data",
                        help="where the benchmark shards are written once and reused "
                             "(a shared filesystem with --slurm)")
    parser.add_argument("--device-rows", action="store_true", help="only the training device's share")
    parser.add_argument("--device", default="cuda", help="--device-rows: the training device")
    args = parser.parse_args()
    if args.device_rows:
        write_device_rows(args)
        return
    rows = add_ceiling(run_cells(__file__, build_cells(args), args, "data"))
    markdown = render_markdown(rows)
    folder = results_folder("data", args.machine_name, args.results_dir)
    write_results(folder, rows, markdown, torch_threads_per_worker=1, batch_size=BATCH_SIZE,
                  shuffle_buffer=SHUFFLE_BUFFER, quick=args.quick)
    plot(rows, folder / "results.png")
    print(markdown)
    print(f"written to {folder}")


if __name__ == "__main__":
    entry_point(main, measure)
