"""Typed configuration of a whole run.

A run is described by one `Config`: a recipe YAML gives the values, `a.b=value` overrides change
them, and `validate` rejects anything that would fail later (unknown keys, bad choices,
impossible combinations) before any process group, engine or SLURM job exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml

from cliplite_dist.shardspec import ShardError, parse_weights, uses_pipe


class ConfigError(ValueError):
    """A recipe or override that cannot describe a valid run; the message names key and value."""


# Every choice a config offers, declared once; `validate` checks each field typed with one.
ObjectiveName = Literal["cliplite", "infonce", "siglip"]
CriticHead = Literal["mlp", "linear"]
HeadNorm = Literal["batch", "sync_batch", "layer"]
Negatives = Literal["shift", "random", "cross_rank"]
Prior = Literal["reference", "adversarial"]
ResizeOn = Literal["auto", "worker", "device"]
Augment = Literal["open_clip", "paper"]
OptimizerName = Literal["adamw", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
ZeroStage = Literal[0, 1, 2, 3]


def choices(choice_type) -> tuple:
    """The values of one of the choice types above, in declaration order."""
    return typing.get_args(choice_type)


def check_choice(key: str, value: Any, choice_type) -> None:
    """Reject a value that is not one of `choice_type`'s, naming the key, the value and the choices."""
    if value not in choices(choice_type):
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices(choice_type)))}")


def check_precision(precision: str, device_type: str) -> None:
    """fp16 runs on CUDA only (DeepSpeed's loss scaler and fused kernels); checked at load for
    engine.device=cpu and again once "auto" has picked the device."""
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("engine.precision=fp16 needs a GPU; use bf16 or fp32 on CPU")


def check_choices(section: Any, prefix: str) -> None:
    """`check_choice` on every field of a config section (a dataclass) typed with a choice type,
    nested sections included."""
    for name, typ in _field_types(type(section)).items():
        value = getattr(section, name)
        if typing.get_origin(typ) is Literal:
            check_choice(f"{prefix}.{name}", value, typ)
        elif dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}.{name}")


@dataclass
class ModelConfig:
    """The towers: any open_clip model name, or a path to a model-config JSON in open_clip's format."""

    name: str = "tiny-vit"
    grad_checkpointing: bool = False
    # torch.compile each tower's encoder (the image tower, the text transformer): fused kernels
    # and far fewer launches where eager dispatch, not the GPU, bounds the step (ZeRO 0-2)
    compile: bool = False


@dataclass
class ObjectiveConfig:
    """Which training objective and its knobs.

    name: "cliplite" (Jensen-Shannon bound, one negative per positive), "infonce" (CLIP) or
    "siglip" (pairwise sigmoid). head*, negatives and prior* only affect cliplite; bias_init only
    siglip.
    """

    name: ObjectiveName = "cliplite"
    head: CriticHead = "mlp"  # cliplite critic head: "mlp" (encode-and-dot block) or "linear"
    # mlp head's branch norm: "batch" (the reference: BatchNorm1d, statistics of each rank's batch),
    # "sync_batch" (BatchNorm1d over the global batch of all ranks) or "layer" (LayerNorm, per row)
    head_norm: HeadNorm = "batch"
    head_hidden: int = 0  # width of the mlp branch; 0 -> same as the tower embedding
    head_dim: int = 0  # output width of the critic heads; 0 -> same as the tower embedding
    negatives: Negatives = "shift"
    temperature_init: float = 0.0  # initial multiplier, learned as its log; 0 -> the objective's paper value
    temperature_max: float = 100.0  # clamp on exp(log_temperature), applied inside forward
    bias_init: float = -10.0  # siglip's learned logit bias (the paper's init)
    # cliplite prior: "reference" (the paper's code: Deep InfoMax prior on image and text features,
    # loss (1 - w) JSD + w prior) or "adversarial" (image only, through gradient reversal, JSD + w prior)
    prior: Prior = "reference"
    prior_weight: float = 0.0  # w above; 0 disables the prior (the paper's code used 0.1)


@dataclass
class SyntheticConfig:
    """Synthetic shards written before training when `train_samples` > 0 and they are missing."""

    dir: str = ""
    train_samples: int = 0
    eval_samples: int = 0
    classes_test_samples: int = 0  # zero-shot set ("colour shape" classes), CLIP_benchmark layout
    classes_train_samples: int = 0  # its train split, for the linear probe
    shard_size: int = 1000
    image_size: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    """Where the shards are and how they are read.

    train: shard URLs; brace patterns, several corpora joined with `::`, or a directory of
    img2dataset output. batch_size is per rank (the global batch is batch_size x world size).
    """

    train: str = ""
    eval: str = ""  # held-out retrieval: caption shards or a CLIP_benchmark retrieval set
    eval_zeroshot: str = ""  # a CLIP_benchmark classification set (DIR with classnames.txt, test/)
    # CLIP_benchmark sets with train/ and test/ splits, joined by '::': a linear probe on the frozen
    # image tower at every evaluation (top-1, or mAP for a multi-label set)
    eval_probe: str = ""
    num_samples: int = 0  # samples in `train`; 0 -> read sizes.json / *_stats.json beside shards
    resampled: bool = False  # draw shards with replacement forever (LAION-style virtual epochs)
    samples_per_epoch: int = 0  # resampled mode: samples per virtual epoch (global)
    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 1000  # samples per shuffle block of each reader (0 or 1: no shuffling)
    caption_key: str = "txt"  # "txt", or "json:FIELD" (a string or a list: one is picked per step)
    image_keys: str = "jpg;jpeg;png;webp"
    # Where a training crop is resized to the model's input: "worker" (data-loader workers, on
    # CPU), "device" (workers only decode and crop; the training device resizes), "auto" (device
    # when training on CUDA). Resizing is a third of a worker's time per 256 px image.
    resize_on: ResizeOn = "auto"
    # Training augmentation (cliplite_dist/data/augment.py): "open_clip" (the model's crop, nothing
    # else) or "paper" (CLIP-Lite's: crop scale (0.2, 1), a flip that swaps left/right in the
    # caption, colour jitter; flip and jitter applied on the training device).
    augment: Augment = "open_clip"
    allow_pipe: bool = False  # pipe:COMMAND shard URLs run shell commands: only when the recipe says so
    train_weights: str = ""  # resampled mixing: one weight per `::` corpus of data.train, e.g. "1;3"
    cache_dir: str = ""  # keep remote shards here after their first complete read (node-local disk)
    max_bad_fraction: float = 0.1  # stop once bad samples / samples read, or lost shards / shards tried, pass it
    connect_timeout_s: float = 60.0  # start-up check that the shards are reachable: give up after this
    record_keys: bool = False  # write every trained sample's url#key to RUN_DIR/data/keys-rankR.jsonl
    eval_batch_size: int = 256
    eval_max_samples: int = 1000  # images per evaluation set
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    """Optimizer and schedule; our own per-step warmup + cosine sets every group's lr.

    The *_lr fields override `lr` for one part of the model (0 keeps `lr`): the paper trained
    its CNN with SGD at 0.2 and the text side at 1e-3, inside Lookahead (k 5, alpha 0.5).
    """

    name: OptimizerName = "adamw"
    lr: float = 1e-3
    image_lr: float = 0.0
    text_lr: float = 0.0
    critic_lr: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    momentum: float = 0.9
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    lookahead_k: int = 0  # Lookahead around the optimizer: sync the slow weights every k steps; 0: off
    lookahead_alpha: float = 0.5  # Lookahead: slow += alpha * (fast - slow) at each sync


@dataclass
class EngineConfig:
    """DeepSpeed settings. "auto" picks CUDA where available, else CPU; and bf16 on GPUs that
    compute in it (compute capability 8.0 on: A100, H100 ...), fp16 on older GPUs, fp32 on CPU."""

    device: Device = "auto"
    precision: Precision = "auto"
    zero_stage: ZeroStage = 0
    # On GPUs: fp32 matrix products and convolutions in TF32 (Ampere on), as open_clip_train runs;
    # false keeps them in full fp32
    tf32: bool = True
    # How long a rank waits in a collective for the others before the run stops (a rank died or
    # hung); raise it where one rank alone works long before training (a universal conversion)
    collective_timeout_s: float = 1800.0


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in total
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500  # 0: only on signals and at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end


@dataclass
class RunConfig:
    """Where a run's files go. output_dir is a local path or a URL (s3://, gs://, any fsspec
    protocol): a remote run is written to a local staging directory and mirrored there
    (cliplite_dist/rundir.py); local_dir is that directory's parent (default: a folder per URL
    under $TMPDIR), the local twin of output_dir."""

    output_dir: str = "runs"
    name: str = "run"
    resume: str = "auto"  # auto (newest checkpoint in the run dir, if any) | never | PATH
    local_dir: str = ""  # remote output_dir: stage the run in LOCAL_DIR/NAME (a shared path for cliplite-submit)
    sync_every_s: float = 300.0  # remote output_dir: upload what changed this often (and once at exit)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_url(self) -> str:
        """OUTPUT_DIR/NAME when run.output_dir is remote (the run is mirrored there), else ""."""
        return f"{self.run.output_dir.rstrip('/')}/{self.run.name}" if is_remote(self.run.output_dir) else ""

    @property
    def run_dir(self) -> Path:
        """Where this process writes the run's files: OUTPUT_DIR/NAME, or for a remote output_dir
        its staging copy, LOCAL_DIR/NAME; without run.local_dir a folder named after the URL (so
        two remote runs of one name never share it) in the machine's temporary directory."""
        if not self.run_url:
            return Path(self.run.output_dir.removeprefix("file://")) / self.run.name
        if self.run.local_dir:
            return Path(self.run.local_dir) / self.run.name
        digest = hashlib.sha1(self.run_url.encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / "cliplite_dist-staging" / f"{self.run.name}-{digest}"


def is_remote(url: str) -> bool:
    """A URL that fsspec reaches through a protocol other than the local filesystem."""
    return fsspec.utils.get_protocol(url) not in ("file", "local")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check `value` against a field type, allowing the safe widenings YAML needs (int -> float)."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, t, key) for v, t in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported field type {typ}")  # keep configs plain
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typ is float and not isinstance(value, float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return value


def _apply(obj: Any, values: dict, prefix: str) -> None:
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types_:
            valid = ", ".join(f"{prefix}{n}" for n in types_)
            raise ConfigError(f"unknown key {key!r}; valid keys here: {valid}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}")
            _apply(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(value, types_[name], key))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML (so 3 is int, true is bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. data.batch_size=64)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    if value is None:
        value = ""
    return parts, value


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from a recipe YAML file and `key=value` overrides."""
    cfg = Config()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"recipe {str(path)!r}: top level must be a mapping of sections")
        try:
            _apply(cfg, values, "")
        except ConfigError as exc:
            raise ConfigError(f"recipe {str(path)!r}: {exc}") from exc
    for text in overrides:
        parts, value = parse_override(text)
        _apply(cfg, _nest(parts, value), "")
    validate(cfg)
    return cfg


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Reject configurations that would fail later, naming the key and the value."""
    for section in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, section.name)):
            check_choices(getattr(cfg, section.name), section.name)
    positive = ["data.batch_size", "data.eval_batch_size", "train.steps", "train.log_every",
                "optim.grad_accum", "train.keep_checkpoints"]
    for key in positive:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 1")
    non_negative = ["data.workers", "data.num_samples", "data.samples_per_epoch", "data.shuffle_buffer",
                    "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay", "optim.lr",
                    "train.checkpoint_every", "train.eval_every", "data.eval_max_samples",
                    "objective.prior_weight", "objective.head_hidden", "objective.head_dim",
                    "optim.lookahead_k"]
    for key in non_negative:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give shard URLs, e.g. data.train='/data/cc3m/{00000..00331}.tar'")
    for key in ("data.train", "data.eval", "data.eval_zeroshot", "data.eval_probe"):
        if uses_pipe(_get(cfg, key)) and not cfg.data.allow_pipe:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is a pipe: URL, which runs a shell command on every "
                              f"rank; set data.allow_pipe=true in the recipe if that is what you want")
    try:
        weights = parse_weights(cfg.data.train_weights, cfg.data.train)
    except ShardError as exc:
        raise ConfigError(f"data.train_weights={cfg.data.train_weights!r}: {exc}") from None
    if len(set(weights)) > 1 and not cfg.data.resampled:
        raise ConfigError(f"data.train_weights={cfg.data.train_weights!r} needs data.resampled=true: weights say "
                          f"how often each corpus is drawn, which only a resampled stream can honour")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction!r} must be within [0, 1] (1: never stop)")
    if cfg.engine.collective_timeout_s <= 0:
        raise ConfigError(f"engine.collective_timeout_s={cfg.engine.collective_timeout_s!r} must be > 0")
    if cfg.data.connect_timeout_s <= 0:
        raise ConfigError(f"data.connect_timeout_s={cfg.data.connect_timeout_s!r} must be > 0")
    if cfg.data.resampled and cfg.data.samples_per_epoch == 0 and cfg.data.num_samples == 0:
        raise ConfigError("data.resampled=true needs data.samples_per_epoch (samples per virtual epoch)")
    if not cfg.data.caption_key == "txt" and not cfg.data.caption_key.startswith("json:"):
        raise ConfigError(f"data.caption_key={cfg.data.caption_key!r}: use 'txt' or 'json:FIELD'")
    if cfg.model.compile and cfg.engine.zero_stage == 3:
        raise ConfigError("model.compile=true needs engine.zero_stage 0, 1 or 2: ZeRO 3 gathers each layer's "
                          "parameters in hooks around its forward, and torch.compile would trace the empty partitions")
    if cfg.objective.temperature_init < 0 or cfg.objective.temperature_max < cfg.objective.temperature_init:
        raise ConfigError(f"objective.temperature_init={cfg.objective.temperature_init!r} must be >= 0 (0: the "
                          f"objective's paper value) and <= objective.temperature_max={cfg.objective.temperature_max!r}")
    if not 0.0 < cfg.optim.lookahead_alpha <= 1.0:
        raise ConfigError(f"optim.lookahead_alpha={cfg.optim.lookahead_alpha!r} must be within (0, 1]")
    objective = cfg.objective
    if objective.name == "cliplite" and cfg.data.batch_size < 2:
        needs = [why for why, applies in (
            ("the negative caption comes from the local batch (objective.negatives=cross_rank takes it from "
             "another rank)", objective.negatives != "cross_rank"),
            ("objective.head_norm=batch needs two rows per rank (sync_batch takes its statistics over all ranks)",
             objective.head == "mlp" and objective.head_norm == "batch")) if applies]
        if needs:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 2 for cliplite: {'; '.join(needs)}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio!r} must be within [0, 1]")
    if cfg.engine.device == "cpu":
        check_precision(cfg.engine.precision, "cpu")
    if cfg.data.synthetic.train_samples > 0 and not cfg.data.synthetic.dir:
        raise ConfigError("data.synthetic.dir must name where to write the synthetic shards")
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name={cfg.run.name!r} must be a non-empty name without '/'")
    if cfg.run_url:
        protocol = fsspec.utils.get_protocol(cfg.run.output_dir)
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as exc:  # fsspec's message names the package to install
            raise ConfigError(f"run.output_dir={cfg.run.output_dir!r}: this Python cannot write to {protocol}:// "
                              f"({exc}); install its fsspec package (s3fs for s3://, gcsfs for gs://)") from None
    if cfg.run.sync_every_s <= 0:
        raise ConfigError(f"run.sync_every_s={cfg.run.sync_every_s!r} must be > 0")
    if cfg.run.resume not in ("auto", "never") and is_remote(cfg.run.resume):
        raise ConfigError(f"run.resume={cfg.run.resume!r}: give a local checkpoint folder; run.resume=auto "
                          f"finds the newest checkpoint of a remote run directory by itself")


def to_dict(cfg: Config) -> dict:
    """Plain data for the resolved-config YAML in the run directory (tuples become lists)."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
