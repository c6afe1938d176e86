import numpy as np
import pytest

from p2p.profile.encoder import ProfileEncoder

TEXTS = [
    "The user loves gritty crime thrillers and noir detective stories.",
    "This person enjoys dark detective thrillers and noir crime stories.",
    "Bake the bread at 200 degrees for forty minutes.",
]


def _check(enc: ProfileEncoder):
    out = enc.encode(TEXTS)
    assert out.shape == (3, enc.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert out[0] @ out[1] > out[0] @ out[2]
    np.testing.assert_array_equal(out, enc.encode(TEXTS))  # deterministic
    assert enc.encode([]).shape == (0, enc.dim)


def test_hashing_encoder():
    _check(ProfileEncoder("hashing"))


def test_encode_rejects_a_bare_string():
    with pytest.raises(TypeError):
        ProfileEncoder("hashing").encode("just one string")


@pytest.mark.integration
def test_minilm_encoder():
    enc = ProfileEncoder("minilm")
    assert enc.dim == 384
    _check(enc)


def test_wordllama_encoder_loads_from_its_package_alone(monkeypatch):
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("the wordllama encoder tried to download")

    monkeypatch.setattr(requests, "get", no_network)  # its loader downloads through requests.get when a file is missing
    enc = ProfileEncoder("wordllama")
    assert enc.dim == 256 and enc.encoder_id == "wordllama"
    _check(enc)
