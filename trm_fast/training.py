"""Training (the seed's recipe: AdamW, warm-up + linear decay, grad clip, EMA for evaluation) and evaluation."""
from __future__ import annotations

import copy
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .checkpoint import read_checkpoint, save_checkpoint
from .data import TokenDataset, collate_batch, dataset_batches
from .graphed_train_step import GraphedTrainStep, backward_and_step
from .plot import line_plot


@dataclass
class TrainConfig:
    """Training settings. With `minutes` the run stops (and the learning rate decays) on wall time; with
    `max_steps` on steps; with both, on whichever ends first; with neither, after 1000 steps."""
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    adam_beta2: float = 0.999  # AdamW's second-moment decay (0.95 is steadier at high learning rates)
    warmup_steps: int = 100
    max_steps: Optional[int] = None
    minutes: Optional[float] = None
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # at most; min(decay, (1 + t) / (10 + t)) at step t. 0: no EMA, evaluate the weights
    eval_every: int = 200
    eval_batches: Optional[int] = 20  # None: the whole validation set
    save_every: int = 0  # also keep checkpoint-<step>.pt every this many steps (0: only checkpoint.pt at the end)
    log_every: int = 10
    seed: int = 0
    bf16: bool = True  # autocast to bf16 on CUDA
    supervision_steps: Optional[int] = None  # train with this many supervision steps (default: the config's)
    random_windows: bool = False  # packed data: each step draws windows at random offsets, not the fixed cuts
    cuda_graph: bool = False  # on CUDA, replay each step as one CUDA graph (trm_fast.GraphedTrainStep)

    def __post_init__(self):
        for name in ("batch_size", "eval_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is None and self.minutes is None:
            self.max_steps = 1000
        if (self.max_steps is not None and self.max_steps < 1) or (self.minutes is not None and self.minutes <= 0):
            raise ValueError(f"max_steps and minutes must be positive, got {self.max_steps} and {self.minutes}")
        for name in ("ema_decay", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def _to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TokenDataset, batch_size: int = 16, max_batches: Optional[int] = None,
             bf16: bool = True) -> dict:
    """Cross-entropy of the final supervision step's logits over the non-pad targets: loss (nats per token),
    perplexity and the number of tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in itertools.islice(dataset_batches(dataset, batch_size), max_batches):
        batch = _to(batch, device)
        with autocast(device, bf16):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
        total += F.cross_entropy(logits.float().flatten(0, 1), batch["target_ids"].flatten(),
                                 ignore_index=dataset.pad_id, reduction="sum")
        count += int(batch["attention_mask"].sum())
    model.train(was_training)
    loss = float(total) / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


def batch_indices(size: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The sample indices of a step: a fresh permutation per epoch, determined by (seed, epoch), so a
    resumed run sees the same data order as an uninterrupted one."""
    per_epoch = max(1, size // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[k * batch_size:(k + 1) * batch_size]


def step_batch(train_set: TokenDataset, config: TrainConfig, step: int) -> dict:
    """The collated batch of a step, determined by (seed, step) so that a resumed run sees the same data."""
    if config.random_windows:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        return train_set.random_windows(config.batch_size, generator)
    indices = batch_indices(len(train_set), config.batch_size, step, config.seed)
    return collate_batch([train_set[i] for i in indices.tolist()], train_set.pad_id)


class Progress:
    """One status line: redrawn in place on a terminal, printed every `every` steps otherwise."""

    def __init__(self, every: int, stream=sys.stderr):
        self.every, self.stream, self.tty = every, stream, stream.isatty()

    def update(self, step: int, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text.ljust(100))
            self.stream.flush()
        elif step % self.every == 0:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def train(model: torch.nn.Module, train_set: TokenDataset, val_set: Optional[TokenDataset] = None,
          config: Optional[TrainConfig] = None, out_dir: Optional[str] = None, resume: Optional[str] = None,
          tokenizer: str = "byte", log: Callable[[str], None] = print) -> dict:
    """Train `model` in place. Writes (when out_dir is set) checkpoint.pt at the end, best.pt at the
    evaluation with the lowest validation loss and checkpoint-<step>.pt every `save_every` steps, all in
    the seed's format plus the EMA weights, the train config and the tokenizer; also metrics.jsonl and
    curve.png. Returns the final step, time, losses and the metrics history."""
    config = config or TrainConfig()
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    graphed = config.cuda_graph and device.type == "cuda"
    # a replayed AdamW keeps its step count on the GPU and reads the learning rate from a tensor set each step;
    # on CUDA the fused AdamW (one kernel per dtype group: 0.14 ms a step at d512 against 0.54 for foreach, H100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(config.lr, device=device) if graphed else
                                  config.lr, betas=(0.9, config.adam_beta2), weight_decay=config.weight_decay,
                                  capturable=graphed, fused=device.type == "cuda")
    graphed_step = GraphedTrainStep(model, optimizer, config.grad_clip or None) if graphed else None
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.ema_decay > 0 else None
    step, elapsed_before = 0, 0.0
    if resume:
        state = read_checkpoint(resume, map_location=device)
        changed = sorted(k for k, v in model.config.to_dict().items() if state["config"].to_dict().get(k) != v)
        if changed:
            raise ValueError(f"cannot resume from {resume}: its model config differs in {changed}")
        model.load_state_dict(state["model"])
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state.get("ema") or state["model"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed", 0.0))
        log(f"resumed from {resume} at step {step}")

    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    metrics_file = open(out / "metrics.jsonl", "a" if resume else "w") if out else None
    history = []

    def record(entry: dict) -> None:
        history.append(entry)
        if metrics_file:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    def run_eval() -> Optional[dict]:
        if val_set is None:
            return None
        result = evaluate(ema or model, val_set, config.batch_size, config.eval_batches, config.bf16)
        best = min((e["val_loss"] for e in history if "val_loss" in e), default=math.inf)
        record({"step": step, "val_loss": result["loss"], "val_ppl": result["ppl"], "elapsed": elapsed()})
        if result["loss"] < best and step > 0:
            save("best.pt")
        return result

    def save(name: str = "checkpoint.pt") -> Optional[str]:
        if not out:
            return None
        path = out / name
        save_checkpoint(path, model, optimizer, step, ema=ema.state_dict() if ema else None,
                        train_config=asdict(config), tokenizer=tokenizer, elapsed=elapsed())
        return str(path)

    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def progress() -> float:
        fractions = [step / config.max_steps] if config.max_steps else []
        if config.minutes:
            fractions.append(elapsed() / (60.0 * config.minutes))
        return max(fractions)

    if not resume and (initial := run_eval()):
        log(f"step 0: val loss {initial['loss']:.4f} (ppl {initial['ppl']:.2f})")
    model.train()
    bar = Progress(config.log_every)
    tokens, window_start, loss_value = 0, time.perf_counter(), float("nan")
    while progress() < 1.0:
        lr = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1)) * (1.0 - progress())
        for group in optimizer.param_groups:
            if graphed:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        batch = step_batch(train_set, config, step)
        tokens += int(batch["attention_mask"].sum())
        batch = _to(batch, device)
        inputs = dict(attention_mask=batch["attention_mask"], target_ids=batch["target_ids"],
                      supervision_steps=config.supervision_steps)
        with autocast(device, config.bf16):
            if graphed:
                loss = graphed_step(batch["input_ids"], **inputs)["loss"]
            else:
                loss = model(batch["input_ids"], **inputs)["loss"]
        if not graphed:
            optimizer.zero_grad(set_to_none=True)
            backward_and_step(model, optimizer, loss, config.grad_clip if config.grad_clip > 0 else None)
        if ema is not None:
            with torch.no_grad():
                decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))  # warm-up: early weights fade fast
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
        step += 1
        if step % config.log_every == 0:
            loss_value = float(loss.detach())
            rate = tokens / (time.perf_counter() - window_start)
            tokens, window_start = 0, time.perf_counter()
            record({"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": rate, "elapsed": elapsed()})
            total = f"/{config.max_steps}" if config.max_steps else ""
            budget = f"/{_clock(60 * config.minutes)}" if config.minutes else ""
            bar.update(step, f"step {step}{total} | loss {loss_value:.4f} | {rate / 1e3:.1f}k tok/s | "
                             f"lr {lr:.2e} | {_clock(elapsed())}{budget}")
        if step % config.eval_every == 0 and val_set is not None:
            result = run_eval()
            bar.close()
            log(f"step {step}: val loss {result['loss']:.4f} (ppl {result['ppl']:.2f})")
        if config.save_every and step % config.save_every == 0:
            save(f"checkpoint-{step:06d}.pt")
    bar.close()
    evals = [e for e in history if "val_loss" in e]
    final = run_eval() if not evals or evals[-1]["step"] != step else {"loss": evals[-1]["val_loss"],
                                                                        "ppl": evals[-1]["val_ppl"]}
    path = save()
    if out:
        series = {"train loss": [(e["step"], e["loss"]) for e in history if "loss" in e],
                  "val loss": [(e["step"], e["val_loss"]) for e in history if "val_loss" in e]}
        if any(series.values()):
            line_plot(str(out / "curve.png"), series)
        metrics_file.close()
    if final:
        log(f"final (step {step}, {_clock(elapsed())}): val loss {final['loss']:.4f} (ppl {final['ppl']:.2f})")
    return {"step": step, "elapsed": elapsed(), "train_loss": loss_value,
            "val_loss": final["loss"] if final else None, "val_ppl": final["ppl"] if final else None,
            "checkpoint": path, "history": history}
