import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """The shared tiny-random model and tokenizer (frozen; tests that wrap it deep-copy it)."""
    from p2p.models import load_base_model

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
