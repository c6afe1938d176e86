"""`p2p train`: the hypernetwork trained with Ray Train + DeepSpeed ZeRO, data from Ray Data.

The driver reads `examples` and `profiles` with Ray Data, joins them so every example carries
its user's embedding, and hands train/val datasets to a TorchTrainer. Each worker wraps the
hypernetwork (the only trainable module) in a DeepSpeed engine with the configured ZeRO stage
(gloo on CPU, nccl on GPU), streams its shard, and runs `p2p.training`'s step. Every
`eval_every` steps all workers compute the val loss on their val shard (all-reduced) and rank 0
reports a checkpoint; after a worker failure Ray restarts the group and training resumes from
the latest checkpoint's step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from p2p.config import TrainConfig, config_from_dict
from p2p.errors import P2PError
from pipelines.ray_setup import ensure_ray, user_errors

STATE_FILE = "trainer_state.json"


def _ds_config(config: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _rows(batch: dict) -> list[dict]:
    n = len(batch["example_id"])
    return [{k: batch[k][i] for k in ("example_id", "user_id", "input", "target", "embedding")} for i in range(n)]


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from p2p.hypernet import Hypernetwork
    from p2p.models import load_base_model
    from p2p.training import AdapterLM, collate, hypernet_config_for, lr_lambda

    # A C++ op for CPU shared-memory comms that we don't use: skip its 50-115 s build.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.seed)
    model, tokenizer = load_base_model(config.base)
    if config.use_gpu:
        model = model.to(ray.train.torch.get_device())
    hconfig = hypernet_config_for(config, model, loop_config["embed_dim"])
    hypernet = Hypernetwork(hconfig)

    start_step, best = 0, float("inf")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as d:
            hypernet.load_state_dict(load_file(os.path.join(d, "hypernet", "model.safetensors")))
            with open(os.path.join(d, STATE_FILE)) as f:
                state = json.load(f)
        start_step, best = state["step"], state.get("best_val_loss", float("inf"))
        if rank == 0:
            print(f"[p2p train] resumed from step {start_step}", flush=True)

    schedule = lr_lambda(config)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s + start_step))
    engine, _, _, _ = deepspeed.initialize(
        model=hypernet, optimizer=optimizer, lr_scheduler=scheduler, config=_ds_config(config)
    )
    lm = AdapterLM(model, hconfig, config.cache_prefix)
    device = engine.device

    def to_device(batch):
        return dataclasses.replace(
            batch, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
            labels=batch.labels.to(device), embeddings=batch.embeddings.to(device),
            row_index=batch.row_index.to(device),
        )

    # The first val_examples / world rows of this worker's val shard; the shard is read to its
    # end (stopping a streaming read early makes Ray Data cancel tasks noisily).
    val_rows: list[dict] = []
    for b in ray.train.get_dataset_shard("val").iter_batches(batch_size=256, batch_format="numpy"):
        val_rows.extend(_rows(b)[: max(0, -(-config.val_examples // world) - len(val_rows))])
    val_batches = [to_device(collate(val_rows[i : i + config.batch_size], tokenizer, config.max_seq_len))
                   for i in range(0, len(val_rows), config.batch_size)]

    def all_sum(*values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def evaluate() -> float | None:
        engine.eval()
        total = tokens = 0.0
        with torch.no_grad():
            for b in val_batches:
                _, ce = lm.loss(engine, b, config)
                total += float(ce) * b.target_tokens
                tokens += b.target_tokens
        total, tokens = all_sum(total, tokens)
        engine.train()
        return total / tokens if tokens else None

    def save(step: int, metrics: dict) -> ray.train.Checkpoint | None:
        params = list(hypernet.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if config.zero_stage == 3 else contextlib.nullcontext()
        with gather:  # every rank joins the gather under ZeRO-3; rank 0 writes
            if rank != 0:
                return None
            from p2p.hypernet import save_hypernet

            hypernet.config.extra.update({"step": step, "val_loss": metrics.get("val_loss")})
            tmp = tempfile.mkdtemp(prefix="p2p-ckpt-")
            save_hypernet(hypernet, os.path.join(tmp, "hypernet"))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({"step": step, "best_val_loss": best, **metrics}, f)
        return ray.train.Checkpoint.from_directory(tmp)

    step, epoch, t0, seen = start_step, 0, time.perf_counter(), 0
    loss_sum = loss_n = 0.0
    shard = ray.train.get_dataset_shard("train")
    engine.train()
    while step < config.max_steps:
        for raw in shard.iter_batches(batch_size=config.batch_size, batch_format="numpy", drop_last=True,
                                      local_shuffle_buffer_size=config.batch_size * 16,
                                      local_shuffle_seed=config.seed + epoch + step):
            batch = to_device(collate(_rows(raw), tokenizer, config.max_seq_len))
            loss, _ = lm.loss(engine, batch, config)
            engine.backward(loss)
            engine.step()
            step += 1
            seen += len(batch.example_ids)
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            is_eval = step % config.eval_every == 0 or step == config.max_steps
            if is_eval or step % config.log_every == 0:
                total_loss, total_n, total_seen = all_sum(loss_sum, loss_n, seen)
                metrics = {"step": step, "loss": total_loss / total_n, "resumed_from": start_step,
                           "examples_per_s": total_seen / (time.perf_counter() - t0),
                           "lr": engine.get_lr()[0], "epoch": epoch}
                loss_sum = loss_n = 0.0
                ckpt = None
                if is_eval:
                    metrics["val_loss"] = evaluate()
                    if metrics["val_loss"] is not None and metrics["val_loss"] < best:
                        best = metrics["val_loss"]
                    ckpt = save(step, metrics)
                ray.train.report(metrics, checkpoint=ckpt)
                if ckpt is not None:
                    shutil.rmtree(ckpt.path, ignore_errors=True)
            if step >= config.max_steps:
                break
        epoch += 1


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


def attach_embeddings(batch: pa.Table, profiles: ray.ObjectRef, split: str, tasks: list[str] | None) -> pa.Table:
    """Keep one split's examples and give each its user's embedding (a broadcast join)."""
    table = _cached_get(profiles)
    mask = pc.equal(batch.column("split"), split)
    if tasks:
        mask = pc.and_(mask, pc.is_in(batch.column("task"), value_set=pa.array(tasks)))
    batch = batch.filter(mask)
    index = pc.index_in(batch.column("user_id"), value_set=table.column("user_id"))
    if index.null_count:
        missing = batch.column("user_id").filter(pc.is_null(index))[0].as_py()
        raise P2PError(f"examples: user {missing!r} has no profile (rebuild profiles with `p2p profiles`)")
    return batch.append_column("embedding", table.column("embedding").take(index))


_PROFILES_CACHE: dict = {}


def _cached_get(ref: ray.ObjectRef) -> pa.Table:
    key = ref.hex()
    if key not in _PROFILES_CACHE:
        _PROFILES_CACHE.clear()
        _PROFILES_CACHE[key] = ray.get(ref)
    return _PROFILES_CACHE[key]


def training_datasets(data: str, profiles: str, config: TrainConfig) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """examples with each row carrying its user's embedding.

    The profiles (user id + embedding: ~1.5 KB a user) are broadcast through the object store
    and looked up per block: no shuffle, and every epoch re-streams the examples cheaply.
    Ray Data's hash `Dataset.join` is the alternative past ~10M users; on small clusters its
    shuffle actors cost a minute per epoch.
    """
    from p2p.data.schemas import read_table

    table = read_table(profiles, "profiles").select(["user_id", "embedding"])
    ref = ray.put(table)
    examples = ray.data.read_parquet(os.path.join(data, "examples"),
                                     columns=["example_id", "user_id", "task", "input", "target", "split"])

    def split(name: str) -> ray.data.Dataset:
        return examples.map_batches(attach_embeddings, batch_format="pyarrow",
                                    fn_kwargs={"profiles": ref, "split": name, "tasks": config.tasks})

    return split("train"), split("val")


def run_training(config: TrainConfig, data: str, out: str, profiles: str | None = None,
                 log=print) -> dict:
    """Train and write OUT/latest and OUT/best (hypernet checkpoint folders); return a summary."""
    import pyarrow.parquet as pq

    from p2p.data.schemas import check_schemas, parquet_files

    ensure_ray()
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    profiles = profiles or _profiles_for(data, out, config, log)
    fs, files = parquet_files(profiles)
    schema = pq.read_schema(files[0], filesystem=fs)
    embed_dim = schema.field("embedding").type.list_size
    encoder = pq.read_table(files[0], filesystem=fs, columns=["encoder"]).column("encoder")[0].as_py()
    if encoder != config.encoder:
        raise P2PError(f"{profiles}: embedded with encoder {encoder!r} but the config says {config.encoder!r}")
    check_schemas(os.path.join(data, "examples"), "examples")
    train_ds, val_ds = training_datasets(data, profiles, config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(config), "embed_dim": embed_dim},
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
    with user_errors():
        result = trainer.fit()
    if result.checkpoint is None:
        raise P2PError(f"training produced no checkpoint; see {out}/ray for the workers' logs")
    _export(result.checkpoint, os.path.join(out, "latest"))
    best = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss") or float("inf"))
    _export(best[0], os.path.join(out, "best"))
    summary = {"steps": result.metrics.get("step"), "val_loss": result.metrics.get("val_loss"),
               "best_val_loss": best[1].get("val_loss"), "seconds": time.perf_counter() - t0,
               "latest": os.path.join(out, "latest"), "best": os.path.join(out, "best")}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _export(checkpoint: ray.train.Checkpoint, dest: str) -> None:
    with checkpoint.as_directory() as d:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(os.path.join(d, "hypernet"), dest)


def _profiles_for(data: str, out: str, config: TrainConfig, log) -> str:
    """DATA/profiles when it exists (made by `p2p profiles`), else build them into OUT/profiles."""
    existing = os.path.join(data, "profiles")
    if os.path.isdir(existing):
        return existing
    from pipelines.ingest import run_profiles

    dest = os.path.join(out, "profiles")
    if not os.path.isdir(dest):
        log(f"[p2p train] no {existing}; building profiles into {dest}")
        run_profiles(os.path.join(data, "users"), dest, config.encoder,
                     {"top_k": config.profile_top_k, "max_chars": config.profile_max_chars})
    return dest
