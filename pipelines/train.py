"""`p2p train`: the hypernetwork trained with Ray Train + DeepSpeed ZeRO, data from Ray Data.

The driver reads `examples` with Ray Data, gives every example its user's embedding (the
profiles, broadcast), computes the training users' embedding statistics (the hypernet
standardizes its inputs with them) and hands train/val datasets to a TorchTrainer. Each worker
(`HypernetTrainRecipe`) wraps the hypernetwork (the only trainable module) in a DeepSpeed engine
with the configured ZeRO stage (gloo on CPU, nccl on GPU), reads its shard once, and runs
`p2p.train`'s loop epoch after epoch. Every `eval_every` steps all workers compute the
task-balanced val loss on their val shard (all-reduced) and rank 0 reports a checkpoint; after a
worker failure Ray restarts the group and training resumes from the latest checkpoint's step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load_file
from tqdm import tqdm

from p2p import logs
from p2p.config import TrainConfig, config_from_dict
from p2p.data.schemas import read_table
from p2p.errors import P2PError
from p2p.model.adapted import AdaptedModel
from p2p.model.label_gate import check_gate_rank, gate_labels
from p2p.profile.config import ProfileConfig
from p2p.profile.embedder import embedder_id
from p2p.progress import ProgressBar
from p2p.task.prompt import PromptFormat
from p2p.train.batch import batches_of
from p2p.train.batching import check_task_weights, collated, training_batches
from p2p.train.examples import as_control, attach_embeddings, embedding_stats, example_rows
from p2p.train.gate_fit import fit_gate_checkpoint, held_out_users
from p2p.train.loop import (
    TrainLoop,
    Validation,
    binding_prompts,
    new_hypernet,
    optimizer_for,
    save_checkpoint,
)
from p2p.train.step import AdapterLoss, val_rows_sample
from pipelines.ingest import run_profiles
from pipelines.ray_setup import ensure_ray, user_errors

STATE_FILE = "trainer_state.json"


def deepspeed():
    """The deepspeed module, imported on first use: inside a Ray Train worker, never in the driver.

    Imported lazily on purpose (the one import here that is): importing DeepSpeed probes the
    accelerator and sets up its own logging, which the driver of `p2p train` must not do.
    """
    import deepspeed as ds  # lazy: see the docstring

    return ds


def _ds_config(config: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.bf16},
        "fp16": {"enabled": config.fp16, "initial_scale_power": 12},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _rows(batch: dict) -> list[dict]:
    n = len(batch["example_id"])
    return [{k: column[i] for k, column in batch.items()} for i in range(n)]  # what the join attached, profile text too


class DeepSpeedStepper:
    """A step through the DeepSpeed engine: its backward (ZeRO partitions, loss scaling), step, clip, schedule."""

    def __init__(self, engine):
        self.engine = engine
        self.source = engine  # the engine's forward is the hypernet's

    def step(self, loss: torch.Tensor) -> float | None:
        self.engine.backward(loss)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool) -> None:
        self.engine.train(mode)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


class HypernetTrainRecipe:
    """One Ray Train worker, in torchtune's recipe shape: named setup steps, then the library's loop.

    The loss, the loop, the validation metric and the checkpoint format are the library's
    (`p2p.train`); this class adds what distribution needs: the DeepSpeed engine, this worker's
    shard, all-reduced validation and progress, and Ray checkpoints with the step and best
    metric for resuming.

    Each worker reads its training shard once into memory and then shuffles it per epoch itself:
    the frozen-prefix cache only pays off when the same examples come back to the same worker,
    and Ray Data's streaming split does not promise that from one epoch to the next.
    """

    def __init__(self, loop_config: dict):
        self.loop_config = loop_config
        self.config: TrainConfig = config_from_dict(loop_config["config"])
        self.start_step, self.best = 0, float("inf")
        self._loss_sum, self._loss_n = 0.0, 0

    def setup(self) -> None:
        self._setup_distributed()
        self._setup_model()
        self._restore()
        self._setup_engine()
        self._setup_data()

    def _setup_distributed(self) -> None:
        # A C++ op for CPU shared-memory comms that we don't use: skip its 50-115 s build.
        deepspeed().ops.__compatible_ops__["deepspeed_shm_comm"] = False
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(self.config.seed)

    def _setup_model(self) -> None:
        # lazy: transformers takes ~4 s to import; the driver and Ray Data's tasks import this module too
        from p2p.model.base import load_base_model  # lazy: see above

        c = self.config
        model, tokenizer = load_base_model(c.base)
        if c.use_gpu:
            model = model.to(ray.train.torch.get_device())
        stats = self.loop_config["input_stats"]
        self.hypernet = new_hypernet(c, model, self.loop_config["embed_dim"],
                                     (np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)),
                                     tokenizer, sorted(self.loop_config["task_counts"]), self.loop_config["binding_prompts"])
        self.loss = AdapterLoss(AdaptedModel(model, tokenizer, self.hypernet.config), c.cache_prefix,
                                c.cache_max_bytes, c.label_smoothing, c.l2_adapter, c.contrast_weight,
                                c.contrast_margin)
        self.fmt = PromptFormat(tokenizer)

    def _restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return
        with checkpoint.as_directory() as d:
            self.hypernet.load_state_dict(load_file(os.path.join(d, "hypernet", "model.safetensors")))
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
        self.start_step, self.best = state["step"], state.get("best_val_loss", float("inf"))
        if self.rank == 0:
            print(f"[p2p train] resumed from step {self.start_step}", flush=True)

    def _setup_engine(self) -> None:
        optimizer, scheduler = optimizer_for(self.config, self.hypernet, self.start_step)
        self.engine, _, _, _ = deepspeed().initialize(model=self.hypernet, optimizer=optimizer,
                                                      lr_scheduler=scheduler, config=_ds_config(self.config))
        self.device = self.engine.device

    def _read_shard(self, name: str) -> list[dict]:
        rows: list[dict] = []
        for b in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy"):
            rows.extend(_rows(b))
        return as_control(rows, self.config.control, self.hypernet.shared_embedding().numpy())

    def _setup_data(self) -> None:
        c = self.config
        self.train_rows = self._read_shard("train")
        # This worker's share of the val examples; the shard is read to its end (stopping a
        # streaming read early makes Ray Data cancel tasks noisily).
        val_rows = val_rows_sample(self._read_shard("val"), -(-c.val_examples // self.world))
        self.val_batches = [b.to(self.device) for b in batches_of(val_rows, c.batch_size, self.fmt, c.max_seq_len)]

    def all_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of floats over workers (every worker must pass the same keys, in any order)."""
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def _all_val_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """This worker's per-task val sums -> every worker's (workers may hold different tasks)."""
        tasks = self._all_tasks({k.rsplit("/", 1)[0] for k in sums})
        return self.all_sum({f"{t}/{part}": sums.get(f"{t}/{part}", 0.0) for t in tasks for part in ("sum", "n")})

    def _all_tasks(self, mine: set[str]) -> list[str]:
        if self.world == 1:
            return sorted(mine)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, sorted(mine))
        return sorted({t for part in gathered for t in part})

    def save(self, step: int, metrics: dict) -> ray.train.Checkpoint | None:
        params = list(self.hypernet.parameters())
        gather = (deepspeed().zero.GatheredParameters(params) if self.config.zero_stage == 3
                  else contextlib.nullcontext())
        with gather:  # every rank joins the gather under ZeRO-3; rank 0 writes
            if self.rank != 0:
                return None
            tmp = tempfile.mkdtemp(prefix="p2p-ckpt-")
            save_checkpoint(self.hypernet, os.path.join(tmp, "hypernet"), step, metrics)
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, "best_val_loss": self.best, **metrics}, f)
        return ray.train.Checkpoint.from_directory(tmp)

    def report(self, record: dict, evaluated: bool) -> None:
        """Every `log_every` steps and at each evaluation: progress summed over workers, to Ray (with a
        checkpoint at evaluations)."""
        c = self.config
        self._loss_sum, self._loss_n = self._loss_sum + record["loss"], self._loss_n + 1
        if not (evaluated or record["step"] % c.log_every == 0):
            return
        totals = self.all_sum({"loss": self._loss_sum, "n": self._loss_n, "seen": record["examples"]})
        self._loss_sum, self._loss_n = 0.0, 0
        step = record["step"]
        metrics = {"step": step, "loss": totals["loss"] / totals["n"], "resumed_from": self.start_step,
                   "examples_per_s": totals["seen"] / record["train_seconds"], "lr": record["lr"],
                   "epoch": step * c.batch_size / max(len(self.train_rows), 1),
                   **{k: v for k, v in record.items() if k.startswith("val_")}}
        checkpoint = None
        if evaluated:
            if metrics.get("val_loss") is not None and metrics["val_loss"] < self.best:
                self.best = metrics["val_loss"]
            checkpoint = self.save(step, metrics)
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)

    def train(self) -> None:
        c = self.config
        stepper = DeepSpeedStepper(self.engine)
        validation = Validation(self.loss, stepper.source, self.val_batches, all_reduce=self._all_val_sums)
        loop = TrainLoop(self.loss, stepper, c.max_steps, c.eval_every, validation, on_step=self.report)
        batches = training_batches(c, self.train_rows, c.seed + 1000 * self.rank + self.start_step,
                                   self.loop_config["task_counts"])
        loop.run(collated(batches, self.fmt, c.max_seq_len, self.device), start_step=self.start_step)


def train_loop_per_worker(loop_config: dict) -> None:
    recipe = HypernetTrainRecipe(loop_config)
    recipe.setup()
    recipe.train()


class ProgressLog(ray.train.UserCallback):
    """On the controller: one progress line per report, and every report in metrics.jsonl."""

    def __init__(self, path: str, max_steps: int):
        self.path, self.max_steps = path, max_steps

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = metrics[0]
        val = f" val {m['val_loss']:.4f}" if m.get("val_loss") is not None else ""
        print(f"[p2p train] step {m['step']}/{self.max_steps} loss {m['loss']:.4f}{val} "
              f"{m['examples_per_s']:.1f} ex/s", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")


@contextlib.contextmanager
def training_progress(metrics_path: str, max_steps: int, desc: str) -> Iterator[None]:
    """One bar on the driver (steps, loss, val loss, examples/s) from the controller's metrics.jsonl.

    With `--verbose` the controller's own lines reach the terminal and no bar is drawn; off a
    terminal (a job log) a plain line is printed at each evaluation instead of a bar.
    """
    if logs.verbose():
        yield
        return
    tty = sys.stderr.isatty()
    bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not tty)
    before = 0
    if os.path.exists(metrics_path):  # an earlier run's lines (a resume): not this run's progress
        with open(metrics_path) as f:
            before = len(f.read().splitlines())
    stop, seen = threading.Event(), [before]

    def follow() -> None:
        while True:
            finished = stop.wait(1.0)
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    lines = f.read().splitlines()
                for line in lines[seen[0]:]:
                    m = json.loads(line)
                    bar.update(max(0, m["step"] - bar.n))
                    val = m.get("val_loss")
                    bar.set_postfix(loss=f"{m['loss']:.3f}", val="-" if val is None else f"{val:.3f}",
                                    ex_s=f"{m['examples_per_s']:.1f}")
                    if not tty and val is not None:
                        print(f"{desc}: step {m['step']}/{max_steps} loss {m['loss']:.4f} val {val:.4f} "
                              f"{m['examples_per_s']:.1f} ex/s", flush=True)
                seen[0] = len(lines)
            if finished:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def _with_embeddings(batch: pa.Table, profiles: ray.ObjectRef, split: str, tasks: list[str] | None) -> pa.Table:
    """One block of examples of `split`, each with its user's embedding (the library's join)."""
    return attach_embeddings(batch, _cached_get(profiles), (split,), tasks)


_PROFILES_CACHE: dict = {}


def _cached_get(ref: ray.ObjectRef) -> pa.Table:
    key = ref.hex()
    if key not in _PROFILES_CACHE:
        _PROFILES_CACHE.clear()
        _PROFILES_CACHE[key] = ray.get(ref)
    return _PROFILES_CACHE[key]


def training_datasets(data: str, profiles: pa.Table, config: TrainConfig) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """examples with each row carrying its user's embedding.

    The profiles (user id + embedding: ~1.5-2.5 KB a user) are broadcast through the object store
    and looked up per block: no shuffle. Ray Data's hash `Dataset.join` is the alternative past
    ~10M users; on small clusters its shuffle actors cost a minute per pass.
    """
    ref = ray.put(profiles)
    examples = ray.data.read_parquet(os.path.join(data, "examples"),
                                     columns=["example_id", "user_id", "task", "input", "target", "split"])

    def split(name: str) -> ray.data.Dataset:
        return examples.map_batches(_with_embeddings, batch_format="pyarrow",
                                    fn_kwargs={"profiles": ref, "split": name, "tasks": config.tasks})

    return split("train"), split("val")


def training_examples(data: str, tasks: list[str] | None, prompts: bool = False) -> pa.Table:
    """(user_id, task) of every training example of `tasks`: what the driver knows before Ray Train
    starts; with `prompts`, also (example_id, input), which the label binding starts from."""

    ex = read_table(os.path.join(data, "examples"), "examples")
    mask = pc.equal(ex.column("split"), "train")
    if tasks:
        mask = pc.and_(mask, pc.is_in(ex.column("task"), value_set=pa.array(tasks)))
    ex = ex.filter(mask)
    if not len(ex):
        raise P2PError(f"{data}/examples: no training examples" + (f" for tasks {tasks}" if tasks else ""))
    return ex.select(["user_id", "task"] + (["example_id", "input"] if prompts else []))


def task_counts(examples: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(examples.column("task")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def train_input_stats(profiles: pa.Table, examples: pa.Table) -> dict[str, list[float]]:
    """Mean and std of the training users' embeddings: the hypernet standardizes its inputs with them."""
    users = pc.unique(examples.column("user_id"))
    rows = profiles.filter(pc.is_in(profiles.column("user_id"), value_set=users))
    mean, std = embedding_stats(np.asarray(rows.column("embedding").combine_chunks().flatten()).reshape(len(rows), -1))
    return {"mean": mean.tolist(), "std": std.tolist()}


def run_training(config: TrainConfig, data: str, out: str, profiles: str | None = None,
                 log=print) -> dict:
    """Train and write OUT/latest and OUT/best (hypernet checkpoint folders); return a summary."""

    # A weight naming no task fails before Ray starts.
    examples = training_examples(data, config.tasks, prompts=config.label_binding)
    counts = task_counts(examples)
    check_task_weights(config, counts)
    ensure_ray()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump(config.model_dump(), f, indent=2)
    table = training_profiles(config, profiles or _profiles_for(data, out, config, log))
    embed_dim = table.schema.field("embedding").type.list_size
    if config.label_gate:
        _check_gate(config, examples, embed_dim)
    stats = train_input_stats(table, examples)
    train_ds, val_ds = training_datasets(data, table, config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.model_dump(), "embed_dim": embed_dim, "input_stats": stats,
                           "task_counts": counts,
                           "binding_prompts": binding_prompts(examples.select(["example_id", "input"]).to_pylist())
                           if config.label_binding else []},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name="p2p-train", storage_path=os.path.join(out, "ray"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            callbacks=[ProgressLog(os.path.join(out, "metrics.jsonl"), config.max_steps)],
        ),
        datasets={"train": train_ds, "val": val_ds},
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
    )
    t0 = time.perf_counter()
    desc = "train" if config.control == "none" else f"train {config.control} control"
    with user_errors(), training_progress(os.path.join(out, "metrics.jsonl"), config.max_steps, desc):
        result = trainer.fit()
    if result.checkpoint is None:
        raise P2PError(f"training produced no checkpoint; see {out}/ray for the workers' logs")
    summary = _export_run(result, out, config, t0)
    if config.label_gate:
        summary["label_gate"] = fit_run_gate(config, data, table, os.path.join(out, "best"), log)
        summary["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def training_profiles(config: TrainConfig, profiles: str) -> pa.Table:
    """The profile columns a run of `config` reads (user_id, embedding; the text for `retrieval`), checked
    to be made by the config's encoder and profile settings: another encoder's embeddings train nothing."""
    reads_text = config.control == "retrieval"  # the retrieval control's prompts hold the profile text
    table = read_table(profiles, "profiles").select(["user_id", "embedding", "encoder"]
                                                    + (["profile_text"] if reads_text else []))
    expected = embedder_id(config.encoder, ProfileConfig(**config.profile_config()))
    made_by = table.column("encoder")[0].as_py() if len(table) else expected
    if made_by != expected:
        raise P2PError(f"{profiles}: embedded by {made_by!r} but the config's encoder and profile settings give "
                       f"{expected!r}; rebuild them (`p2p profiles --config ...`) or remove the folder")
    return table.drop_columns(["encoder"])


# Room the retrieval control's prompts need for the profile text (900 characters, ~250 tokens).
RETRIEVAL_EXTRA_TOKENS = 320


def run_training_with_controls(config: TrainConfig, data: str, out: str, controls: tuple[str, ...],
                               log=print) -> list[dict]:
    """P2P into OUT, then each control (same config, same steps; one embedding for all) into
    OUT/<control>, where `p2p eval` finds it. All use the same profiles.

    `shared` reads no profile; `retrieval` reads the profile text in every prompt (its sequences
    are longer by RETRIEVAL_EXTRA_TOKENS so the profile fits).
    """
    summaries = [run_training(config, data, out, log=log)]
    profiles = os.path.join(data, "profiles")
    profiles = profiles if os.path.isdir(profiles) else os.path.join(os.path.abspath(out), "profiles")
    for control in controls:
        update = {"control": control}
        if control == "retrieval":
            update["max_seq_len"] = config.max_seq_len + RETRIEVAL_EXTRA_TOKENS
        summaries.append(run_training(config.model_copy(update=update), data, os.path.join(out, control),
                                      profiles=profiles, log=log))
    return summaries


def _export_run(result: ray.train.Result, out: str, config: TrainConfig, t0: float) -> dict:
    """OUT/latest and OUT/best (by val loss) from Ray Train's checkpoints; the run's summary."""
    _export(result.checkpoint, os.path.join(out, "latest"))
    best = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss") or float("inf"))
    _export(best[0], os.path.join(out, "best"))
    return {"steps": result.metrics.get("step"), "val_loss": result.metrics.get("val_loss"),
            "best_val_loss": best[1].get("val_loss"), "best_step": best[1].get("step"),
            "seconds": time.perf_counter() - t0, "control": config.control,
            "latest": os.path.join(out, "latest"), "best": os.path.join(out, "best")}


def _check_gate(config: TrainConfig, examples: pa.Table, embed_dim: int) -> None:
    """What would stop the label gate, named before training starts rather than in every worker or after it."""
    labels, _ = gate_labels(sorted(task_counts(examples)), config.profile_features, embed_dim)
    check_gate_rank(len(labels), config.rank)
    held_out_users(pc.unique(examples.column("user_id")).to_pylist())


def fit_run_gate(config: TrainConfig, data: str, profiles: pa.Table, folder: str, log) -> dict:
    """The label gate of the handed-on checkpoint (OUT/best), fitted here in the driver on training users
    (p2p/train/gate_fit.py). OUT/latest keeps the gate's columns at zero, as training left them."""
    from p2p.model.base import load_base_model  # lazy: transformers takes seconds to import

    rows = example_rows(data, profiles, ("train",), config.tasks)
    model, tokenizer = load_base_model(config.base)
    total = min(len(rows), config.label_gate_examples)
    with ProgressBar(total, "fit label gate", "example") as bar:
        return fit_gate_checkpoint(config, copy.deepcopy(model), tokenizer, folder, rows, log, bar.update)


def _export(checkpoint: ray.train.Checkpoint, dest: str) -> None:
    with checkpoint.as_directory() as d:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(os.path.join(d, "hypernet"), dest)


def profiles_folder(data: str, out: str) -> str:
    """Where a run into `out` reads its profiles: DATA/profiles when it exists (made by `p2p profiles`),
    else OUT/profiles, which `p2p train` builds."""
    existing = os.path.join(data, "profiles")
    return existing if os.path.isdir(existing) else os.path.join(out, "profiles")


def _profiles_for(data: str, out: str, config: TrainConfig, log) -> str:
    """The run's profiles folder (`profiles_folder`), built first when it does not exist."""
    dest = profiles_folder(data, out)
    if not os.path.isdir(dest):
        log(f"[p2p train] no {os.path.join(data, 'profiles')}; building profiles into {dest}")
        run_profiles(os.path.join(data, "users"), dest, config.encoder, config.profile_config())
    return dest
