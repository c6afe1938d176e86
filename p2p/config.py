"""The training config: a pydantic model, loaded from YAML and validated before any work starts.

Every field is documented where it is declared; `jobs/configs/*.yaml` are examples. An unknown
field, a value of the wrong type or out of range is one error line that names the file and the
field (`load_config`). The same loader reads the refresh job's config (pipelines/refresh.py).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from p2p.errors import P2PError
from p2p.profile.config import ProfileConfig

PROFILE = ProfileConfig()  # the profile settings' defaults, in one place

Positive = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
AtLeastZero = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class FieldError(ValueError):
    """A value a validator refuses, naming the field (cross-field checks have no location of their own)."""

    def __init__(self, field: str, why: str):
        super().__init__(why)
        self.field, self.why = field, why


class StrictConfig(BaseModel):
    """Unknown fields are errors; values are not coerced (a string is not an integer), ints may be floats."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


class TrainConfig(StrictConfig):
    # --- model -------------------------------------------------------------------------------
    base: str = "smollm2-135m"  # base LLM: smollm2-135m, tiny-random, HF id or local directory
    encoder: str = "minilm"  # profile encoder: minilm, wordllama, hashing (tests), none, or a sentence-transformers path
    preset: str = "small"  # hypernetwork sizes: small (CPU) or paper
    rank: Positive = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (exports stay exact either way)
    targets: Annotated[list[str], Field(min_length=1)] = ["q_proj", "v_proj"]  # modules that get adapters
    top_k_layers: Positive | None = None  # adapters on the top K layers only (None: all layers)
    cache_prefix: bool = True  # with top K layers: cache the frozen layers' outputs per example
    cache_max_bytes: int = 2 << 30  # per worker; past it, prefixes are recomputed instead of stored
    profile_top_k: int = PROFILE.top_k  # history items quoted in each profile
    profile_max_chars: int = PROFILE.max_chars  # bound on a profile's length (900: fits MiniLM's 256-token window)
    profile_features: AtLeastZero = 256  # label-statistics dimensions appended to the text embedding (0: none)
    standardize_inputs: bool = True  # standardize embeddings with the training users' mean and std
    head_init_std: float = 1e-5  # initial head weights (0: zero heads, whose trunk gets no gradient at step 0)
    head_output_scale: float | None = None  # heads emit bias + scale * (W h); None: 1/sqrt(head_in)
    # Write the label statistics into the residual stream along each label's output embedding, with a
    # learned gain (p2p/model/label_binding.py): needs profile_features and an o_proj or down_proj target.
    label_binding: bool = False
    # Where the binding's gain starts: the spread (std over users) of the logit gap between labels it
    # writes, in nats. 1 was too weak to move the answers of a trained model; 3 makes the untrained
    # model answer like the count rule on val users (docs/quality.md).
    label_binding_nats: PositiveFloat = 3.0
    # False: the binding's read and gain stay at their start and only the rest of the hypernet trains
    # around them. An ablation: it scored below the trained binding on val users (docs/quality.md).
    label_binding_trained: bool = True
    # True: rank column 0 of each bound module carries the binding alone, and its read stays at its start
    # (the gain trains). Shared with the heads, the column's A[0] . x at the answer position was learned
    # into a factor that changed sign from user to user and layer to layer, so the trained binding wrote
    # its shares with a random sign (docs/quality.md, "The binding's column").
    label_binding_exclusive: bool = False
    # The binding gain's learning rate, as a multiple of `lr`. Adam moves a weight by about lr per step, and
    # the gain starts near 0.25, so at 1 it can change by less than itself in a 300-step run.
    label_binding_lr_scale: PositiveFloat = 1.0
    # Label gate (p2p/model/label_gate.py): after training, rank columns 0..n-1 of the top layer's
    # `label_gate_module` (the MLP's output projection, a target) write each of the n task labels'
    # shares of the user's answers where the question offers that label; fitted on
    # `label_gate_examples` training examples (p2p/train/gate_fit.py). Needs profile_features and rank >= n.
    label_gate: bool = False
    label_gate_module: str = "down_proj"
    label_gate_examples: Positive = 1024
    # --- data --------------------------------------------------------------------------------
    tasks: list[str] | None = None  # train on these tasks only (None: all tasks in the data)
    max_seq_len: Positive = 256  # prompt + target tokens; a longer prompt loses the middle of its user text
    batch_by_task: bool = False  # each batch holds one task (no padding a short task to a long one's length)
    # With batch_by_task: a task's batches come this many times as often as its share of the examples
    # (e.g. {rate: 2}); an unlisted task weighs 1.
    task_weights: dict[str, float] | None = None
    # Checkpoints are chosen by the task-balanced val loss (each task's mean per-example loss,
    # averaged over tasks) on this many val examples, spread over val users by a fixed
    # pseudo-random order. 384 examples cover ~100+ users: the figure moves by less than the
    # differences between checkpoints that matter.
    val_examples: int = 384
    # --- optimisation --------------------------------------------------------------------------
    batch_size: Positive = 8  # examples per step per worker
    max_steps: Positive = 300  # optimizer steps
    lr: PositiveFloat = 1e-3  # peak learning rate (small random heads with output scale: ~1e-3, docs/design.md)
    warmup_steps: int = 30  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    l2_adapter: float = 0.0  # penalty on the mean square of generated A and B
    # Personalization margin (p2p/train/step.py): weight of the hinge asking each example's own adapter
    # to beat the next user's by `contrast_margin` nats; 0 is off. Costs a second forward per step.
    contrast_weight: NonNegativeFloat = 0.0
    contrast_margin: NonNegativeFloat = 0.5
    seed: int = 0  # initialisation and data order
    # "shared": every user gets the same embedding (the non-personalized control); "retrieval": the
    # same, with the user's profile text in every prompt (the control a team would build instead).
    control: str = "none"
    # --- schedule and distribution ---------------------------------------------------------------
    eval_every: Positive = 50  # steps between val loss, progress line and checkpoint
    log_every: Positive = 10  # steps between progress lines without evaluation
    workers: Positive = 2  # Ray Train workers
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    use_gpu: bool = False  # one GPU per worker (nccl) instead of CPU (gloo)
    bf16: bool = False  # DeepSpeed bf16 mixed precision (GPU: Ampere or newer; also runs on CPU)
    fp16: bool = False  # DeepSpeed fp16 mixed precision with dynamic loss scaling (older GPUs)
    cpus_per_worker: int = 1  # Ray resources per worker
    max_failures: int = 2  # worker failures Ray Train recovers from (resume from the latest checkpoint)

    @field_validator("control")
    @classmethod
    def _control(cls, v: str) -> str:
        return _one_of(v, ("none", "shared", "retrieval"))

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        return _one_of(v, ("small", "paper"))

    @field_validator("zero_stage")
    @classmethod
    def _zero_stage(cls, v: int) -> int:
        if not 0 <= v <= 3:
            raise ValueError(f"must be 0..3, got {v}")
        return v

    @model_validator(mode="after")
    def _together(self) -> TrainConfig:
        if self.bf16 and self.fp16:
            raise FieldError("fp16", "bf16 and fp16 are exclusive")
        if self.label_binding and not self.profile_features:
            raise FieldError("label_binding", "needs label statistics: set profile_features > 0")
        if self.label_gate and self.label_binding:
            raise FieldError("label_gate", "label_binding and label_gate both claim the first rank columns; choose one")
        if self.label_gate and not self.profile_features:
            raise FieldError("label_gate", "needs label statistics: set profile_features > 0")
        if self.label_gate and self.label_gate_module not in self.targets:
            raise FieldError("label_gate_module", f"{self.label_gate_module!r} must be one of the targets {self.targets}")
        if self.task_weights is not None:
            if not self.batch_by_task:
                raise FieldError("task_weights", "needs batch_by_task: true")
            for task, weight in self.task_weights.items():
                if not (math.isfinite(weight) and weight > 0):
                    raise FieldError("task_weights", f"the weight of {task!r} must be a positive number, got {weight}")
        return self

    def profile_config(self) -> dict:
        """The ProfileConfig fields this run builds profiles with (recorded in the hypernet)."""
        return {"top_k": self.profile_top_k, "max_chars": self.profile_max_chars, "features": self.profile_features}


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not {' or '.join(allowed)}")
    return value


Config = TypeVar("Config", bound=StrictConfig)

# pydantic's error types -> how the message reads to someone editing a YAML file.
_TYPE_WORDS = {"int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true/false",
               "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping"}


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _message(exc: ValidationError, cls: type[StrictConfig]) -> str:
    """The first error, as `config field 'name': what is wrong` (or `unknown config field 'name' ...`)."""
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return f"config field {cause.field!r}: {cause.why}"
    field = str(err["loc"][0]) if err["loc"] else "?"
    if err["type"] == "missing":
        return f"config field {field!r}: is required (a config field or the option of that name)"
    limit = err.get("ctx") or {}
    if err["type"] in _BOUNDS:
        bound = next(iter(v for k, v in limit.items() if k in ("gt", "ge", "lt", "le")))
        words = "must be positive" if (err["type"], bound) == ("greater_than", 0) else f"must be {_BOUNDS[err['type']]} {bound}"
        return f"config field {field!r}: {words}, got {err.get('input')!r}"
    if err["type"] in ("too_short", "string_too_short"):
        missing = "is required (a config field or the option of that name)" if isinstance(err.get("input"), str) \
            else "needs at least one value"
        return f"config field {field!r}: {missing}"
    if err["type"] == "extra_forbidden":
        return f"unknown config field {field!r} (valid fields: {', '.join(sorted(cls.model_fields))})"
    if isinstance(cause, ValueError):
        return f"config field {field!r}: {cause}"
    words = _TYPE_WORDS.get(err["type"], err["msg"][0].lower() + err["msg"][1:])
    return f"config field {field!r}: {words}, got {err.get('input')!r}"


def config_from_dict(data: dict[str, Any], source: str = "config", cls: type[Config] = TrainConfig) -> Config:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise P2PError(f"{source}: {_message(exc, cls)}") from None


def load_config(path: str | None, cls: type[Config] = TrainConfig, **overrides) -> Config:
    """`cls` from a YAML file (or only `overrides` when `path` is None); overrides win when not None."""
    data: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise P2PError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise P2PError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise P2PError(f"{path}: expected a mapping of config fields")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data, path or "command line", cls)
