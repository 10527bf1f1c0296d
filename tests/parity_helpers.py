"""Shared by the tests: a reference/drop-in pair with equal weights, and padded batches."""
import torch

import trm_fast
from trm_fast import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = dict(vocab_size=61, d_model=32, n_heads=4, max_seq_len=24, dropout=0.0)


def make_pair(seed: int = 0, kernels: str = "torch", device: str = "cpu", **overrides):
    """A seed-equivalent reference model and a drop-in TRMModel holding the same random weights."""
    config = trm_fast.TRMConfig(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    ref = reference.TRMModel(reference.TRMConfig(**config.to_dict()))
    # Spread the weights away from PyTorch's init so that every parameter matters.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = trm_fast.TRMModel(config, kernels=kernels)
    fast.load_state_dict(ref.state_dict())
    return ref.to(device), fast.to(device)


def random_batch(batch: int, length: int, vocab: int, lengths=None, seed: int = 1, device: str = "cpu"):
    """Right-padded ids (pad 0) with the given true lengths, and next-token targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    targets = torch.randint(1, vocab, (batch, length), generator=g)
    for row, n in enumerate(lengths or []):
        ids[row, n:] = 0
        targets[row, n:] = 0
    return ids.to(device), targets.to(device)
