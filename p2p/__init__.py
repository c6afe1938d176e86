"""p2p: Profile-to-PEFT. A hypernetwork turns a user's profile into a LoRA adapter.

This package is the library: PyTorch and Hugging Face only, no Ray import anywhere in it.
`pipelines/` composes it on Ray.
"""

__version__ = "0.1.0"
