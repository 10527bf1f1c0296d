"""A few minutes of the main job on the built-in corpus: train a tiny TRM, watch the loss fall, generate."""
from __future__ import annotations

from typing import Optional

import torch

from .corpus import default_corpus
from .data import ByteTokenizer, TokenDataset
from .dispatch import format_kernel_status, kernel_status
from .presets import create_model
from .training import TrainConfig, train


def run_demo(seconds: float = 120.0, seq_len: int = 64, batch_size: int = 16, preset: str = "tiny",
             seed: int = 0, prompt: str = "Return the ", max_steps: Optional[int] = None) -> dict:
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = ByteTokenizer()
    train_set, val_set = TokenDataset(default_corpus().split("\n\n"), tokenizer, seq_len, pack=True).split(0.05)
    model = create_model(preset, vocab_size=tokenizer.vocab_size, max_seq_len=seq_len, dropout=0.0,
                         supervision_steps=1, eos_token_id=tokenizer.eos_id).to(device)
    print(f"corpus: Python stdlib docstrings, {len(train_set)} samples of {seq_len} bytes; model: {preset}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, on {device}")
    config = TrainConfig(batch_size=batch_size, lr=2e-3, warmup_steps=20, minutes=seconds / 60, max_steps=max_steps,
                         ema_decay=0.0, eval_every=50, eval_batches=4, log_every=10, seed=seed)
    result = train(model, train_set, val_set, config, log=print)
    model.eval()
    ids = model.generate(tokenizer.encode(prompt, add_eos=False), max_new_tokens=120, temperature=0.8, top_k=20,
                         q_threshold=None)
    print(f"\nsample: {tokenizer.decode(ids)!r}\n")
    print(format_kernel_status(kernel_status(device)))
    return result
