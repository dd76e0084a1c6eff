"""Suite configuration: pydantic schemas that ``configs/*.yaml`` validate against.

A *suite* is one base task plus sub-tasks, each trained through the sharing steps. The suite
config expands into small :class:`StageSpec` objects (``stages.plan``), one per stage; the
training loop reads nothing else. Unknown keys are errors (``extra="forbid"``) so a typo in
YAML or in ``--set`` fails loudly, naming the key.

Path strings may contain ``{workdir}``; it is replaced by the run's work directory.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STEPS = ("step1", "step2", "step3")
STAGE_KINDS = ("base", "step0") + STEPS


class ConfigError(ValueError):
    """Bad user input in a config: the message names the field (exit code 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SynthConfig(_Strict):
    """Generate a synthetic dataset at ``dataset.root`` when it does not exist yet."""

    n: int = Field(160, gt=0, description="number of images (train + val); ignored with sequences")
    size: int = Field(64, gt=0, description="image side in pixels")
    seed: int = 0
    sequences: int | None = Field(None, ge=2, description="write frame sequences (video) instead of still images")
    frames: int = Field(16, ge=2, description="frames per sequence")
    camera: Literal["moving", "static"] = Field("moving", description="sequences: camera motion")


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_PREFIXES = ("hf-hub:", "hf_hub:")  # timm's Hugging Face hub model names


def names_weight_file(source: str) -> bool:
    """Whether a ``model.pretrained`` value means a local weight file (an existing path, a weight
    suffix, or a path with a directory) rather than a timm / Hugging Face hub model name."""
    if source.startswith(HUB_PREFIXES):
        return False
    return Path(source).exists() or Path(source).suffix in WEIGHT_SUFFIXES or "/" in source


def _absolute(path: str) -> str:
    """Relative paths are relative to where the launcher runs; stages run elsewhere (Ray Train
    workers change directory), so paths are made absolute when the config is read."""
    return str(Path(path).expanduser().absolute())


class DatasetConfig(_Strict):
    name: Literal["pascal_context", "nyud"]
    root: str = Field(description="dataset root in the real on-disk layout (relative: to the current directory)")
    img_size: int = Field(gt=0, description="train crop / val pad size (must be divisible by the patch size)")
    synthesize: SynthConfig | None = Field(None, description="generate synthetic data here on first use")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    holdout: int = Field(32, ge=2, description="images at the end of the train split that no stage trains on: "
                         "the calibration set of the sub-tasks' operating points (never the val split)")

    @field_validator("root")
    @classmethod
    def _root_absolute(cls, v: str) -> str:
        return _absolute(v)


class ModelConfig(_Strict):
    flavor: str = Field("vit_debug", description="vit_debug | vit_mini | vit_tiny | vit_small | vit_base | vit_large")
    patch_size: int = Field(16, gt=0)
    pretrained: str | None = Field(None, description="local weight file or timm model name; loaded strictly")

    @field_validator("pretrained")
    @classmethod
    def _local_file_absolute(cls, v: str | None) -> str | None:
        return _absolute(v) if v and names_weight_file(v) else v

    @field_validator("flavor")
    @classmethod
    def _known_flavor(cls, v: str) -> str:
        from mtshare.models.vit import FLAVORS

        if v not in FLAVORS:
            raise ValueError(f"unknown flavor '{v}' (known: {', '.join(FLAVORS)})")
        return v


class OptimConfig(_Strict):
    """How one stage trains. Learning rates: ``lr`` for dense weights (heads; the whole model in
    base/step0), ``lr_delta`` for δ, ``lr_alpha`` for the gate logits."""

    iters: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0, description="per worker")
    lr: float = Field(1e-3, gt=0)
    lr_delta: float = Field(2e-5, gt=0)
    lr_alpha: float = Field(0.1, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    warmup_iters: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, description="max global grad norm over trained tensors; null = off")
    l0_lambda: float = Field(0.0, ge=0, description="step1 fixed L0 weight λ on the expected non-zero count "
                             "(the reference's form); use target_weight_sparsity instead to get a sparsity")
    target_weight_sparsity: float | None = Field(
        None, ge=0, lt=1, description="step1: fraction of zero delta weights to reach; λ (on the mean expected "
        "L0) is adapted during training and the smallest deltas are closed at the end if it falls short")
    delta_gates: Literal["element", "column"] = Field(
        "element", description="step1 gate structure: 'element' = one L0 gate per delta entry (the reference's); "
        "'column' = one per input column of each weight matrix, so whole columns of δ open or close and the "
        "engine runs the delta as a small dense GEMM on the gathered columns instead of a CSR product")
    act_penalty: Literal["row", "element"] = Field(
        "row", description="step3 penalty: 'row' = group lasso on the token rows of the four linear inputs the "
        "engine thresholds, normalised by the base rows' norm and by the task loss (weight act_row); 'element' = the reference's c·Σ|a_s − a_b| on six outputs "
        "(weight act_l1)")
    act_row: float = Field(0.0, ge=0, description="step3 weight of the row penalty (act_penalty: row), relative to "
                           "the task loss: 1.0 adds the task loss x the mean relative row delta")
    act_temporal: float | None = Field(
        None, ge=0, description="step3 (act_penalty: row) on a dataset of frame sequences: weight of the temporal row "
        "penalty (the same four linear inputs, ‖x_t − x_(t−1)‖₂ per token row between consecutive frames of the "
        "sub-task, normalised like act_row), trained on 2-frame clips. null = act_row when the dataset has "
        "sequences, else off; 0 = off")
    train_row_density: float | None = Field(
        None, gt=0, le=1, description="step3 (act_penalty: row): train through the engine's row skipping: at "
        "each of the four linear inputs only this fraction of token rows (largest delta first) keeps its own "
        "activation, the rest take the base's; eased in from 1 over the first half of the iterations. "
        "null = off")
    act_l1: float = Field(0.0, ge=0, description="step3 weight c of the reference's element L1 (act_penalty: element)")
    eval_every: int = Field(100, gt=0)
    edge_thresholds: int = Field(99, gt=0, description="ODS-F thresholds for edge evaluation (99 = BSDS; fewer is faster)")
    ckpt_every: int = Field(50, gt=0, description="mid-stage resume checkpoint interval (iterations)")
    log_every: int = Field(10, gt=0)
    fail_at_iter: int | None = Field(None, description="fault injection: the loss becomes NaN at this iteration")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "OptimConfig":
        if self.warmup_iters >= self.iters:
            raise ValueError(f"warmup_iters ({self.warmup_iters}) must be < iters ({self.iters})")
        if self.train_row_density is not None and self.act_penalty != "row":
            raise ValueError("train_row_density needs act_penalty: row (the engine skips linear-input rows)")
        if self.target_weight_sparsity is not None and self.l0_lambda > 0:
            raise ValueError("l0_lambda: set either a fixed l0_lambda or target_weight_sparsity, not both")
        return self


class CalibrationConfig(_Strict):
    """The operating point of every sub-task: per-layer τ calibrated after its last sharing step on
    the ``dataset.holdout`` images, so that its metric stays within ``tolerance`` (relative) of its
    exact (τ = 0) metric. ``margin`` < 1 aims below the tolerance on the calibration images, to
    leave room for the val split."""

    tolerance: float = Field(0.01, gt=0, lt=1, description="allowed relative metric loss vs τ = 0")
    margin: float = Field(0.5, gt=0, le=1, description="calibrate to margin × tolerance")
    steps: int = Field(10, gt=0, description="bisection steps on the kept row density")
    per_layer: bool = Field(False, description="then lower each layer's density alone where the metric allows "
                            "(up to 3 more engine passes per layer; pays on smooth metrics, overfits noisy ones "
                            "on a small holdout: see docs/method.md)")
    plan: Literal["time", "flops"] = Field(
        "time", description="time: a layer skips rows only where that beats its merged GEMM on the measured CPU "
        "crossover for its shape (SparsePolicy.gather_limit; narrow layers run merged unless most rows skip); "
        "flops: wherever it saves FLOPs, up to SparsePolicy.gather_max of the rows (can be slower than dense "
        "on narrow layers)")
    edge_thresholds: int | None = Field(
        None, gt=0, description="ODS-F thresholds of the edge calibration criterion (the bisection on the "
        "holdout); null: the step's optim.edge_thresholds. The reported val figures always use "
        "optim.edge_thresholds (99: BSDS). ODS-F's cost grows with its thresholds: 25 cost about 0.3x of 99 "
        "(docs/architecture.md, At real scale)")


class StreamConfig(_Strict):
    """Video streams (``mtshare.stream``): on a dataset of frame sequences, the base stage and
    every sub-task's last sharing step calibrate their temporal τ on the holdout frames (the
    base's first: it feeds the sub-tasks) and measure the stream on the whole val split, clip
    by clip; ``report`` shows the per-frame figures. Keyframe interval and split layer are
    suite-wide: the served stream runs with them."""

    keyframe_every: int = Field(8, ge=1, description="a full frame every K frames")
    split_layer: int | None = Field(None, ge=0, description="sub-tasks use their own temporal caches from this block "
                                    "on (default: half the depth)")
    tolerance: float = Field(0.01, gt=0, lt=1, description="allowed relative metric loss vs the stream at τ = 0")
    margin: float = Field(0.5, gt=0, le=1, description="calibrate to margin × tolerance")
    steps: int = Field(8, gt=0, description="bisection steps on κ")


class StagesConfig(_Strict):
    base: OptimConfig = OptimConfig()
    step0: OptimConfig = OptimConfig()
    step1: OptimConfig = OptimConfig(target_weight_sparsity=0.9)
    step2: OptimConfig = OptimConfig()
    step3: OptimConfig = OptimConfig(act_row=0.5)


class ResourcesConfig(_Strict):
    workers: int = Field(1, gt=0, description="Ray Train workers per stage (data parallel)")
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each worker needs")
    task_resources: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per task: extra custom resources pinning its pipeline to nodes"
    )
    start_timeout_s: float = Field(
        600, gt=0, description="how long a stage's worker group may take to start (placement, imports) before "
        "Ray Train gives up; a real cluster may wait for nodes"
    )
    collective_timeout_s: int = Field(
        1800, gt=0, description="timeout of one collective (all-reduce, barrier) in a stage's process group "
        "(Ray Train's TorchConfig.timeout_s): how long a rank may wait for the others before the group is "
        "aborted and the stage restarts from its last checkpoint. Every end-of-stage evaluation is sharded, "
        "so no rank waits longer than about one batch; raise it for very slow storage or data loading"
    )


class SuiteConfig(_Strict):
    name: str = Field(description="suite name: letters, digits, _ . - (used in paths)")
    dataset: DatasetConfig
    model: ModelConfig = ModelConfig()
    base_task: str = "semseg"
    tasks: list[str] = Field(description="sub-tasks sharing the base")
    steps: list[Literal["step1", "step2", "step3"]] = Field(default_factory=lambda: list(STEPS))
    references: bool = Field(True, description="also train dense step0 references (for Δm)")
    train: StagesConfig = StagesConfig()
    task_overrides: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="per task, per stage kind: OptimConfig fields to override"
    )
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    calibration: CalibrationConfig = CalibrationConfig()
    stream: StreamConfig | None = Field(None, description="video: calibrate and measure the temporal stream "
                                        "(the dataset must hold frame sequences)")
    resources: ResourcesConfig = ResourcesConfig()
    deepspeed: str = Field("configs/deepspeed/zero2.json", description="DeepSpeed JSON (ZeRO stage etc.)")
    storage: str | None = Field(None, description="local path or s3://bucket/prefix; default {workdir}/store")
    s3_endpoint: str | None = Field(None, description="endpoint URL of an S3-compatible server")
    tracking_uri: str | None = Field(None, description="MLflow URI; default sqlite:///{workdir}/mlflow.db")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not SAFE_NAME.match(v):
            raise ValueError(f"'{v}' is not a safe name (letters, digits, _ . -; max 64)")
        return v

    @model_validator(mode="after")
    def _check_tasks(self) -> "SuiteConfig":
        from mtshare.tasks import TASKS

        for field, t in [("base_task", self.base_task), *(("tasks", t) for t in self.tasks)]:
            if t not in TASKS:
                raise ValueError(f"{field}: unknown task '{t}' (known: {', '.join(TASKS)})")
        if not self.tasks:
            raise ValueError("tasks: the list of sub-tasks is empty")
        if self.base_task in self.tasks:
            raise ValueError(f"tasks: '{self.base_task}' is the base task and cannot also be a sub-task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks: duplicate task")
        if list(self.steps) != list(STEPS[: len(self.steps)]):  # []: the base (and references) only
            raise ValueError(f"steps: must be a prefix of {list(STEPS)} in order, got {list(self.steps)}")
        g = self.resources.gpus_per_worker
        if self.device == "cuda" and (g < 1 or g != int(g)):
            raise ValueError(f"resources.gpus_per_worker: device cuda needs a whole number of GPUs per worker "
                             f"(>= 1), got {g:g}")
        if self.steps and self.dataset.holdout < self.resources.workers:
            raise ValueError(f"dataset.holdout: {self.dataset.holdout} images cannot be shared by resources.workers "
                             f"{self.resources.workers} (every rank calibrates on its own share of the holdout)")
        if self.dataset.img_size % self.model.patch_size:
            raise ValueError(
                f"dataset.img_size {self.dataset.img_size} is not divisible by model.patch_size {self.model.patch_size}"
            )
        if self.stream is not None and self.stream.split_layer is not None:
            from mtshare.models.vit import FLAVORS

            depth = FLAVORS.get(self.model.flavor, {}).get("depth")
            if depth is not None and self.stream.split_layer > depth:
                raise ValueError(f"stream.split_layer: {self.stream.split_layer} is beyond the {depth} blocks of "
                                 f"{self.model.flavor}")
        for task, per_stage in self.task_overrides.items():
            if task not in self.tasks and task != self.base_task:
                raise ValueError(f"task_overrides.{task}: not a task of this suite")
            for kind, fields in per_stage.items():
                if kind not in STAGE_KINDS:
                    raise ValueError(f"task_overrides.{task}.{kind}: unknown stage kind (known: {', '.join(STAGE_KINDS)})")
                try:
                    OptimConfig(**{**getattr(self.train, kind).model_dump(), **fields})
                except ValidationError as e:
                    raise ValueError(f"task_overrides.{task}.{kind}: {_first_error(e)}") from None
        return self

    def optim_for(self, task: str, kind: str) -> OptimConfig:
        base = getattr(self.train, kind).model_dump()
        return OptimConfig(**{**base, **self.task_overrides.get(task, {}).get(kind, {})})


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _substitute(obj: Any, workdir: str) -> Any:
    if isinstance(obj, str):
        return obj.replace("{workdir}", workdir)
    if isinstance(obj, dict):
        return {k: _substitute(v, workdir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, workdir) for v in obj]
    return obj


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b.c=value`` (value parsed as YAML). The key must already exist in the
    schema; pydantic's ``extra="forbid"`` reports it otherwise."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: the value {value!r} is not YAML ({e.problem}); quote it: "
                              f"--set {key}='\"{value}\"'") from None
    return raw


def read_mapping(path: str | Path, fmt: Literal["YAML", "JSON"] = "YAML", field: str = "") -> dict:
    """A YAML (safe loader) or JSON file whose top level is a mapping. Errors are
    :class:`ConfigError` naming the file, after ``field`` when the file comes from a config field."""
    import json

    path = Path(path)
    where = f"{field}: {path}" if field else str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    try:
        raw = yaml.safe_load(text) if fmt == "YAML" else json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping")
    return raw


def load_suite_config(path: str | Path, overrides: list[str] = (), workdir: str | None = None) -> SuiteConfig:
    """Read, override and validate a suite YAML. Raises :class:`ConfigError` naming the field."""
    raw = apply_overrides(read_mapping(path), list(overrides))
    return validate_suite(raw, source=str(path), workdir=workdir)


def validate_suite(raw: dict, source: str = "config", workdir: str | None = None) -> SuiteConfig:
    if workdir is None:
        workdir = str(Path("runs") / str(raw.get("name", "suite")))
    try:
        return SuiteConfig(**_substitute(raw, str(workdir)))
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_error(e)}") from None
