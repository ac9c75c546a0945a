"""Console entry points: parse, build the config, call the right function. Nothing else lives here."""
from __future__ import annotations

import argparse
import sys

from cliplite_dist import stopping
from cliplite_dist.config import ConfigError, load_config


def train_main(argv: list[str] | None = None) -> None:
    stopping.catch_early()  # a preemption during the imports and set-up below still stops cleanly
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

    code = train(cfg)
    stopping.ignore()  # finished or checkpointed: a late signal must not turn the exit code into a kill
    sys.exit(code)


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


def submit_parser() -> argparse.ArgumentParser:
    from dataclasses import fields

    from cliplite_dist.launch.submit import SlurmOptions

    parser = argparse.ArgumentParser(
        prog="cliplite-submit",
        description="Validate a recipe and submit it to SLURM through submitit: one task per GPU, "
                    "requeue with automatic resume on time limit or preemption, sweeps as job arrays.")
    parser.add_argument("recipe", help="a recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="section.key=value overrides of the recipe, each value read as YAML")
    defaults = SlurmOptions()
    helps = {"nodes": "nodes per job", "gpus_per_node": "GPUs per node (one task each)",
             "tasks_per_node": "tasks per node (default: one per GPU; 1 without GPUs)",
             "cpus_per_task": "CPUs per task (default: data.workers + 1, the loader's workers and the trainer)",
             "partition": "SLURM partition", "account": "SLURM account to charge", "qos": "SLURM quality of service",
             "time": "time limit (minutes, HH:MM:SS, D-HH:MM:SS)",
             "constraint": "node features to require (sbatch --constraint)",
             "exclude": "nodes to leave out (sbatch --exclude)",
             "mem": "memory per node, e.g. 256G (default: the partition's); a rank holds its model, optimizer "
                    "state and evaluation sets, its loader workers their batch buffers in /dev/shm",
             "signal_delay": "seconds before the limit at which USR2 asks the job to checkpoint",
             "max_requeues": "how often a stopped job requeues itself",
             "job_name": "SLURM job name (default: run.name)"}
    for f in fields(SlurmOptions):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                            default=getattr(defaults, f.name), help=helps.get(f.name))
    parser.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2",
                        help="a grid axis; several --sweep give their product, one job array")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    parser.add_argument("--local", action="store_true", help="run the same job here through submitit's local executor")
    parser.add_argument("--wait", action="store_true", help="follow the log until the job ends; exit with its status")
    return parser


def submit_main(argv: list[str] | None = None) -> None:
    from dataclasses import fields

    from cliplite_dist.launch.submit import SlurmOptions, dry_run_script, follow, output_root, parse_sweep, \
        submit, sweep_points, validate_options

    parser = submit_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after options
    opts = SlurmOptions(**{f.name: getattr(args, f.name) for f in fields(SlurmOptions)})
    try:
        validate_options(opts)
        points = sweep_points(args.recipe, args.overrides, parse_sweep(args.sweep))
        output_root(points[0][1])  # a remote output_dir needs run.local_dir for the job logs
    except ConfigError as exc:
        parser.exit(2, f"cliplite-submit: error: {exc}\n")
    if args.dry_run:
        print(dry_run_script(opts, points[0][1], array_size=len(points) if args.sweep else 0))
        return
    jobs = submit(points, opts, local=args.local)
    if args.sweep:
        keys = list(points[0][0])
        print("  ".join(["job"] + keys + ["run directory"]))
        for job, (point, cfg) in zip(jobs, points):
            print("  ".join([job.job_id] + [point[k] for k in keys] + [cfg.run_url or str(cfg.run_dir)]))
    else:
        job, cfg = jobs[0], points[0][1]
        print(f"submitted job {job.job_id}\n  log     {job.paths.stdout}\n  errors  {job.paths.stderr}\n"
              f"  run     {cfg.run_url or cfg.run_dir}")
    sys.stdout.flush()
    if args.wait:
        sys.exit(max(follow(job) for job in jobs))


def status_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cliplite-status",
                                     description="State, last step, loss, samples/s and log tail of a run.")
    parser.add_argument("target", metavar="RUN_DIR|JOB_ID")
    parser.add_argument("--tail", type=int, default=10, help="log lines to show")
    args = parser.parse_args(argv)
    from cliplite_dist.launch.status import run_status

    try:
        print(run_status(args.target, args.tail).render())
    except FileNotFoundError as exc:
        parser.exit(1, f"cliplite-status: {exc}\n")


def export_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cliplite-export",
        description="Consolidate a run's newest checkpoint (any ZeRO stage) to fp32 and write an open_clip "
                    "model folder (open_clip_config.json + safetensors) with our critic beside it.")
    parser.add_argument("run_dir", help="a run directory, or its URL for a remote run.output_dir (s3://...)")
    parser.add_argument("out")
    parser.add_argument("--tag", default=None, help="a checkpoint folder name (default: the newest complete one)")
    args = parser.parse_args(argv)
    from pathlib import Path

    from cliplite_dist.export import export_run

    try:
        out = export_run(args.run_dir, Path(args.out), args.tag)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"cliplite-export: error: {exc}\n")
    print(f"exported to {out}\n  open_clip: open_clip.create_model_and_transforms('local-dir:{out}')\n"
          f"  with the critic: model, preprocess, tokenizer = cliplite_dist.load('{out}')")


def eval_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cliplite-eval",
        description="Retrieval, zero-shot classification and linear probe of an export, a run directory or a "
                    "checkpoint; prints a table and writes JSON.")
    parser.add_argument("target", metavar="RUN_DIR|CHECKPOINT|EXPORT")
    parser.add_argument("--retrieval", metavar="SHARDS", help="caption shards or a CLIP_benchmark retrieval set")
    parser.add_argument("--zeroshot", metavar="DIR", help="a CLIP_benchmark classification set")
    parser.add_argument("--linear-probe", nargs=2, metavar=("TRAIN", "TEST"),
                        help="two splits of a CLIP_benchmark classification or multilabel set, e.g. DIR/train DIR/test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-images", type=int, default=0, help="per set; 0: all")
    parser.add_argument("--device", default="cpu", help="where the model embeds: cpu, cuda or cuda:N")
    parser.add_argument("--json", metavar="FILE", help="where to write the results (default: TARGET/eval.json)")
    args = parser.parse_args(argv)
    if not (args.retrieval or args.zeroshot or args.linear_probe):
        parser.error("give at least one of --retrieval, --zeroshot, --linear-probe")
    import json
    from pathlib import Path

    from cliplite_dist.evaluate.standalone import evaluate, render

    try:
        results = evaluate(args.target, args.retrieval, args.zeroshot,
                           tuple(args.linear_probe) if args.linear_probe else None, args.batch_size, args.max_images,
                           args.device)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"cliplite-eval: error: {exc}\n")
    print(render(results))
    out = Path(args.json) if args.json else Path(args.target) / "eval.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results written to {out}")


def prep_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cliplite-prep",
        description="Prepare a corpus as webdataset shards DIR/NNNNN.tar with a sizes.json (per-shard "
                    "sample counts for epoch lengths): from COCO captions, from a CSV/TSV list, or "
                    "counts only for shards written elsewhere (img2dataset).")
    commands = parser.add_subparsers(dest="command", required=True)
    coco = commands.add_parser("coco", help="COCO captions: one sample per image keeping every caption "
                                            "(train with data.caption_key=json:captions)")
    coco.add_argument("--captions", required=True, help="e.g. annotations/captions_train2017.json")
    coco.add_argument("--images", required=True, help="the image folder, e.g. train2017/")
    table = commands.add_parser("csv", help="a CSV (TSV for .tsv/.tab) of image paths and captions")
    table.add_argument("file")
    table.add_argument("--image-col", required=True)
    table.add_argument("--caption-col", required=True)
    table.add_argument("--image-root", help="base of relative image paths (default: the file's folder)")
    for sub in (coco, table):
        sub.add_argument("--out", required=True, help="output directory")
        sub.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        sub.add_argument("--overwrite", action="store_true", help="write into a non-empty directory, "
                                                                  "replacing its shards")
    stats = commands.add_parser("stats", help="write sizes.json for existing shards: from img2dataset "
                                              "_stats.json (complete shards only), else by scanning")
    stats.add_argument("directory", help="a local folder or a URL (s3://, gs:// ...)")
    args = parser.parse_args(argv)
    import logging

    from cliplite_dist.data import prep

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # a line per shard written
    try:
        if args.command == "coco":
            summary = prep.prep_coco(args.captions, args.images, args.out, shard_size=args.shard_size,
                                     overwrite=args.overwrite)
        elif args.command == "csv":
            summary = prep.prep_csv(args.file, args.out, image_col=args.image_col,
                                    caption_col=args.caption_col, shard_size=args.shard_size,
                                    image_root=args.image_root, overwrite=args.overwrite)
        else:
            summary = prep.shard_stats(args.directory)
    except prep.PrepError as exc:
        parser.exit(2, f"cliplite-prep: error: {exc}\n")
    print(summary.render())
