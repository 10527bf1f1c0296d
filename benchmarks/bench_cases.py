"""Benchmark sizes: the seed's default config on CUDA (bf16 autocast), a tiny one on CPU (fp32)."""
import torch

CUDA = torch.cuda.is_available()

if CUDA:
    CASES = {"B16-L512-d512": dict(batch=16, length=512, d_model=512, n_heads=8, vocab_size=16000),
             "B8-L1024-d256": dict(batch=8, length=1024, d_model=256, n_heads=8, vocab_size=16000)}
    DTYPE = torch.bfloat16
else:
    CASES = {"B4-L64-d64": dict(batch=4, length=64, d_model=64, n_heads=4, vocab_size=259)}
    DTYPE = None  # fp32

