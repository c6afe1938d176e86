"""What the training tests share: the tiny config, its embedding width, and rows of a data directory."""

from p2p.data.schemas import read_table
from p2p.train.examples import example_rows

TINY = dict(base="tiny-random", encoder="hashing", batch_size=8, lr=1e-3, warmup_steps=3, log_every=5,
            val_examples=16, max_failures=0, profile_features=16)
DIM = 384 + 16  # hashing encoder + label statistics


def local_rows(data):
    profiles = read_table(f"{data}/profiles", "profiles")
    return (example_rows(data, profiles, ("train",)),
            example_rows(data, profiles, ("val",)))

# The label gate's tests: 240 bins are the fewest that give each of the synthetic tag task's 18 labels a
# statistic of its own (no other label's, score's or written answer's form in its bin), and the gated
# module needs a rank column per label.
GATE_FEATURES = 240
GATE_DIM = 384 + GATE_FEATURES
GATE = dict(TINY, profile_features=GATE_FEATURES, targets=["q_proj", "down_proj"], top_k_layers=2, rank=20, alpha=40.0,
            label_gate=True, label_gate_examples=48, head_init_std=1e-3)
