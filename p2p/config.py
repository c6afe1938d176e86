"""Job configurations (training, refresh): flat dataclasses, loaded from YAML and validated before any work.

Every field is documented where it is declared; `jobs/configs/*.yaml` are examples.
An unknown field or a value of the wrong type is an error that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import yaml

from p2p.errors import P2PError


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    base: str = "smollm2-135m"  # base LLM: smollm2-135m, tiny-random, HF id or local directory
    encoder: str = "minilm"  # profile encoder: minilm, hashing (tests), or a sentence-transformers path
    preset: str = "small"  # hypernetwork sizes: small (CPU) or paper
    rank: int = 8  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r (exports stay exact either way)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # modules that get adapters
    top_k_layers: int | None = None  # adapters on the top K layers only (None: all layers)
    cache_prefix: bool = True  # with top K layers: cache the frozen layers' outputs per example
    cache_max_bytes: int = 2 << 30  # per worker; past it, prefixes are recomputed instead of stored
    profile_top_k: int = 8  # history items quoted in each profile
    profile_max_chars: int = 900  # bound on a profile's length (900: fits MiniLM's 256-token window)
    profile_features: int = 256  # label-statistics dimensions appended to the text embedding (0: none)
    standardize_inputs: bool = True  # standardize embeddings with the training users' mean and std
    head_init_std: float = 1e-5  # initial head weights (0: zero heads, whose trunk gets no gradient at step 0)
    head_output_scale: float | None = None  # heads emit bias + scale * (W h); None: 1/sqrt(head_in)
    # --- data --------------------------------------------------------------------------------
    tasks: list[str] | None = None  # train on these tasks only (None: all tasks in the data)
    max_seq_len: int = 256  # prompt + target tokens; a longer prompt loses the middle of its user text
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
    batch_size: int = 8  # examples per step per worker
    max_steps: int = 300  # optimizer steps
    lr: float = 1e-3  # peak learning rate (small random heads with output scale: ~1e-3, docs/design.md)
    warmup_steps: int = 30  # linear warmup, then cosine decay
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    l2_adapter: float = 0.0  # penalty on the mean square of generated A and B
    seed: int = 0  # initialisation and data order
    control: str = "none"  # "shared": every user gets the same embedding (the non-personalized control)
    # --- schedule and distribution ---------------------------------------------------------------
    eval_every: int = 50  # steps between val loss, progress line and checkpoint
    log_every: int = 10  # steps between progress lines without evaluation
    workers: int = 2  # Ray Train workers
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    use_gpu: bool = False  # one GPU per worker (nccl) instead of CPU (gloo)
    bf16: bool = False  # DeepSpeed bf16 mixed precision (GPU: Ampere or newer; also runs on CPU)
    fp16: bool = False  # DeepSpeed fp16 mixed precision with dynamic loss scaling (older GPUs)
    cpus_per_worker: int = 1  # Ray resources per worker
    max_failures: int = 2  # worker failures Ray Train recovers from (resume from the latest checkpoint)

    def validate(self) -> TrainConfig:
        def bad(name: str, why: str):
            raise P2PError(f"config field {name!r}: {why}")

        if self.control not in ("none", "shared"):
            bad("control", f"{self.control!r} is not none or shared")
        if self.preset not in ("small", "paper"):
            bad("preset", f"{self.preset!r} is not small or paper")
        if not 0 <= self.zero_stage <= 3:
            bad("zero_stage", f"must be 0..3, got {self.zero_stage}")
        for name in ("rank", "batch_size", "max_steps", "max_seq_len", "eval_every", "log_every", "workers"):
            if getattr(self, name) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            bad("lr", f"must be positive, got {self.lr}")
        if self.top_k_layers is not None and self.top_k_layers <= 0:
            bad("top_k_layers", f"must be positive or null, got {self.top_k_layers}")
        if not self.targets:
            bad("targets", "needs at least one module name")
        if self.bf16 and self.fp16:
            bad("fp16", "bf16 and fp16 are exclusive")
        if self.profile_features < 0:
            bad("profile_features", f"must be >= 0, got {self.profile_features}")
        if self.task_weights is not None:
            if not self.batch_by_task:
                bad("task_weights", "needs batch_by_task: true")
            for task, weight in self.task_weights.items():
                if not (math.isfinite(weight) and weight > 0):
                    bad("task_weights", f"the weight of {task!r} must be a positive number, got {weight}")
        return self

    def profile_config(self) -> dict:
        """The ProfileConfig fields this run builds profiles with (recorded in the hypernet)."""
        return {"top_k": self.profile_top_k, "max_chars": self.profile_max_chars, "features": self.profile_features}


def _check_type(name: str, value, hint) -> object:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_type(name, value, opt)
            except P2PError:
                continue
        raise P2PError(f"config field {name!r}: {value!r} is not {hint}")
    if origin is dict:
        if not isinstance(value, dict):
            raise P2PError(f"config field {name!r}: expected a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {_check_type(name, k, key_hint): _check_type(name, v, value_hint) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise P2PError(f"config field {name!r}: expected a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_check_type(name, v, inner) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise P2PError(f"config field {name!r}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise P2PError(f"config field {name!r}: expected an integer, got {value!r}")
    if not isinstance(value, hint):
        raise P2PError(f"config field {name!r}: expected {hint.__name__}, got {value!r}")
    return value


STORE_MODES = ("adapters", "embeddings")  # the values p2p.store.runs.MODES accepts


@dataclass
class RefreshConfig:
    """The nightly refresh (`p2p refresh`, jobs/refresh.py); jobs/README.md explains each guard."""

    hypernet: str = ""  # a checkpoint folder (published into the store) or a hypernet id already stored
    data: str = ""  # data directory with users/ (or a users Parquet path), local or s3://
    store: str = ""  # adapter store root: a path, file://... or s3://bucket/prefix
    full: bool = False  # regenerate every user, not only those whose profile or hypernet changed
    mode: str = "adapters"  # adapters: a PEFT folder per user; embeddings: embeddings only, adapters made on a miss
    batch_size: int = 64  # users per block through profile, embed and generate
    embed_actors: int = 1  # encoder actors (one model each; one per GPU on a cluster)
    generate_actors: int = 1  # hypernet actors, each writing its users' PEFT folders
    create: bool = False  # create the store's S3 bucket if missing (otherwise a missing bucket is an error)
    max_removed_share: float = 0.2  # refuse a run that drops more than this share of committed users...
    allow_mass_removal: bool = False  # ...unless this is set (an empty or truncated users file)
    readmit: list[str] = field(default_factory=list)  # deleted (tombstoned) user ids allowed back in
    lease_wait_s: float = 0.0  # wait this long for another run's lease, then exit 3 naming its holder
    lease_ttl_s: float = 120.0  # a dead run's lease expires this long after its last heartbeat

    def validate(self) -> RefreshConfig:
        for name in ("hypernet", "data", "store"):
            if not getattr(self, name):
                raise P2PError(f"refresh: {name!r} is required (config field or --{name})")
        for name in ("batch_size", "embed_actors", "generate_actors"):
            if getattr(self, name) < 1:
                raise P2PError(f"refresh: {name!r} must be >= 1, got {getattr(self, name)}")
        if self.mode not in STORE_MODES:
            raise P2PError(f"refresh: 'mode' must be one of {', '.join(STORE_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.max_removed_share <= 1.0:
            raise P2PError(f"refresh: 'max_removed_share' must be in [0, 1], got {self.max_removed_share}")
        if self.lease_ttl_s <= 0 or self.lease_wait_s < 0:
            raise P2PError(f"refresh: 'lease_ttl_s' must be > 0 and 'lease_wait_s' >= 0, got "
                           f"{self.lease_ttl_s} and {self.lease_wait_s}")
        return self


def config_from_dict(data: dict, source: str = "config", cls: type = TrainConfig):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise P2PError(f"{source}: unknown config field {unknown[0]!r} (valid fields: {', '.join(sorted(names))})")
    try:
        values = {k: _check_type(k, v, hints[k]) for k, v in data.items()}
    except P2PError as exc:
        raise P2PError(f"{source}: {exc}") from None
    return cls(**values).validate()


def load_config(path: str | None, cls: type = TrainConfig, **overrides):
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


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
