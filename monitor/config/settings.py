"""Daemon configuration: a TOML file plus `CRYSTAL_MONITOR__SECTION__KEY` environment overrides.

Validation here is pure: types, ranges, unknown keys, duplicate probe ids. Checks
that touch the file system (does the model exist, can the state folder be
written) live in `check_environment`, run once at start-up. Every error names its
key path so `crystal-monitor validate-config` can print one line per mistake.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from monitor.config.alarms import (
    DIAGNOSTIC_KINDS,
    PROCESS_KINDS,
    SYSTEM_KINDS,
    WINDOWED_KINDS,
    AlarmsConfig,
    WindowSeconds,
    check_classes,
    check_windows,
)
from monitor.config.durations import Duration
from monitor.config.exit_codes import EX_CONFIG as EX_CONFIG  # noqa: PLC0414 - re-exported
from monitor.config.fractions import Fraction
from monitor.config.http import HttpConfig, check_http_environment
from monitor.config.mqtt import MqttConfig
from monitor.config.opcua import OpcUaConfig, check_opcua_environment
from monitor.config.overrides import UnknownOverride, find_unknown_overrides
from monitor.config.review import ReviewConfig
from monitor.config.sections import merge_values, validate_sections
from monitor.config.shadow import ShadowConfig
from monitor.manifest import DETECTOR_MANIFEST, default_detector_dir

ENV_PREFIX = "CRYSTAL_MONITOR__"
ENV_DELIMITER = "__"  # CRYSTAL_MONITOR__SECTION__KEY


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FolderSourceConfig(_Section):
    """A folder the probe's vendor software writes image files into."""

    type: Literal["folder"] = Field(
        description="folder: watch a folder the probe's software writes image files into."
    )
    path: Path = Field(description="Folder to watch.")
    patterns: tuple[str, ...] = Field(
        default=("*.png", "*.tif", "*.tiff", "*.bmp", "*.jpg", "*.jpeg"),
        min_length=1,
        description="Glob patterns of frame files (case-insensitive).",
    )
    recursive: bool = Field(default=False, description="Also watch sub-folders.")
    backlog: str = Field(
        default="all",
        description="Files already present at start: 'all', 'none' or 'newest:N'.",
    )
    settle_time: Duration = Field(
        default=1.0,
        gt=0,
        description="A file written in place without a close event counts as complete "
        "once its size and mtime have not changed for this long.",
    )
    rescan_interval: Duration = Field(
        default=30.0,
        gt=0,
        description="Full rescan of the folder as a safety net for missed events and "
        "for a folder that vanished and came back.",
    )
    after: Literal["keep", "move", "delete"] = Field(
        default="keep", description="What to do with a file once its result is stored."
    )
    done_dir: Path | None = Field(default=None, description="Destination when after = 'move'.")
    follow_symlinks: bool = Field(
        default=False,
        description="Read symbolic links that lead out of the folder. Off: such a file is "
        "recorded as an error with reason symlink_outside_folder and never read; links "
        "to files inside the folder are read either way.",
    )
    frame_time: Literal["name", "mtime", "arrival"] = Field(
        default="name",
        description="Where a frame's time comes from: 'name' (the time written in the file "
        "name, e.g. frame_20260101T001305.000Z.png, else the file's mtime), 'mtime' (the "
        "file's modification time) or 'arrival' (when the daemon found the file). A name's "
        "or mtime's time further than frame_time_tolerance from the arrival (an archived "
        "frame dropped into the folder, a probe PC's clock that is off) is replaced by the "
        "arrival time, logged once per run with the reason. `replay` always uses the name's "
        "time.",
    )
    frame_time_tolerance: Duration = Field(
        default=120.0,
        gt=0,
        description="How far a time from the name or mtime may be from the file's arrival, "
        "either way. Longer keeps the name's time of frames delivered late (a share back "
        "after an outage, a restart's backlog); a probe clock behind by less than it then "
        "shows as a stale probe.",
    )

    @field_validator("backlog")
    @classmethod
    def _backlog_form(cls, value: str) -> str:
        if value in {"all", "none"}:
            return value
        match = re.fullmatch(r"newest:(\d+)", value)
        if match is None or int(match.group(1)) < 1:
            raise ValueError("must be 'all', 'none' or 'newest:N' with N >= 1")
        return value

    @model_validator(mode="after")
    def _done_dir_needed(self) -> FolderSourceConfig:
        if self.after == "move" and self.done_dir is None:
            raise ValueError("after = 'move' needs done_dir")
        return self


class StreamSourceConfig(_Section):
    """A camera stream read with OpenCV (RTSP, HTTP, a video file or a device index)."""

    type: Literal["stream"] = Field(description="stream: a camera stream read with OpenCV.")
    url: str = Field(min_length=1, description="Stream URL, video file, or device index.")
    max_fps: float = Field(default=5.0, gt=0, le=120, description="Frame-rate cap.")
    reconnect_min: Duration = Field(default=1.0, gt=0, description="First reconnect delay.")
    reconnect_max: Duration = Field(default=60.0, gt=0, description="Longest reconnect delay.")


class SimulatedSourceConfig(_Section):
    """The probe simulator as a live probe (demo and tests)."""

    type: Literal["simulated"] = Field(description="simulated: the built-in probe simulator.")
    mode: Literal["crop", "frame"] = Field(default="frame", description="Crops or full frames.")
    fps: float = Field(default=4.0, gt=0, le=100, description="Frames per second.")
    profile: str = Field(
        default="ramp:0:0.3@60-1860",
        description="PG share over time: constant:F, step:A:B@T or ramp:A:B@T0-T1 (seconds).",
    )
    seed: int = Field(default=1, description="Random seed.")
    width: int = Field(default=1360, ge=64, description="Frame width, px.")
    height: int = Field(default=1024, ge=64, description="Frame height, px.")
    particles: int = Field(default=30, ge=0, description="Particles per frame.")
    time_scale: float = Field(
        default=1.0, gt=0, description="Simulated seconds per real second (tests compress time)."
    )


SourceConfig = Annotated[
    FolderSourceConfig | StreamSourceConfig | SimulatedSourceConfig, Field(discriminator="type")
]


class QualityConfig(_Section):
    """Per-frame quality gate; a rejected frame is counted by reason and not classified."""

    focus_measure: Literal["laplacian", "tenengrad"] = Field(
        default="laplacian", description="Focus measure (variance of Laplacian or Tenengrad)."
    )
    min_focus: float = Field(default=0.0, ge=0, description="Reject frames below this focus.")
    min_contrast: float = Field(
        default=2.0, ge=0, description="Frames whose grey-level std is below this are empty."
    )
    max_saturated_share: Annotated[Fraction, Field(gt=0)] = Field(
        default=0.25, description="Reject frames with more pixels at 255 than this."
    )


class ParticlesConfig(_Section):
    """Segmentation of particles in a full frame (sampling = 'particles')."""

    threshold: int = Field(
        default=40,
        ge=1,
        le=254,
        description="Grey levels above the local background that count as particle.",
    )
    min_area: int = Field(default=800, ge=1, description="Smallest particle, px².")
    max_area: int = Field(default=250_000, ge=1, description="Largest particle, px².")
    min_focus: float = Field(
        default=0.0,
        ge=0,
        description="Per-object focus (variance of Laplacian) below which "
        "an object is out of focus and not counted.",
    )
    margin: Fraction = Field(default=0.15, description="Crop margin around the box.")
    max_per_frame: int = Field(default=300, ge=1, description="Most particles taken per frame.")
    separation: Literal["watershed", "auto", "learned", "none"] = Field(
        default="watershed",
        description="How touching and overlapping particles are split. watershed: on the "
        "distance transform of the foreground, only where a blob looks merged (a frame "
        "covered above separation_max_cover is left unsplit); auto: the watershed on "
        "frames covered at most separation_max_cover, the learned detector on more "
        "crowded ones (far better recall and sizes there, but in a dense simulated "
        "slurry a PG fraction 5.5 points off against 2.0 unsplit: BENCHMARKS.md, "
        "'instances'); learned: the detector on every frame (see particles.detector); "
        "none: one box per connected blob, the cheapest.",
    )
    detector: Path | None = Field(
        default=None,
        description="With separation = 'auto' or 'learned': the folder of the particle "
        "detector (detector.json + its ONNX file, made by `python -m model_zoo "
        "train-detector`); unset, the shipped one.",
    )
    detector_threshold: Annotated[Fraction, Field(gt=0, lt=1)] = Field(
        default=0.3,
        description="The lowest heat-map peak of the detector taken as a particle.",
    )
    refine_edges: bool = Field(
        default=True,
        description="Place each particle's edge at the frame's own resolution (pixels above "
        "half the threshold joined to it) rather than on the 4x smaller working copy, where "
        "thin needles vanish and edges are off by up to 2 px: boxes cover a bundle's faint "
        "needles and sizes are not biased low.",
    )
    separation_max_cover: Fraction = Field(
        default=0.15,
        description="A frame whose foreground covers more than this share is crowded: "
        "with separation = 'auto' the learned detector finds its particles; with "
        "'watershed' it is not split (as with 'none'): in a dense slurry the needles merge "
        "into one mass the watershed cannot cut, but it carves the agglomerates out of it, "
        "so PG is over-counted (measured in BENCHMARKS.md, 'instances').",
    )


class TilesConfig(_Section):
    """Fixed tiles cut from a frame (sampling = 'tiles')."""

    size: int = Field(default=192, ge=16, description="Tile side, px.")
    stride: int = Field(default=192, ge=1, description="Step between tiles, px.")


class ProbeConfig(_Section):
    """One probe: where its frames come from and how they are cut into crops."""

    id: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Probe id used in topics, tags and rows."
    )
    source: SourceConfig = Field(
        description="Where the frames come from: type = folder, stream or simulated."
    )
    sampling: Literal["whole", "particles", "tiles"] = Field(
        default="whole",
        description="whole: each file is one particle crop; particles: segment a frame; "
        "tiles: classify fixed tiles.",
    )
    quality: QualityConfig = Field(
        default_factory=QualityConfig, description="Per-frame quality gate."
    )
    particles: ParticlesConfig = Field(
        default_factory=ParticlesConfig,
        description="Particle segmentation, used with sampling = 'particles'.",
    )
    tiles: TilesConfig = Field(
        default_factory=TilesConfig, description="Fixed tiles, used with sampling = 'tiles'."
    )
    pixel_size_um: float | None = Field(
        default=None,
        gt=0,
        description="The probe's calibration: micrometres per pixel (the vendor's value for "
        "its objective). Sizes are published in micrometres with it, in pixels (and said to "
        "be pixels) without.",
    )
    max_pixels: int = Field(
        default=50_000_000, ge=64, description="Images over this are refused before decoding."
    )
    max_decoded_bytes: ByteSize | None = Field(
        default=None,
        gt=0,
        description="Images whose decoded size (width x height x channels x bytes per "
        "sample, from the header) is over this are refused before decoding "
        "(decoded_too_large), and files a little over it are refused unread "
        "(file_too_large). Unset: max_pixels x 2 bytes, one 16-bit channel.",
    )


class ModelConfig(_Section):
    path: Path | None = Field(
        default=None, description="Exported model directory; empty = the shipped default model."
    )
    shadow: ShadowConfig | None = Field(
        default=None,
        description="A candidate model run beside the live one and compared, never published "
        "(unset: no shadow).",
    )


BackendType = Literal["auto", "tensorrt", "onnxruntime"]


class TensorRTConfig(_Section):
    """TensorRT settings, used when backend.type is "tensorrt" (or "auto" picks TensorRT)."""

    precision: Literal["fp16", "int8"] = Field(
        default="fp16",
        description="fp16: no calibration needed; int8: faster, calibrated on calibration_dir.",
    )
    calibration_dir: Path | None = Field(
        default=None,
        description="Folder of representative crop images (what the classifier sees) for INT8 "
        "calibration; needed with precision = 'int8'.",
    )
    engine_cache_dir: Path | None = Field(
        default=None,
        description="Where built engines are kept; empty = <daemon.state_dir>/engines.",
    )

    @model_validator(mode="after")
    def _int8_needs_calibration(self) -> TensorRTConfig:
        if self.precision == "int8" and self.calibration_dir is None:
            raise ValueError("precision = 'int8' needs calibration_dir (a folder of crop images)")
        return self


class BackendConfig(_Section):
    """What runs the network: TensorRT on a GPU host, ONNX Runtime everywhere else."""

    type: BackendType = Field(
        default="auto",
        description="auto: TensorRT when a CUDA GPU and tensorrt are present, else ONNX Runtime "
        "(CUDA provider if present, else CPU); tensorrt: refuse to start without it; "
        "onnxruntime: never TensorRT.",
    )
    threads: int = Field(
        default=0, ge=0, description="ONNX Runtime inference threads; 0 = all cores."
    )
    tensorrt: TensorRTConfig = Field(
        default_factory=TensorRTConfig, description="TensorRT engine settings."
    )


class BatcherConfig(_Section):
    """The one micro-batcher shared by all probes."""

    max_batch: int = Field(default=32, ge=1, le=1024, description="Most crops per batch.")
    max_wait: Duration = Field(default=0.02, le=5, description="Longest wait for a batch to fill.")
    queue_size: int = Field(
        default=1024,
        ge=1,
        description="Crops waiting for inference (each holds its input tensor: 1024 crops at "
        "224 px are about 600 MB).",
    )
    frame_queue_size: int = Field(default=64, ge=1, description="Frames waiting for decoding.")
    workers: int = Field(
        default=0,
        ge=0,
        description="Worker processes (or threads) for each frame's decode, quality gate, "
        "segmentation and preprocessing; 0 = one per core.",
    )
    processes: bool = Field(
        default=True,
        description="Run that work in worker processes, handing tensors over in shared "
        "memory (threads of the daemon share one core's worth of Python).",
    )
    slot_mib: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Shared memory per frame in flight (a worker holds 4): the frame, its "
        "crops' input tensors and images. A frame that needs more is sent pickled, "
        "counted as oversize.",
    )


class AggregationConfig(_Section):
    windows: tuple[Duration, ...] = Field(
        default=(60.0, 300.0, 900.0), min_length=1, description="Sliding window lengths."
    )
    publish_interval: Duration = Field(
        default=5.0, gt=0, description="How often windows are recomputed and stored."
    )
    ewma_halflife: Duration = Field(default=60.0, gt=0, description="EWMA half-life.")

    @field_validator("windows")
    @classmethod
    def _windows_positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(window <= 0 for window in value):
            raise ValueError("every window must be longer than 0 s")
        if len(set(value)) != len(value):
            raise ValueError("windows must be distinct")
        return tuple(sorted(value))


class StoreConfig(_Section):
    retention: Duration = Field(
        default=90 * 86400.0,
        gt=0,
        description="How long frame rows, window snapshots and file journal entries stay, "
        "counted from when each was recorded.",
    )
    particle_retention: Duration = Field(
        default=7 * 86400.0,
        gt=0,
        description="How long the per-particle rows (sizes, boxes; export --what particles) "
        "stay: about 90 bytes a particle, 0.7 GB a day at 3 frames/s and 30 particles a "
        "frame. Longer than retention counts as retention (they go with their frames).",
    )
    commit_delay: Duration = Field(
        default=0.02,
        ge=0,
        le=1.0,
        description="How long the recorder gathers frame rows into one SQLite transaction; "
        "longer groups more frames per commit, 0 commits each at once.",
    )


class DaemonConfig(_Section):
    state_dir: Path = Field(
        default=Path(".state"),
        description="SQLite store (frames, windows, file journal, alarm state) and caches.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: pretty on a terminal, JSON lines otherwise."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Least severe log lines written: debug, info, warning, error."
    )
    shutdown_grace: Duration = Field(
        default=10.0, gt=0, description="Time to finish in-flight frames on SIGTERM."
    )


class Settings(BaseSettings):
    """The whole daemon configuration."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        protected_namespaces=(),
    )

    daemon: DaemonConfig = Field(
        default_factory=DaemonConfig, description="Daemon process: state folder, logging, shutdown."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="The exported classifier model."
    )
    backend: BackendConfig = Field(
        default_factory=BackendConfig,
        description="What runs the network: TensorRT or ONNX Runtime.",
    )
    batcher: BatcherConfig = Field(
        default_factory=BatcherConfig,
        description="The micro-batcher shared by all probes and its bounded queues.",
    )
    aggregation: AggregationConfig = Field(
        default_factory=AggregationConfig,
        description="Sliding windows over the classified particles.",
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="The SQLite store in daemon.state_dir."
    )
    alarms: AlarmsConfig = Field(
        default_factory=AlarmsConfig,
        description="Alarm definitions and engine-wide alarm settings.",
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="The MQTT publisher.")
    opcua: OpcUaConfig = Field(default_factory=OpcUaConfig, description="The OPC UA server.")
    http: HttpConfig = Field(
        default_factory=HttpConfig,
        description="The HTTP server: health, metrics, JSON API and dashboard.",
    )
    review: ReviewConfig = Field(
        default_factory=ReviewConfig,
        description="The review queue: crops kept for labelling on /label.",
    )
    probes: tuple[ProbeConfig, ...] = Field(
        min_length=1, description="The probes this daemon reads."
    )

    @field_validator("probes")
    @classmethod
    def _unique_probe_ids(cls, probes: tuple[ProbeConfig, ...]) -> tuple[ProbeConfig, ...]:
        seen: set[str] = set()
        for probe in probes:
            if probe.id in seen:
                raise ValueError(f"duplicate probe id {probe.id!r}: every probe needs its own id")
            seen.add(probe.id)
        return probes

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init arguments; the environment overrides it.
        return (env_settings, init_settings)


class ConfigError(Exception):
    """Invalid configuration: one line per problem, each naming its key.

    `sections` holds the top-level sections that are valid on their own (all of them when
    only a cross-section check or an environment variable failed), so a caller can run
    `check_sections_environment` on them in the same pass.
    """

    def __init__(self, problems: list[str], sections: Mapping[str, object] | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.sections = dict(sections or {})


_DISCRIMINATOR_TAGS = frozenset(
    {"folder", "stream", "simulated", *PROCESS_KINDS, *DIAGNOSTIC_KINDS, *SYSTEM_KINDS}
)
"""The `type` of a source and the `kind` of an alarm, which pydantic puts in locations."""


def _format_location(location: tuple[int | str, ...]) -> str:
    """('probes', 0, 'source', 'folder', 'path') -> 'probes[0].source.path';
    ('alarms', 'definitions', 1, 'fraction_high', 'limit') -> 'alarms.definitions[1].limit'."""
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif (
            item in _DISCRIMINATOR_TAGS
            and parts
            and (parts[-1] == ".source" or parts[-1][0] == "[")
        ):
            continue  # the discriminator tag is noise in a key path
        else:
            parts.append(f".{item}")
    return "".join(parts).lstrip(".") or "(top level)"


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; raise ConfigError naming the file and the syntax error."""
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config file {path}: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


def load_settings(path: Path | None = None, data: dict[str, Any] | None = None) -> Settings:
    """Validate a TOML file (or a dict) plus environment overrides.

    Raises ConfigError listing every problem with its key path, all in one pass: types,
    ranges and unknown keys; alarm windows that are no aggregation window (each read
    alone, so no other mistake hides one); `CRYSTAL_MONITOR__` variables that set no
    key, each with the nearest key. `ConfigError.sections` has the sections valid alone.
    """
    values = dict(data or {})
    if path is not None:
        values = read_toml(path)
    unknown = find_unknown_overrides(os.environ, Settings, ENV_PREFIX, ENV_DELIMITER)
    problems = [override.describe() for override in unknown]
    # The values as pydantic-settings sees them: the environment's laid over the file's.
    effective = merge_values(values, EnvSettingsSource(Settings)())
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        errors = exc.errors()
        failed = {str(error["loc"][0]) for error in errors if error["loc"]}
        problems += _validation_problems(errors, unknown)
        problems += _alarm_window_problems(effective)
        raise ConfigError(problems, validate_sections(Settings, effective, failed)) from exc
    problems += _alarm_window_problems(effective)
    if problems:
        raise ConfigError(problems, dict(settings))
    return settings


def _validation_problems(errors: list[Any], unknown: list[UnknownOverride]) -> list[str]:
    # pydantic adds "too short" for a list whose items failed; the item errors suffice.
    failed_items = {tuple(e["loc"][:1]) for e in errors if len(e["loc"]) > 1}
    # An unknown override inside a known section is also an unknown key to pydantic;
    # the override's own line says more (the variable and the nearest key).
    override_paths = {override.path for override in unknown}
    relevant = [
        e
        for e in errors
        if not (e["type"] == "too_short" and tuple(e["loc"]) in failed_items)
        and not (
            e["type"] == "extra_forbidden"
            and tuple(str(part).lower() for part in e["loc"]) in override_paths
        )
    ]
    return [_describe(error) for error in relevant]


_WINDOW: TypeAdapter[float] = TypeAdapter(WindowSeconds)


def _aggregation_windows(values: Mapping[str, Any]) -> tuple[float, ...] | None:
    """aggregation.windows validated alone (None when invalid: that error is reported)."""
    section = values.get("aggregation")
    given = section.get("windows") if isinstance(section, Mapping) else None
    try:
        return AggregationConfig.model_validate({} if given is None else {"windows": given}).windows
    except ValidationError:
        return None


def _alarm_window_problems(values: Mapping[str, Any]) -> list[str]:
    """Each alarm's window against aggregation.windows, read from the raw values: a
    mistake anywhere else, in the same alarm too, hides neither."""
    windows = _aggregation_windows(values)
    section = values.get("alarms")
    definitions = section.get("definitions") if isinstance(section, Mapping) else None
    if windows is None or not isinstance(definitions, list | tuple):
        return []
    alarm_windows: list[tuple[str, float]] = []
    for raw in definitions:
        if not (isinstance(raw, Mapping) and raw.get("kind") in WINDOWED_KINDS):
            continue
        if raw.get("window") is None:
            continue  # optional for rate_of_change; required elsewhere, and then reported
        try:
            alarm_windows.append((str(raw.get("id", "?")), _WINDOW.validate_python(raw["window"])))
        except ValidationError:
            continue  # not a window at all: the validation's own error says so
    return [f"alarms.definitions: {problem}" for problem in check_windows(alarm_windows, windows)]


def _describe(error: Any) -> str:
    key = _format_location(tuple(error["loc"]))
    if error["type"] == "extra_forbidden":
        return (
            f"{key}: unknown key (check the spelling; `crystal-monitor print-default-config` "
            "lists every key)"
        )
    return f"{key}: {str(error['msg']).removeprefix('Value error, ')}"


def check_environment(settings: Settings) -> list[str]:
    """Start-up checks that touch the file system; each problem names its key."""
    return check_sections_environment(dict(settings))


def _shadow_problems(path: Path, classes: tuple[str, ...]) -> list[str]:
    from monitor.manifest import ManifestError, load_manifest  # noqa: PLC0415

    try:
        shadow = load_manifest(path)
    except ManifestError as exc:
        return [f"model.shadow.path: {exc}"]
    if shadow.manifest.classes != classes:
        return [
            f"model.shadow.path: the candidate's classes {list(shadow.manifest.classes)} differ "
            f"from the live model's {list(classes)}; a shadow is compared class by class, so "
            "train it on the same class list"
        ]
    return []


def check_sections_environment(sections: Mapping[str, object]) -> list[str]:
    """`check_environment` over the sections that are there (e.g. `ConfigError.sections`,
    those valid alone), so a missing file is reported with the typos in one pass."""
    from monitor.manifest import ManifestError, load_manifest  # noqa: PLC0415

    problems = []
    model, alarms = sections.get("model"), sections.get("alarms")
    if isinstance(model, ModelConfig):
        try:
            loaded = load_manifest(model.path)
        except ManifestError as exc:
            problems.append(f"model.path: {exc}")
        else:
            if isinstance(alarms, AlarmsConfig):
                problems += [
                    f"alarms.definitions: {problem}"
                    for problem in check_classes(alarms.definitions, loaded.manifest.classes)
                ]
            if model.shadow is not None:
                problems += _shadow_problems(model.shadow.path, loaded.manifest.classes)
    opcua, http, mqtt = sections.get("opcua"), sections.get("http"), sections.get("mqtt")
    if isinstance(opcua, OpcUaConfig):
        problems += check_opcua_environment(opcua)
    if isinstance(http, HttpConfig):
        problems += check_http_environment(http)
    if isinstance(mqtt, MqttConfig) and mqtt.enabled:
        from monitor.config.secrets import SecretError, resolve_password  # noqa: PLC0415

        try:
            resolve_password(
                env_var=mqtt.password_env, credential=mqtt.password_credential, section="mqtt"
            )
        except SecretError as exc:
            problems.append(str(exc))
    daemon = sections.get("daemon")
    if isinstance(daemon, DaemonConfig):
        state_dir = daemon.state_dir
        existing = next((p for p in (state_dir, *state_dir.parents) if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK):
            problems.append(f"daemon.state_dir: {state_dir} cannot be created or written")
    backend = sections.get("backend")
    if isinstance(backend, BackendConfig):
        tensorrt = backend.tensorrt
        if (
            backend.type != "onnxruntime"
            and tensorrt.calibration_dir is not None
            and not tensorrt.calibration_dir.is_dir()
        ):
            problems.append(
                f"backend.tensorrt.calibration_dir: folder {tensorrt.calibration_dir} not "
                "found (point it at a folder of crop images)"
            )
    probes = sections.get("probes")
    for index, probe in enumerate(probes if isinstance(probes, tuple) else ()):
        source = probe.source if isinstance(probe, ProbeConfig) else None
        if isinstance(source, FolderSourceConfig) and source.after == "move":
            assert source.done_dir is not None
            if source.done_dir.resolve() == source.path.resolve():
                problems.append(f"probes[{index}].source.done_dir: must differ from source.path")
        particles = probe.particles if isinstance(probe, ProbeConfig) else None
        if (
            isinstance(probe, ProbeConfig)
            and probe.sampling == "particles"
            and particles is not None
            and particles.separation in ("learned", "auto")
        ):
            detector_dir = particles.detector or default_detector_dir()
            if not (detector_dir / DETECTOR_MANIFEST).is_file():
                problems.append(
                    f"probes[{index}].particles.detector: no {DETECTOR_MANIFEST} in "
                    f"{detector_dir} (make one with `python -m model_zoo train-detector`)"
                )
    return problems
