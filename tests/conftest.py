import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The shared tiny-random model and tokenizer (frozen; tests that wrap it deep-copy it)."""
    from p2p.model.base import load_base_model

    return load_base_model("tiny-random")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic data set (all three tasks) written once per test session."""
    from p2p.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("synth")
    write_synthetic(str(out), 120, seed=3, chunk_size=50)
    return str(out)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module, shut down after it (job-submit tests start their own)."""
    import ray

    from pipelines.ray_setup import ensure_ray

    ensure_ray(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 API: moto's server on 127.0.0.1 (s3fs and Ray workers reach it over HTTP).

    Sets dummy credentials and AWS_ENDPOINT_URL for this process and the Ray workers it starts;
    yields a function that creates a fresh bucket and returns its s3:// URI.
    """
    import socket
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")

    def bucket() -> str:
        name = f"p2p-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}/store"

    yield bucket
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_hypernet(tmp_path_factory):
    """A tiny-random / hashing hypernet checkpoint with perturbed weights (adapters differ per user)."""
    import torch

    from p2p.model.base import build_tiny_random
    from p2p.model.hypernet import Hypernetwork, make_config, save_hypernet

    folder = tmp_path_factory.mktemp("hypernet")
    torch.manual_seed(0)
    hypernet = Hypernetwork(make_config(build_tiny_random(0), "tiny-random", "hashing", 384))
    with torch.no_grad():
        for p in hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hypernet(hypernet, str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """Tag-only synthetic users with their profiles written next to them (DATA/profiles)."""
    import pyarrow.parquet as pq
    from train_support import TINY

    from p2p.config import TrainConfig
    from p2p.data.synthetic import write_synthetic
    from p2p.profile.config import ProfileConfig
    from p2p.profile.embedder import ProfileEmbedder, build_profiles

    out = str(tmp_path_factory.mktemp("train-data"))
    write_synthetic(out, 60, seed=11, tasks=("tag",))
    profiles = build_profiles(out, ProfileEmbedder("hashing", ProfileConfig(**TrainConfig(**TINY).profile_config())))
    os.makedirs(f"{out}/profiles")
    pq.write_table(profiles, f"{out}/profiles/part-0.parquet")
    return out


@pytest.fixture(scope="session")
def gate_data(tmp_path_factory):
    """Tag-only synthetic users whose profiles hold enough label statistics for the label gate."""
    import pyarrow.parquet as pq
    from train_support import GATE

    from p2p.config import TrainConfig
    from p2p.data.synthetic import write_synthetic
    from p2p.profile.config import ProfileConfig
    from p2p.profile.embedder import ProfileEmbedder, build_profiles

    out = str(tmp_path_factory.mktemp("gate-data"))
    write_synthetic(out, 60, seed=11, tasks=("tag",))
    profiles = build_profiles(out, ProfileEmbedder("hashing", ProfileConfig(**TrainConfig(**GATE).profile_config())))
    os.makedirs(f"{out}/profiles")
    pq.write_table(profiles, f"{out}/profiles/part-0.parquet")
    return out
