"""A few minutes of the main job on the built-in corpus: train a tiny TRM, watch the loss fall, generate."""
from __future__ import annotations

import math
import time

import torch

from .corpus import default_corpus
from .data import ByteTokenizer
from .dispatch import format_kernel_status, kernel_status
from .presets import create_model


def run_demo(seconds: float = 120.0, seq_len: int = 64, batch_size: int = 16, preset: str = "tiny",
             seed: int = 0, prompt: str = "Return the ") -> dict:
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = ByteTokenizer()
    data = torch.tensor(tokenizer.encode(default_corpus()), dtype=torch.long)
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    model = create_model(preset, vocab_size=tokenizer.vocab_size, max_seq_len=seq_len, dropout=0.0,
                         supervision_steps=1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    print(f"corpus: {len(data):,} bytes of Python stdlib docstrings; model: {preset}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, on {device}")

    def batch(source: torch.Tensor, generator=None):
        starts = torch.randint(0, len(source) - seq_len - 1, (batch_size,), generator=generator)
        rows = torch.stack([source[s: s + seq_len + 1] for s in starts.tolist()]).to(device)
        return rows[:, :-1], rows[:, 1:]

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        generator = torch.Generator().manual_seed(1234)  # the same validation batches every time
        batches = [batch(val, generator) for _ in range(4)]
        loss = sum(float(model(ids, target_ids=targets)["ce_loss"]) for ids, targets in batches) / len(batches)
        model.train()
        return loss

    history = [(0, val_loss())]
    print(f"step     0  val ce {history[0][1]:.3f}")
    start, step = time.time(), 0
    while time.time() - start < seconds:
        ids, targets = batch(train)
        loss = model(ids, target_ids=targets)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 50 == 0:
            history.append((step, val_loss()))
            print(f"step {step:5d}  train loss {float(loss):.3f}  val ce {history[-1][1]:.3f} "
                  f"(ppl {math.exp(history[-1][1]):.1f})  {time.time() - start:.0f}s")
    if history[-1][0] != step:
        history.append((step, val_loss()))
    model.eval()
    ids = model.generate(tokenizer.encode(prompt), max_new_tokens=120, temperature=0.8, top_k=20, q_threshold=None)
    print(f"\nsample: {tokenizer.decode(ids)!r}\n")
    print(format_kernel_status(kernel_status(device)))
    return {"steps": step, "val_loss": history}
