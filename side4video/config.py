"""The config schema (one place), YAML composition, overrides and validation.

A config is a YAML file whose optional `defaults:` list names base files (relative to the file's
folder or any folder above it, without `.yaml`); bases merge in order, then the file itself, then
`key=value` overrides from the command line. Every key is checked against the dataclasses below:
unknown keys, wrong types and values outside an allowed set raise `UserError` with one line that
names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from side4video.errors import UserError, first_line

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def setting(default: Any, help: str, choices: Optional[Sequence[Any]] = None):
    """A schema field: default, one-line meaning, and optionally the allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, help: str):
    """A nested section field."""
    return field(default_factory=cls, metadata={"help": help, "choices": None})


PRECISIONS = ("fp16", "bf16", "fp32")  # names of side4video.precision.DTYPES


# ----------------------------------------------------------------------------------------- data
@dataclass
class S3Config:
    endpoint_url: str = setting("", "S3-compatible endpoint URL; empty: AWS_ENDPOINT_URL or AWS itself")
    access_key_id: str = setting("", "S3 access key id; empty: AWS_ACCESS_KEY_ID / the AWS credential chain")
    secret_access_key: str = setting("", "S3 secret key; empty: AWS_SECRET_ACCESS_KEY / the AWS credential chain")
    region: str = setting("", "S3 region; empty: AWS_DEFAULT_REGION")


@dataclass
class TrainSplitConfig:
    shards: Any = setting("", "shard spec: brace pattern, list of URLs, or a manifest.json URL")
    epoch_samples: int = setting(
        0, "samples per epoch (0: the manifest's count); needed without a manifest or when resampled"
    )


@dataclass
class EvalSplitConfig:
    shards: Any = setting("", "shard spec: brace pattern, list of URLs, or a manifest.json URL (every sample once)")


@dataclass
class RandAugmentConfig:
    enabled: bool = setting(False, "RandAugment, the same ops on every frame of a clip")
    num_ops: int = setting(4, "ops applied per clip (the reference's n)")
    magnitude: float = setting(7.0, "op strength on a 0-10 scale (the reference's m)")
    magnitude_std: float = setting(0.5, "per-clip gaussian noise on the magnitude (the reference's mstd)")
    ops: str = setting(
        "increasing",
        "op set: increasing (timm's -inc1, the reference's: every op grows stronger with "
        "the magnitude) or standard (timm's default: Posterize, Solarize and the enhance ops do not)",
        ("increasing", "standard"),
    )


@dataclass
class DataConfig:
    train: TrainSplitConfig = section(TrainSplitConfig, "training shards")
    val: EvalSplitConfig = section(EvalSplitConfig, "evaluation shards")
    num_classes: int = setting(400, "number of classes of the recognition head")
    frames: int = setting(8, "frames per clip (T)")
    size: int = setting(224, "input frame size (square crop side, px)")
    sampling: str = setting("tsn", "frame sampling: TSN segments or dense clips", ("tsn", "dense"))
    dense_stride: int = setting(2, "frame stride of dense clips")
    resize: List[int] = setting([256], "resize before cropping: [short side] or [height, width]")
    crop_area: List[float] = setting([0.08, 1.0], "random resized crop: area fraction range")
    crop_aspect: List[float] = setting([0.75, 1.3333333], "random resized crop: aspect ratio range")
    flip: bool = setting(True, "random horizontal flip in training")
    flip_label_pairs: List[List[int]] = setting([], "label pairs swapped by a flip, e.g. SSv2 [[86,87],...]")
    randaugment: RandAugmentConfig = section(RandAugmentConfig, "RandAugment")
    grayscale: float = setting(
        0.0, "probability that a training clip turns grey, every frame alike (the reference's Kinetics recipe: 0.2)"
    )
    repeated_views: int = setting(1, "repeated augmentation: differently augmented views of each clip per batch")
    mean: List[float] = setting(CLIP_MEAN, "normalisation mean (RGB, 0-1 scale)")
    std: List[float] = setting(CLIP_STD, "normalisation std (RGB, 0-1 scale)")
    dtype: str = setting(
        "auto",
        "clip tensor dtype; auto: the backbone's compute precision (side4video/precision.py)",
        ("auto",) + PRECISIONS,
    )
    decoder: str = setting(
        "auto", "video decoder: DALI (GPU 'mixed' or CPU), PyAV, or pick by codec", ("auto", "dali", "pyav")
    )
    decode_threads: int = setting(2, "decoder threads per loader")
    max_bad_in_row: int = setting(50, "unusable samples in a row that end the run with one line (0: never)")
    workers: int = setting(1, "stream reader workers per rank")
    prefetch: int = setting(2, "decoded batches prepared ahead of the training step")
    shuffle_buffer: int = setting(64, "samples (compressed bytes) in the shuffle buffer")
    interleave: int = setting(
        4,
        "training: shards each reader streams from at once, a sample from each in turn (mixes shards "
        "written in class order; README 'Mixing'); 1: one shard after another",
    )
    shuffle_shards: bool = setting(True, "shuffle the shard list every epoch")
    resampled: bool = setting(False, "infinite stream: shards drawn with replacement")
    seed: int = setting(0, "seed of the data order (with epoch, rank and worker)")
    s3: S3Config = section(S3Config, "object storage access")
    allow_pipe: bool = setting(False, "allow pipe: shard URLs (they run shell commands)")
    retries: int = setting(6, "attempts per shard read on connection errors and 5xx")
    retry_backoff: float = setting(0.5, "first retry delay in seconds, doubled each attempt")
    read_chunk: int = setting(
        1 << 20,
        "read buffer of an http(s)/s3 shard stream (one GET per shard; a failed read resumes at the byte reached)",
    )
    timeout: float = setting(60.0, "seconds before a stalled http(s)/s3 connection counts as failed (then retried)")


# ---------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    name: str = setting(
        "ViT-B-16",
        "open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14, EVA02-L-14, EVA02-E-14) "
        "or ViT-T-16 / ViT-T-8 (tiny: tests, demo)",
    )
    weights: str = setting("", "local open_clip/EVA checkpoint file; empty: random init")
    precision: str = setting("fp16", "storage precision of the frozen weights", PRECISIONS)
    convert_weights: bool = setting(
        False,
        "allow storing a half-precision checkpoint (fp16 or bf16) in the other half precision: values are rounded "
        "and one line counts those that changed; false: such a load is refused",
    )
    compute_precision: str = setting(
        "auto", "compute precision; auto: storage precision on GPU, fp32 on CPU", ("auto",) + PRECISIONS
    )
    fp32_blocks: List[int] = setting(
        [],
        "backbone blocks (0-based) computed in fp32 from their half-precision weights, for a checkpoint whose "
        "activations overflow fp16 inside them; the others compute in the compute precision",
    )
    quick_gelu: bool = setting(False, "QuickGELU MLP activation (OpenAI CLIP weights)")
    width: int = setting(0, "override: transformer width (0: from the model name)")
    layers: int = setting(0, "override: number of blocks (0: from the model name)")
    heads: int = setting(0, "override: attention heads (0: from the model name)")
    patch_size: int = setting(0, "override: patch size (0: from the model name)")
    embed_dim: int = setting(0, "override: output projection width, retrieval's embedding (0: from the model name)")


@dataclass
class SideConfig:
    dim: int = setting(320, "side network width d")
    layers: Any = setting("auto", "backbone layers feeding side blocks: auto, all, every_other or a list of indices")
    variant: str = setting(
        "auto", "side block: clip (pre-norm) or eva (post-norm); auto follows the backbone", ("auto", "clip", "eva")
    )
    heads: int = setting(0, "side attention heads (0: d // 64, at least 1)")
    checkpointing: bool = setting(False, "activation checkpointing of side blocks")
    drop_path: float = setting(0.0, "stochastic depth rate of side blocks")


@dataclass
class AdapterConfig:
    dim: int = setting(64, "bottleneck width of the ST-Adapter baseline")
    kernel: int = setting(3, "temporal kernel of the adapter's depthwise conv")


@dataclass
class HeadConfig:
    dropout: float = setting(0.0, "dropout before the classifier")


@dataclass
class TextConfig:
    trainable: bool = setting(
        True,
        "retrieval: train the text tower at train.lr * model.retrieval.coef_lr (as the reference); "
        "false: frozen, cheaper",
    )
    max_words: int = setting(
        32, "retrieval: tokens per caption, SOT and EOT included; longer captions are cut (the reference's 32)"
    )
    width: int = setting(0, "override: text transformer width (0: from the model name)")
    layers: int = setting(0, "override: text transformer blocks (0: from the model name)")
    heads: int = setting(0, "override: text attention heads (0: from the model name)")
    vocab_size: int = setting(
        0, "override: vocabulary size (0: from the model name; open_clip's tokenizer needs 49408)"
    )


@dataclass
class RetrievalConfig:
    similarity: str = setting(
        "wti",
        "text-video similarity: weighted token interaction (the reference's) or mean-pooled cosine (meanP)",
        ("wti", "meanp"),
    )
    coef_lr: float = setting(
        1e-3, "learning-rate factor of the CLIP towers and the logit scale (reference: 1e-4 x 1e-3 = 1e-7)"
    )
    logit_scale_max: float = setting(
        4.605170185988092, "upper bound of the logit scale parameter, ln(100), applied after every optimizer step"
    )


@dataclass
class ModelConfig:
    method: str = setting("side4video", "what is trained", ("side4video", "adapter", "full", "linear_probe"))
    backbone: BackboneConfig = section(BackboneConfig, "frozen image backbone")
    side: SideConfig = section(SideConfig, "side network")
    adapter: AdapterConfig = section(AdapterConfig, "ST-Adapter baseline")
    head: HeadConfig = section(HeadConfig, "classification head")
    text: TextConfig = section(TextConfig, "text tower (task: retrieval)")
    retrieval: RetrievalConfig = section(RetrievalConfig, "text-video retrieval (task: retrieval)")


# ---------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    output_dir: str = setting("runs/default", "run directory: config, metrics, checkpoints, plots")
    device: str = setting(
        "auto",
        "auto: a GPU when torch sees one (and SLURM gave none: refused); cuda: refused "
        "without one; cpu: CPU ranks even on a GPU host",
        ("auto", "cuda", "cpu"),
    )
    batch_size: int = setting(8, "clips per process per step (before repeated views)")
    grad_accum: int = setting(1, "micro-batches per optimizer step (gradient accumulation)")
    epochs: int = setting(30, "training epochs")
    steps_per_epoch: int = setting(0, "optimizer steps per epoch (0: the loader's batches per epoch // grad_accum)")
    max_steps: int = setting(0, "length of the run in steps, sets the LR schedule (0: epochs decide)")
    stop_at_step: int = setting(0, "checkpoint and exit at this step, schedule unchanged; resume later (0: off)")
    lr: float = setting(1e-3, "peak learning rate (for the global batch as configured)")
    min_lr: float = setting(0.0, "learning rate at the end of the cosine")
    warmup_epochs: float = setting(4.0, "linear warmup length in epochs")
    optimizer: str = setting("adamw", "optimizer", ("adamw", "sgd"))
    betas: List[float] = setting([0.9, 0.999], "AdamW betas")
    eps: float = setting(1e-8, "AdamW epsilon")
    weight_decay: float = setting(0.15, "weight decay")
    decay_norm_and_bias: bool = setting(
        True, "also decay norm weights, biases and position embeddings (as the reference)"
    )
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy")
    grad_clip: float = setting(0.0, "gradient norm clipping (0: off)")
    seed: int = setting(0, "seed of model init and augmentation")
    log_every: int = setting(10, "steps between logged metrics")
    eval_every: int = setting(1, "epochs between evaluations (0: only at the end)")
    save_every: int = setting(0, "steps between checkpoints (0: at the end of each epoch)")
    keep_checkpoints: int = setting(3, "checkpoints kept (older ones deleted)")
    resume: str = setting("auto", "auto: from output_dir's latest checkpoint; none; or a checkpoint path")
    keep_global_batch: bool = setting(
        True,
        "resuming on another number of ranks keeps the saved global batch by changing grad_accum "
        "(false: the configured grad_accum, another global batch)",
    )
    max_bad_steps: int = setting(5, "consecutive non-finite losses before stopping")
    export: bool = setting(True, "export model.safetensors + model.json at the end")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = setting(2, "ZeRO stage", (0, 1, 2, 3))
    precision: str = setting("fp32", "precision of the trained parameters and activations", PRECISIONS)
    loss_scale: float = setting(0.0, "fp16 static loss scale (0: dynamic)")
    initial_scale_power: int = setting(16, "fp16 dynamic loss scale starts at 2**this")
    offload_param: str = setting("none", "ZeRO-3 parameter offload", ("none", "cpu", "nvme"))
    offload_optimizer: str = setting("none", "optimizer state offload (ZeRO >= 1)", ("none", "cpu", "nvme"))
    nvme_path: str = setting("/local_nvme", "folder for nvme offload")
    prefetch: str = setting(
        "auto",
        "ZeRO-3: gather parameters ahead of their module (auto: on GPUs; never: only while used, less memory)",
        ("auto", "always", "never"),
    )
    timeout_minutes: int = setting(30, "collective timeout")


# ----------------------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    crops: int = setting(1, "spatial crops per clip (1: centre, 3: left/centre/right)", (1, 3))
    clips: int = setting(1, "temporal clips per video")
    batch_size: int = setting(0, "videos per process per step (0: train.batch_size)")
    max_batches: int = setting(0, "stop after this many batches (0: whole split)")
    dual_softmax: bool = setting(
        False, "retrieval: also report metrics after dual-softmax re-ranking (separately, never mixed in)"
    )
    text_batch_size: int = setting(64, "retrieval: captions per text-tower forward pass in evaluation")
    similarity_chunk: int = setting(
        1 << 26,
        "retrieval: largest texts x videos x tokens x frames block of the similarity computed at once (elements)",
    )


# ---------------------------------------------------------------------------------------- slurm
@dataclass
class SlurmConfig:
    nodes: int = setting(1, "nodes")
    gpus_per_node: int = setting(0, "GPUs per node, one task each (0: CPU job, tasks_per_node decides)")
    tasks_per_node: int = setting(1, "tasks per node when gpus_per_node is 0")
    cpus_per_task: int = setting(1, "CPUs per task")
    mem_gb: int = setting(0, "memory per node in GB (0: cluster default)")
    time_minutes: int = setting(60, "time limit")
    partition: str = setting("", "partition")
    account: str = setting("", "account")
    qos: str = setting("", "quality of service")
    constraint: str = setting("", "node constraint")
    job_name: str = setting("side4video", "job name")
    log_folder: str = setting("", "submitit log folder (empty: OUTPUT_DIR/slurm)")
    signal_delay_s: int = setting(120, "seconds before the time limit at which the job is signalled")
    max_requeues: int = setting(10, "requeues after preemption or timeout")
    additional: Dict[str, Any] = setting({}, "extra sbatch options, e.g. {exclusive: true}")
    setup: List[str] = setting([], "shell lines run before the job (module load ...)")


# -------------------------------------------------------------------------------------- logging
@dataclass
class LoggingConfig:
    level: str = setting("info", "log level", ("debug", "info", "warning", "error"))
    all_ranks: bool = setting(False, "every rank prints (else rank 0 only)")
    progress: bool = setting(True, "progress bar on rank 0")
    tensorboard: bool = setting(True, "TensorBoard scalars under OUTPUT_DIR/tensorboard")
    plots: bool = setting(True, "PNG plots of curves and the confusion matrix at the end")
    sample_keys: bool = setting(
        False,
        "also log the keys of each logged step's clips (every rank's, in rank order) in metrics.jsonl: "
        "checks of the data order, e.g. across a resume",
    )


@dataclass
class Config:
    task: str = setting(
        "recognition",
        "what the run learns: video classification, or text-video retrieval (captions from the shards' json)",
        ("recognition", "retrieval"),
    )
    data: DataConfig = section(DataConfig, "data")
    model: ModelConfig = section(ModelConfig, "model")
    train: TrainConfig = section(TrainConfig, "training")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed engine")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    slurm: SlurmConfig = section(SlurmConfig, "SLURM submission")
    logging: LoggingConfig = section(LoggingConfig, "logging")
    checkpoint: str = setting("", "checkpoint or exported model to evaluate/predict with")


# ------------------------------------------------------------------------------------- loading
SECRET_KEY = re.compile(r"(secret|token|password|passwd|access_key|api_key|credential)", re.I)
REDACTED = "***"


def schema_fields(cls=Config, prefix: str = ""):
    """Yield (dotted key, dataclasses.Field, is_section) for the whole schema."""
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section = dataclasses.is_dataclass(f.type) or (
            f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
        )
        yield key, f, section
        if section:
            yield from schema_fields(f.default_factory, key + ".")


def _type_name(f) -> str:
    return getattr(f.type, "__name__", None) or str(f.type).replace("typing.", "")


def _suggest(bad: str, section: str) -> str:
    """'did you mean' over the keys of the section that holds the bad key."""
    siblings = (
        [k for k, _, _ in schema_fields() if k.rsplit(".", 1)[0] == section and k != section]
        if section
        else [f.name for f in dataclasses.fields(Config)]
    )
    leaf = bad.rsplit(".", 1)[-1]
    names = {k.rsplit(".", 1)[-1]: k for k in siblings}
    close = difflib.get_close_matches(leaf, list(names), n=1, cutoff=0.6)
    return f" (did you mean {names[close[0]]}?)" if close else ""


def _explain(err: OmegaConfBaseException, where: str) -> UserError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "Key '" in str(err) and "not in struct" in str(err):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        return UserError(f"{where}: unknown config key '{key}'{_suggest(key, section)}")
    if isinstance(err, ValidationError):
        fields = {k: f for k, f, _ in schema_fields()}
        expected = _type_name(fields[key]) if key in fields else "another type"
        value = getattr(err, "value", None)
        msg = first_line(err)
        got = f"got {value!r}" if value is not None else msg
        return UserError(f"{where}: config key '{key}' expects {expected}, {got}")
    return UserError(f"{where}: {first_line(err)}")


def _find_base(name: str, start: Path) -> Path:
    """A base named in `defaults:`: looked up from the file's folder upwards."""
    for folder in [start, *start.parents]:
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    raise UserError(f"{start}: base config '{name}' not found in this folder or above")


def _read_yaml(path: Path, chain: tuple = ()) -> DictConfig:
    """Read one YAML file with its bases merged in, bases first. Untyped: validated later."""
    path = path.resolve()
    if path in chain:
        raise UserError(f"{path}: config defaults form a cycle: {' -> '.join(p.name for p in chain + (path,))}")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors come in many types
        raise UserError(f"{path}: not a valid YAML config: {first_line(e)}") from None
    if not isinstance(raw, DictConfig):
        raise UserError(f"{path}: a config must be a mapping of sections")
    defaults = raw.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, (list, ListConfig)):
        raise UserError(f"{path}: 'defaults' must be a list of base config names")
    merged = OmegaConf.create()
    for name in defaults:
        merged = OmegaConf.merge(merged, _read_yaml(_find_base(str(name), path.parent), chain + (path,)))
    return OmegaConf.merge(merged, raw)


def _merge_checked(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"overrides: {first_line(e)}") from None


def _check_choices(cfg: DictConfig) -> None:
    for key, f, section in schema_fields():
        choices = f.metadata.get("choices")
        if section or not choices:
            continue
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            allowed = ", ".join(str(c) for c in choices)
            raise UserError(f"config key '{key}' is {value!r}; allowed: {allowed}")


def _check_values(cfg: DictConfig) -> None:
    """Checks a type alone cannot express."""
    layers = cfg.model.side.layers
    if isinstance(layers, str):
        if layers not in ("auto", "all", "every_other"):
            raise UserError(
                f"config key 'model.side.layers' is {layers!r}; "
                "allowed: auto, all, every_other or a list of layer indices"
            )
    elif not (isinstance(layers, ListConfig) and all(isinstance(i, int) and i >= 0 for i in layers)):
        raise UserError(
            "config key 'model.side.layers' must be auto, all, every_other or a list of non-negative integers"
        )
    for split in ("train", "val"):
        if cfg.data[split].shards is None:  # `data.val.shards=` on the command line
            cfg.data[split].shards = ""
        shards = cfg.data[split].shards
        ok = isinstance(shards, str) or (isinstance(shards, ListConfig) and all(isinstance(s, str) for s in shards))
        if not ok:
            raise UserError(f"config key 'data.{split}.shards' must be a string or a list of strings")
    if len(cfg.data.resize) not in (1, 2):
        raise UserError("config key 'data.resize' must be [short_side] or [height, width]")
    for key in ("crop_area", "crop_aspect"):
        lo_hi = list(cfg.data[key])
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise UserError(f"config key 'data.{key}' must be [low, high] with 0 < low <= high")
    if not 0.0 <= cfg.data.grayscale <= 1.0:
        raise UserError(f"config key 'data.grayscale' is a probability in [0, 1], got {cfg.data.grayscale}")
    positive = [
        "data.frames",
        "data.size",
        "data.num_classes",
        "train.batch_size",
        "train.grad_accum",
        "model.side.dim",
        "data.repeated_views",
        "eval.clips",
        "data.workers",
        "data.interleave",
    ]
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            raise UserError(f"config key '{key}' must be at least 1, got {OmegaConf.select(cfg, key)}")
    if cfg.deepspeed.offload_param != "none" and cfg.deepspeed.zero_stage != 3:
        raise UserError("config key 'deepspeed.offload_param' needs deepspeed.zero_stage=3")


def load_config(
    path: Optional[str | Path] = None, overrides: Sequence[str] = (), base: Optional[Dict[str, Any]] = None
) -> DictConfig:
    """Compose YAML file(s) and `key=value` overrides onto the schema; validate; return it typed.

    `base` (a plain dict, e.g. the config stored with an exported model) merges before the file.
    """
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge_checked(cfg, OmegaConf.create(base), "stored config")
    if path is not None:
        cfg = _merge_checked(cfg, _read_yaml(Path(path)), str(path))
    cfg = _merge_checked(cfg, _parse_overrides(overrides), "overrides")
    _check_choices(cfg)
    _check_values(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def redacted(cfg: DictConfig) -> Dict[str, Any]:
    """Plain dict of the config with secrets (keys, tokens, passwords) replaced by ***."""

    def walk(node):
        if isinstance(node, dict):
            return {
                k: (REDACTED if SECRET_KEY.search(str(k)) and v not in ("", None) else walk(v)) for k, v in node.items()
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(OmegaConf.to_container(cfg, resolve=True))


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, secrets redacted."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)))


def describe_schema() -> str:
    """Every key with its type, default and meaning (for `side4video config --schema`)."""
    lines = []
    for key, f, section in schema_fields():
        if section:
            lines.append(f"{key}:  # {f.metadata['help']}")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        allowed = f" [{'|'.join(str(c) for c in choices)}]" if choices else ""
        lines.append(f"  {key} = {default!r}{allowed}  # {f.metadata['help']}")
    return "\n".join(lines)
