"""Typed training configuration: dataclasses, YAML presets in `configs/`, `key=value` overrides.

`dataclasses.asdict(config)` is what Ray's `train_loop_config` carries and what MLflow logs as
params, so what ran is what was logged.

About 500 lines on purpose: every setting's field, default, vocabulary and check in one place, read by the CLI,
the driver, the workers and MLflow's params alike; loading and overrides beside them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ingest.errors import ConfigError
from ingest.names import NAME_PATTERN
from ingest.storage.base import parse_size

# The vocabularies: their one owner (the models and losses import them from here).
GAN_MODES = ("vanilla", "lsgan")
ARCHS = ("unet_256", "resnet18_unet", "inception_unet")
ENCODER_MODES = ("frozen", "finetune")  # inception_unet's pretrained encoder: kept as it is, or trained slowly
NORMS = ("batch", "sync_batch", "instance")
FUSIONS = ("none", "inception")
AMP_MODES = ("bf16", "fp16", "none")
CPU_AMP_MODES = ("off", "auto", "on")
CHECKPOINT_UPLOAD_MODES = ("async", "sync")
CACHE_MODES = ("auto", "on", "off")
MAX_NUM_DOWNS = 12  # 4096 px, the largest side ingest writes
DEFAULT_L1_LAMBDA = 100.0  # the recipe's weight of the L1 term
MAX_BAD_FRACTION = 0.01  # the share of corrupt samples past which training and evaluation stop


@dataclass
class StageConfig:
    """One stage of a run: its epochs, loss and learning-rate schedule."""

    name: str = "gan"  # shown in logs and metric names
    epochs: int = 1  # epochs of this stage
    gan_mode: str | None = "vanilla"  # "vanilla" (BCE), "lsgan" (MSE), or None: L1 only, no discriminator
    lr: float = 2e-4  # Adam learning rate of both networks
    decay_epochs: int = 0  # the last N epochs decay the rate linearly to zero (pix2pix); 0: constant

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"stage {self.name!r}: epochs must be at least 1, got {self.epochs}")
        if self.gan_mode is not None and self.gan_mode not in GAN_MODES:
            raise ConfigError(
                f"stage {self.name!r}: gan_mode must be one of {GAN_MODES} or null, got {self.gan_mode!r}"
            )
        if not 0 <= self.decay_epochs <= self.epochs:
            raise ConfigError(f"stage {self.name!r}: decay_epochs must be in 0..epochs, got {self.decay_epochs}")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"stage {self.name!r}: lr must be in (0, 1], got {self.lr} (the recipe: 2e-4)")


@dataclass
class ModelConfig:
    """The networks."""

    # "unet_256" (pix2pix U-Net), "resnet18_unet" (ResNet18 encoder) or "inception_unet" (FID's ImageNet-trained
    # Inception-v3 as the encoder, from the recolor[fid] wheel: pretrained with nothing to download)
    arch: str = "unet_256"
    norm: str = "batch"  # "batch", "sync_batch" (DDP-wide statistics) or "instance"
    base_filters: int = 64  # first-layer filters of the U-Net and the PatchGAN
    num_downs: int = 8  # U-Net downsamplings; the image side must be at least 2**num_downs
    backbone_weights: str | None = None  # torchvision resnet18 state dict file or s3:// URI; None: random init
    fusion: str = "none"  # "inception": Deep Koalarization, a frozen Inception's view fused at the bottleneck
    encoder: str = "frozen"  # inception_unet: "frozen" (its ImageNet weights kept) or "finetune" (trained slowly)
    encoder_lr_scale: float = 0.1  # inception_unet with encoder finetune: the encoder's lr, times the stage's

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch must be one of {ARCHS}, got {self.arch!r}")
        if self.norm not in NORMS:
            raise ConfigError(f"model.norm must be one of {NORMS}, got {self.norm!r}")
        if self.base_filters < 1:
            raise ConfigError(f"model.base_filters must be positive, got {self.base_filters}")
        if not 1 <= self.num_downs <= MAX_NUM_DOWNS:  # the side must be at least 2**num_downs (checked with the data)
            raise ConfigError(f"model.num_downs must be in 1..{MAX_NUM_DOWNS}, got {self.num_downs} (8 for 256 px)")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.backbone_weights and self.arch != "resnet18_unet":
            raise ConfigError("model.backbone_weights applies to arch resnet18_unet only")
        if self.encoder not in ENCODER_MODES:
            raise ConfigError(f"model.encoder must be one of {ENCODER_MODES}, got {self.encoder!r}")
        if not 0 < self.encoder_lr_scale <= 1:
            raise ConfigError(f"model.encoder_lr_scale must be in (0, 1], got {self.encoder_lr_scale}")
        if self.arch == "inception_unet" and self.fusion != "none":
            raise ConfigError("model.fusion applies to unet_256 and resnet18_unet: inception_unet's encoder is the "
                              "Inception network already")  # fmt: skip


MIX_WEIGHTS = (1e-6, 1e6)  # a mixture's weights are proportions: 1e-6..1e6 keeps every share exact in a float


def weight_problem(weight: float) -> str | None:
    """Why `weight` cannot be a mixture weight, or None: it must be a finite positive number within `MIX_WEIGHTS`
    (1e308 overflows the shares' sum; 1e-320 is a share that rounds to no sample)."""
    if math.isnan(weight):
        return "is not a number (NaN)"
    if math.isinf(weight):
        return "is infinite"
    if weight <= 0:
        return "must be a positive number"
    low, high = MIX_WEIGHTS
    if not low <= weight <= high:
        return f"must lie in {low:g}..{high:g} (weights are proportions, like 0.8 and 0.2)"
    return None


@dataclass
class DataConfig:
    """Where the samples come from and how they are fed."""

    datasets: list[str] = field(default_factory=list)  # lake datasets, NAME or NAME@VERSION; mixed freely
    mix: dict[str, float] | None = None  # {NAME[@VERSION]: weight}: each epoch draws from each in proportion
    epoch_samples: int | None = None  # samples an epoch of a mix draws (None: the datasets' training samples)
    lake: str | None = None  # lake URI; None: $RECOLOR_LAKE, else ./lake
    batch_size: int = 16  # per worker (see global_batch_size)
    global_batch_size: int | None = None  # the batch of one update over all workers, split evenly; sets batch_size
    shuffle_window: int = 512  # samples shuffled together (after a seeded shuffle of shard order)
    interleave: int = 4  # shards each worker reads at once, a sample from each in turn
    flip: bool = True  # random horizontal flip of training samples
    rotate_degrees: float = 0.0  # random rotation within +-this many degrees, zoomed to fill the frame; 0: off
    prefetch_batches: int = 4  # batches read ahead by a background thread
    loader_workers: int | None = None  # loader processes that check, decode and augment samples; None: cpus_per_worker
    loader_processes: bool = True  # loader_workers > 1 as processes (Linux; local lake or shard cache); false: threads
    cache: str = "auto"  # node-local shard cache: "auto" (on for s3:// lakes), "on", "off"
    cache_dir: str | None = None  # where (None: $TMPDIR or /tmp, recolor-shard-cache-UID), shared by a node's ranks
    cache_bytes: int | str | None = None  # its budget, bytes or "200GB" (None: 80% of the free space there)
    # each rank reads the same shards every epoch, shuffled among themselves, so a node's cache hits from epoch 2:
    # "auto" (on where the shard cache is: s3:// lakes, or data.cache on), "on", "off" (every epoch drawn over all)
    shard_ownership: str = "auto"
    max_val_batches: int | None = None  # cap validation per worker (None: the whole split)
    max_bad_fraction: float = MAX_BAD_FRACTION  # stop when more than this share of samples is corrupt

    def __post_init__(self):
        if self.mix is not None:
            if not self.mix:
                raise ConfigError("data.mix is empty: name datasets and their weights, e.g. {imagenet: 0.8, coco: 0.2}")
            if self.datasets and self.datasets != list(self.mix):
                raise ConfigError(f"data.datasets {self.datasets} and data.mix {list(self.mix)} name different data: "
                                  "set one of them")  # fmt: skip
            for name, weight in self.mix.items():
                if not isinstance(weight, int | float) or isinstance(weight, bool):
                    raise ConfigError(f"data.mix.{name}: the weight must be a positive number, got {weight!r}")
                why = weight_problem(weight)
                if why:
                    raise ConfigError(f"data.mix.{name}: the weight {why}, got {weight!r}")
            self.mix = {name: float(weight) for name, weight in self.mix.items()}
            self.datasets = list(self.mix)
        twice = sorted({name for name in self.datasets if self.datasets.count(name) > 1})
        if twice:
            raise ConfigError(f"data.datasets names {twice[0]} {self.datasets.count(twice[0])} times: name each "
                              "dataset once")  # fmt: skip
        if self.epoch_samples is not None:
            if self.epoch_samples < 1:
                raise ConfigError(f"data.epoch_samples must be at least 1 (or null), got {self.epoch_samples}")
            if self.mix is None:
                raise ConfigError("data.epoch_samples sets the length of a mixture's epoch: give weights too "
                                  "(--dataset NAME:WEIGHT, or data.mix)")  # fmt: skip
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be at least 1, got {self.batch_size}")
        if self.shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window must be at least 1, got {self.shuffle_window}")
        if not 1 <= self.interleave <= 16:  # on S3 each one is a whole shard in memory
            raise ConfigError(f"data.interleave must be between 1 and 16 shards, got {self.interleave}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 0 <= self.rotate_degrees <= 45:
            raise ConfigError(f"data.rotate_degrees must be in [0, 45], got {self.rotate_degrees}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"data.global_batch_size must be at least 1, got {self.global_batch_size}")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"data.cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.shard_ownership not in CACHE_MODES:
            raise ConfigError(f"data.shard_ownership must be one of {CACHE_MODES}, got {self.shard_ownership!r}")
        if isinstance(self.cache_bytes, str):
            try:
                self.cache_bytes = parse_size(self.cache_bytes)
            except ValueError as e:
                raise ConfigError(f"data.cache_bytes: {e}") from None
        if self.cache_bytes is not None and self.cache_bytes < 1:
            raise ConfigError(
                f"data.cache_bytes must be positive (or null: 80% of the free space), got {self.cache_bytes}"
            )
        if self.loader_workers is not None and not 1 <= self.loader_workers <= 64:
            raise ConfigError(
                f"data.loader_workers must be in 1..64 (or null: cpus_per_worker), got {self.loader_workers}"
            )
        if self.prefetch_batches < 0:
            raise ConfigError(f"data.prefetch_batches must be at least 0 (0: none), got {self.prefetch_batches}")
        if self.max_val_batches is not None and self.max_val_batches < 1:
            raise ConfigError(f"data.max_val_batches must be at least 1 (or null: all), got {self.max_val_batches}")


@dataclass
class TrainConfig:
    """A whole training run."""

    name: str = "colorizer"  # run name: rerunning with the same name resumes from its latest checkpoint
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    data: DataConfig = field(default_factory=DataConfig)
    l1_lambda: float = DEFAULT_L1_LAMBDA  # weight of the L1 term
    beta1: float = 0.5  # Adam betas, as the recipe
    beta2: float = 0.999
    workers: int | list[int] = 2  # Ray Train workers (DDP ranks); [MIN, MAX]: an elastic group (see max_workers)
    max_workers: int | None = None  # an elastic group's largest size (`workers: [2, 8]` sets both); None: fixed
    elastic_resize_s: float = 60.0  # how often a running elastic group looks for room to grow
    use_gpu: bool = False
    cpus_per_worker: int = 1
    amp: str = "bf16"  # autocast dtype on CUDA ("none" to turn off)
    # CPU workers: "on" runs bf16 autocast and channels_last (1.9x a step where the CPU has AVX512-BF16 or AMX,
    # bench/cpu_step.py; slower where it has neither), "auto" only on such CPUs, "off" fp32 NCHW
    cpu_amp: str = "off"
    channels_last: bool = True  # memory format on CUDA
    compile: bool = False  # torch.compile both networks
    deterministic: bool = False  # deterministic kernels (slower); resumed runs then match uninterrupted ones
    storage: str | None = None  # checkpoints and run state: a folder or s3://...; None: ./ray_results
    checkpoint_every: int = 200  # steps between checkpoints (and one at every epoch's end)
    checkpoint_upload: str = "async"  # "async": uploads run beside training; "sync": each step waits for its upload
    keep_checkpoints: int = 3  # at least 2: when the latest checkpoint is unreadable, a run resumes from the one before
    max_failures: int = 2  # worker-group restarts Ray Train may do (-1: no limit, for preemptible nodes)
    log_every: int = 10  # steps between loss logs
    fid_every: int = 0  # validations between FID/KID scores (val/fid; `recolor[fid]`); 0: never (CPU runs: costly)
    max_steps: int | None = None  # stop after this many steps in total (smoke tests, benchmarks)

    def __post_init__(self):
        if not NAME_PATTERN.match(self.name):
            raise ConfigError(f"name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if not self.stages:
            raise ConfigError("a run needs at least one stage")
        if isinstance(self.workers, list):
            if len(self.workers) != 2:
                raise ConfigError(f"workers: expected a count or [MIN, MAX], got {self.workers}")
            self.workers, self.max_workers = self.workers
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ConfigError(f"workers [{self.workers}, {self.max_workers}]: the largest group is smaller than the "
                              "smallest")  # fmt: skip
        if self.max_workers == self.workers:
            self.max_workers = None
        if not 1 <= self.elastic_resize_s <= 86400:
            raise ConfigError(f"elastic_resize_s must be in [1, 86400] seconds, got {self.elastic_resize_s}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus_per_worker must be at least 1, got {self.cpus_per_worker}")
        if not 0 <= self.l1_lambda <= 1e6:
            raise ConfigError(f"l1_lambda must be in [0, 1e6], got {self.l1_lambda} (the recipe: 100)")
        for beta in ("beta1", "beta2"):
            if not 0 <= getattr(self, beta) < 1:
                raise ConfigError(f"{beta} must be in [0, 1), got {getattr(self, beta)} (the recipe: 0.5, 0.999)")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be at least 0 (or -1: no limit), got {self.max_failures}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1 (or null: no limit), got {self.max_steps}")
        if self.cpu_amp not in CPU_AMP_MODES:
            raise ConfigError(f"cpu_amp must be one of {CPU_AMP_MODES}, got {self.cpu_amp!r}")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.amp == "fp16":
            raise ConfigError(
                "amp=fp16 needs loss scaling, which this trainer does not do: use amp=bf16 (A100, H100, H200 and "
                "newer; no scaling needed) or amp=none"
            )
        global_batch = self.data.global_batch_size
        if global_batch is not None and not self.elastic:
            check_split(global_batch, self.workers)
            # A new DataConfig: a config made by dataclasses.replace() shares the old one's.
            self.data = dataclasses.replace(self.data, batch_size=global_batch // self.workers)
        if self.elastic and self.global_batch < self.max_workers:
            raise ConfigError(
                f"a global batch of {self.global_batch} cannot feed {self.max_workers} workers: raise "
                f"data.global_batch_size to at least {self.max_workers}, or lower the largest worker count"
            )
        if self.fid_every < 0:
            raise ConfigError(f"fid_every must be at least 0 (0: no FID), got {self.fid_every}")
        for interval in ("checkpoint_every", "log_every"):
            if getattr(self, interval) < 1:
                raise ConfigError(f"{interval} must be at least 1, got {getattr(self, interval)}")
        if self.model.norm == "sync_batch" and self.workers > 1 and not self.use_gpu:
            raise ConfigError(
                "model.norm=sync_batch needs GPU workers (--gpu): SyncBatchNorm runs on CUDA only. "
                "On CPU workers use model.norm=batch or instance"
            )
        if self.checkpoint_upload not in CHECKPOINT_UPLOAD_MODES:
            raise ConfigError(
                f"checkpoint_upload must be one of {CHECKPOINT_UPLOAD_MODES}, got {self.checkpoint_upload!r}"
            )
        if self.keep_checkpoints < 2:
            raise ConfigError(
                f"keep_checkpoints must be at least 2, got {self.keep_checkpoints}: "
                "when the latest checkpoint is unreadable, a run resumes from the one before"
            )

    @property
    def elastic(self) -> bool:
        """Whether the worker group may change size while it trains (`workers: [MIN, MAX]`)."""
        return self.max_workers is not None

    @property
    def global_batch(self) -> int:
        """The samples of one update over all workers: data.global_batch_size, else data.batch_size per worker of
        the smallest group (so no worker of an elastic group ever holds more than data.batch_size)."""
        return self.data.global_batch_size or self.data.batch_size * self.workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return _build(cls, values, "")


def check_split(global_batch: int, workers: int, source: str = "data.global_batch_size") -> None:
    """Refuse a fixed worker count that does not divide the global batch (its ranks would get unequal batches),
    naming the counts that do.

    Raises:
        ConfigError: naming the counts that split the batch evenly, and the elastic alternative.
    """
    if global_batch % workers == 0:
        return
    counts = [n for n in range(1, min(global_batch, 64) + 1) if global_batch % n == 0]
    raise ConfigError(
        f"{source}={global_batch} does not split evenly over {workers} workers: use --workers "
        f"{' / '.join(map(str, counts))}, a global batch that {workers} divides (e.g. "
        f"{(global_batch // workers + 1) * workers}), or an elastic group (--workers MIN-MAX), whose ranks may take "
        "unequal shares"
    )


def _build(cls, values: dict[str, Any], path: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(path + u for u in unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        nested = _NESTED.get((cls, name))
        if nested is StageConfig:
            kwargs[name] = [_build(StageConfig, stage, f"{path}{name}.{i}.") for i, stage in enumerate(value)]
        elif nested is not None:
            kwargs[name] = _build(nested, value, f"{path}{name}.")
        else:
            kwargs[name] = _checked(f"{path}{name}", typing.get_type_hints(cls)[name], fields[name].type, value)
    return cls(**kwargs)


_FLOAT_TEXT = r"[-+]?\d*\.?\d+[eE][-+]?\d+"


def _checked(name: str, hint: Any, shown: str, value: Any) -> Any:
    """`value` if it has the field's type (an int or `1e-4` text where a float is wanted: as a float).

    Raises:
        ValueError: naming the field, e.g. `data.batch_size: expected int, got 'abc'`.
    """
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    for option in typing.get_args(hint) if union else (hint,):
        if option is type(None) and value is None:
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # `.nan`, `.inf`: a NaN learning rate trains a NaN model, exit 0
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        if option is float and isinstance(value, str) and re.fullmatch(_FLOAT_TEXT, value):
            if not math.isfinite(float(value)):  # 1e999
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)  # YAML 1.1 reads `lr: 1e-4` as a string
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (bool, str) and isinstance(value, option):
            return value
        if option is str and isinstance(value, bool) and bool not in typing.get_args(hint):
            return "on" if value else "off"  # YAML 1.1 reads `on`/`off` (the documented modes) as true/false
        if typing.get_origin(option) is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            if all(isinstance(v, item) for v in value):
                return value
        if (typing.get_origin(option) is dict and isinstance(value, dict)  # {str: float}: weights
                and all(isinstance(k, str) and isinstance(v, int | float | str) and not isinstance(v, bool)
                        for k, v in value.items())):  # fmt: skip
            numbers = {}
            for key, item in value.items():  # YAML 1.1 reads 1e308, 1e-320 and NaN as text: judged as numbers
                try:
                    numbers[key] = float(item)
                except ValueError:
                    raise ConfigError(f"{name}.{key}: expected a number, got {item!r}") from None
            return numbers
    raise ConfigError(f"{name}: expected {shown}, got {value!r}")


_NESTED = {(TrainConfig, "model"): ModelConfig, (TrainConfig, "data"): DataConfig, (TrainConfig, "stages"): StageConfig}


def parse_value(text: str, name: str = "value") -> Any:
    """A command-line value as YAML: `3` is an int, `null` None, `[a, b]` a list, `1e-4` a float.

    Raises:
        ConfigError: the text is not YAML, or carries a tag (`!!python/...`), naming `name`.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{name}={text}: tag {e.problem.split()[-1]} is not allowed: values are plain") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}={text} is not a valid value: {getattr(e, 'problem', e)}") from None
    if isinstance(value, str) and re.fullmatch(_FLOAT_TEXT, value):
        return float(value)  # YAML 1.1 reads 1e-4 as a string
    return value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (list items by index: `stages.0.epochs=3`) to a config mapping."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key=value, e.g. data.batch_size=8")
        target: Any = values
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(target, list | dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])} holds {target!r}, not a section")
            if depth == len(parts) - 1:
                break
            if isinstance(target, list):
                target = target[_index(part, key, len(target))]
            else:
                target = target.setdefault(part, {})
        last = parts[-1]
        if isinstance(target, list):
            target[_index(last, key, len(target))] = parse_value(text, key)
        else:
            target[last] = parse_value(text, key)
    return values


def _index(part: str, key: str, length: int) -> int:
    if not part.isdigit() or int(part) >= length:
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {length}")
    return int(part)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML preset (or the defaults when `path` is None) and apply overrides.

    Raises:
        ValueError: unknown fields, bad values or a malformed override, naming the field.
        FileNotFoundError: the preset does not exist.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            if "=" in str(path):
                raise ConfigError(f"{path} is an override, not a config: the first argument is a YAML preset "
                                  "(e.g. configs/demo.yaml), overrides come after it")  # fmt: skip
            raise FileNotFoundError(f"config {path} does not exist (presets are in configs/)")
        if path.is_dir():
            raise ConfigError(f"config {path} is a folder: pass a YAML file (presets are in configs/)")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config {path} cannot be read: {e}") from None
        except yaml.constructor.ConstructorError as e:
            raise ConfigError(f"config {path}: {_yaml_where(e)}: tag {e.problem.split()[-1]} is not allowed: a config "
                              "holds plain values (no Python objects)") from None  # fmt: skip
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", e)
            raise ConfigError(f"config {path} is not valid YAML: {_yaml_where(e)}: {problem}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {path}: expected a YAML mapping at the top level")
    values = apply_overrides(values, overrides or [])
    return TrainConfig.from_dict(values)


def _yaml_where(error) -> str:
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"model": {"arch": "x"}, "stages": [{"epochs": 2}]}` to `{"model.arch": "x", "stages.0.epochs": 2}`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{name}.{index}."))
        else:
            flat[name] = value
    return flat
