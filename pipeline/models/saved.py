"""A generator on disk without pickled code: its architecture as JSON, its weights as a plain state dict.

    FOLDER/colorizer.json   {"format": "recolor-generator", "format_version": 1, "arch", "norm",
                             "base_filters", "num_downs", "image_size", "resize"}; version 2 adds
                             "fusion" (`model.fusion`), written only for fused generators
    FOLDER/generator.pt     the state dict, saved with `torch.save`, read with `weights_only=True`

Reading it runs only this package's code: the JSON names an architecture this package builds, and
`weights_only=True` refuses anything in the weights file that is not tensors and plain containers.
This is the data folder of every generator the registry holds (`pipeline.tracking.registry`) and what
the serving model (`pipeline.serving.pyfunc`) loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ingest.errors import ConfigError
from ingest.images import DEFAULT_RESIZE, RESIZE_MODES
from pipeline.config import ARCHS, FUSIONS, NORMS

FORMAT = "recolor-generator"
FORMAT_VERSION = 2  # 2: the `fusion` field (written only for fused generators; others stay version 1)
READABLE_VERSIONS = (1, 2)
SPEC_FILE = "colorizer.json"
WEIGHTS_FILE = "generator.pt"


@dataclass(frozen=True)
class GeneratorSpec:
    """What builds the network, and the input side it was trained at."""

    arch: str  # one of pipeline.config.ARCHS
    norm: str  # one of pipeline.config.NORMS
    base_filters: int  # first-layer filters of unet_256
    num_downs: int  # downsamplings of unet_256
    image_size: int  # the side of the training crops: the network's input side at inference
    resize: str = DEFAULT_RESIZE  # how the training samples were cut: "cover" (short side, crop) or "squash"
    fusion: str = "none"  # "inception": Deep Koalarization's fusion at the bottleneck (needs recolor[fid])

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be 'cover' or 'squash', got {self.resize!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        for name in ("base_filters", "num_downs", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, config, image_size: int, resize: str = DEFAULT_RESIZE) -> GeneratorSpec:
        """The spec of a `TrainConfig`'s generator, at `image_size`, for samples cut by `resize`."""
        model = config.model
        return cls(model.arch, model.norm, model.base_filters, model.num_downs, image_size, resize, model.fusion)

    def build(self) -> nn.Module:
        """The network, initialized, on the CPU, in eval mode."""
        from pipeline.models import build_generator

        # Sync BatchNorm needs a process group to run; at inference it is plain BatchNorm.
        norm = "batch" if self.norm == "sync_batch" else self.norm
        return build_generator(self.arch, norm=norm, base_filters=self.base_filters, num_downs=self.num_downs,
                               fusion=self.fusion).eval()  # fmt: skip

    def to_dict(self) -> dict:
        # A plain generator's spec stays version 1, which recolor before fusion reads; a fused one is version 2,
        # which it refuses by name instead of building a plain network that its weights do not fit.
        fields = asdict(self)
        if self.fusion == "none" and self.arch != "inception_unet":  # a reader before both refuses them by version
            del fields["fusion"]
            return {"format": FORMAT, "format_version": 1, **fields}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **fields}


def is_saved_generator(folder: str | Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def save_generator(generator: nn.Module, spec: GeneratorSpec, folder: str | Path) -> Path:
    """Write `generator`'s weights and `spec` into `folder` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in generator.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return folder


def read_spec(folder: str | Path) -> GeneratorSpec:
    """The spec of a saved generator.

    Raises:
        ConfigError: the file is missing, not JSON, of another format or version, or a field is wrong;
            the message names the file and the field.
    """
    path = Path(folder) / SPEC_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: {folder} is not a saved recolor generator") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: field 'format' must be {FORMAT!r}: not a recolor generator")
    if data.get("format_version") not in READABLE_VERSIONS:
        raise ConfigError(
            f"{path}: field 'format_version' is {data.get('format_version')!r}; this recolor reads versions "
            f"{READABLE_VERSIONS}: upgrade recolor to load it"
        )
    fields = {name: data.get(name) for name in GeneratorSpec.__dataclass_fields__}
    fields["resize"] = fields["resize"] or DEFAULT_RESIZE  # optional: the lake's default
    fields["fusion"] = fields["fusion"] or "none"  # optional: generators saved before fusion existed
    for name, value in fields.items():
        if value is None:
            raise ConfigError(f"{path}: field {name!r} is missing")
    try:
        return GeneratorSpec(**fields)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_saved_generator(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, GeneratorSpec]:
    """Build the generator a folder describes and load its weights, without unpickling code.

    Returns:
        (generator in eval mode on `device`, its spec).

    Raises:
        ConfigError: the spec is wrong (see `read_spec`), or the weights file is missing, not a plain state
            dict, or does not fit the architecture; the message names the file.
    """
    spec = read_spec(folder)
    path = Path(folder) / WEIGHTS_FILE
    from pipeline.checkpoint import safe_torch_load

    if not path.is_file():
        raise ConfigError(f"{path} is missing: the generator's weights are not there")
    try:
        state = safe_torch_load(path)
    except ValueError as e:
        raise ConfigError(f"{path} is not a plain state dict of tensors: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConfigError(f"{path} is not a state dict (a mapping of names to tensors)")
    generator = spec.build()
    try:
        generator.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path} does not fit the {spec.arch} of {Path(folder) / SPEC_FILE}: {first}") from None
    generator.recolor_spec = spec  # what built it: `recolor export --format mlflow` saves it again
    return generator.to(device).eval(), spec


def generator_from_checkpoint(payload: dict) -> nn.Module:
    """Rebuild the generator a checkpoint was trained with, in eval mode (its spec as `recolor_spec`)."""
    spec = spec_from_checkpoint(payload)
    generator = spec.build()
    generator.load_state_dict(payload["generator"])
    generator.recolor_spec = spec
    return generator.eval()


def spec_from_checkpoint(payload: dict, image_size: int | None = None) -> GeneratorSpec:
    """The saved-generator spec of a checkpoint's generator, for inputs of `image_size` (default: the side it
    trained at), with the way its samples were cut."""
    from pipeline.checkpoint import payload_config, trained_resize, trained_side

    return GeneratorSpec.from_config(
        payload_config(payload), image_size or trained_side(payload), trained_resize(payload)
    )


def min_side(generator: nn.Module) -> int:
    """The smallest input side the generator accepts (2**num_downs for the U-Net, 32 for the ResNet U-Net)."""
    if hasattr(generator, "down_blocks"):
        return 2 ** len(generator.down_blocks)
    return 32
