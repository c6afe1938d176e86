"""The file names of the two artifacts the system stores: a hypernet checkpoint and a PEFT adapter folder.

Apart from the code that writes and reads them (p2p/model/hypernet.py, p2p/model/peft_format.py)
so the adapter store can name them without importing a model library.
"""

CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS = "config.json", "model.safetensors"
CHECKPOINT_FILES = (CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
