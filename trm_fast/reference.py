"""The seed TRM restated in plain PyTorch: the numerical ground truth for every fast path.

Behaviour follows ../shared/SPEC.md §1 exactly, seed quirks included. The one documented departure:
the halting BCE is computed in float32 with autocast disabled, which gives the same numbers in fp32 and
does not raise under CUDA bf16 autocast (the seed's `F.binary_cross_entropy` call does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .diagnostics import model_statistics, recursion_diagnostics


@dataclass
class TRMConfig:
    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    dropout: float = 0.1
    max_seq_len: int = 512
    latent_steps: int = 2
    deep_steps: int = 2
    supervision_steps: int = 2
    act_threshold: float = 0.95
    act_weight: float = 1.0
    pad_token_id: int = 0
    tie_embeddings: bool = True
    eos_token_id: Optional[int] = None  # new: None keeps the seed's stop-on-pad rule only

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_heads", "max_seq_len", "latent_steps", "deep_steps",
                    "supervision_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TRMConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TRMConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TRMConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"TRMConfig.{name} ({value}) must be in [0, vocab_size={self.vocab_size})")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TRMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TRMConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


class TinyBlock(nn.Module):
    """Post-LayerNorm transformer block: causal self-attention with key padding, then a GELU FFN."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        L = h.size(1)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=h.device), diagonal=1)
        key_padding = (attn_mask == 0) if attn_mask is not None else None
        a, _ = self.attn(h, h, h, attn_mask=causal, key_padding_mask=key_padding)
        h = self.ln1(h + self.dropout(a))
        return self.ln2(h + self.ffn(h))


class TinyNet(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.1):
        super().__init__()
        self.xyz_proj = nn.Linear(3 * d_model, d_model)
        self.yz_proj = nn.Linear(2 * d_model, d_model)
        self.block = TinyBlock(d_model, n_heads, dropout)

    def forward_xyz(self, x, y, z, attn_mask):
        return self.block(self.xyz_proj(torch.cat([x, y, z], dim=-1)), attn_mask=attn_mask)

    def forward_yz(self, y, z, attn_mask):
        return self.block(self.yz_proj(torch.cat([y, z], dim=-1)), attn_mask=attn_mask)


def halting_bce(q_hat: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`F.binary_cross_entropy` in float32 with autocast off: seed numbers, and bf16-autocast safe."""
    with torch.autocast(device_type=q_hat.device.type, enabled=False):
        return F.binary_cross_entropy(q_hat.float(), labels.float())


def mean_losses(ce_losses, act_losses, act_weight: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce_loss, act_loss): the supervision steps' mean losses and their act_weight-weighted sum."""
    ce_loss, act_loss = torch.stack(list(ce_losses)).mean(), torch.stack(list(act_losses)).mean()
    return ce_loss + act_weight * act_loss, ce_loss, act_loss


def sample_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """The seed's sampler: top-k, then nucleus (first token always kept), NaN guard, argmax fallback."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits[remove.scatter(-1, sorted_idx, remove)] = float("-inf")
    probs = torch.nan_to_num(F.softmax(logits, dim=-1), nan=0.0)
    empty = probs.sum(dim=-1) <= 0
    if bool(empty.any()):
        fallback = torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)
        probs[empty] = F.one_hot(fallback[empty], probs.size(-1)).to(probs.dtype)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Seed rule: divide the logit of every id already present by `penalty`, whatever its sign."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, ids in enumerate(seen_ids):
        uniq = torch.unique(ids)
        logits[row, uniq] = logits[row, uniq] / penalty
    return logits


class TRMModel(nn.Module):
    """The seed model: one TinyNet applied recursively to (x, y, z) with deep supervision and ACT."""

    def __init__(self, config: TRMConfig):
        super().__init__()
        self.config = config
        D = config.d_model
        self.token_embed = nn.Embedding(config.vocab_size, D, padding_idx=config.pad_token_id)
        self.pos_embed = nn.Embedding(config.max_seq_len, D)
        self.dropout = nn.Dropout(config.dropout)
        self.tiny_net = self._make_tiny_net(config)
        self.output_head = nn.Linear(D, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output_head.weight = self.token_embed.weight
        self.q_head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 1))
        self._trace: Optional[list] = None  # (y_in, y_out, z_out) per latent recursion, while diagnosing
        self._call_hook = None  # h -> h, applied to every TinyNet call's output (trm_fast.task_vectors)

    def _make_tiny_net(self, config: TRMConfig) -> TinyNet:
        return TinyNet(config.d_model, config.n_heads, config.dropout)

    # -- embedding and states ------------------------------------------------------------------------
    def _grow_positional_table(self, length: int) -> None:
        """Extend the positional table to `length` rows (the last row repeated) when it has fewer."""
        old = self.pos_embed
        if length <= old.num_embeddings:
            return
        new = nn.Embedding(length, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight
            new.weight[old.num_embeddings:] = old.weight[-1]
        self.pos_embed = new
        self.config.max_seq_len = length

    def _add_positional_encoding(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        L = token_embeddings.size(1)
        self._grow_positional_table(L)
        positions = torch.arange(L, device=token_embeddings.device)
        return self.dropout(token_embeddings + self.pos_embed(positions).unsqueeze(0))

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._add_positional_encoding(self.token_embed(input_ids))

    @staticmethod
    def _init_states(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x.clone(), torch.zeros_like(x)

    # -- recursion -------------------------------------------------------------------------------------
    def latent_recursion(self, x, y, z, attention_mask):
        y_in = y
        hook = self._call_hook or (lambda h: h)
        for _ in range(self.config.latent_steps):
            z = hook(self.tiny_net.forward_xyz(x, y, z, attention_mask))
            y = hook(self.tiny_net.forward_yz(y, z, attention_mask))
        if self._trace is not None:
            self._trace.append((y_in.detach(), y.detach(), z.detach()))
        return y, z

    def _deep_recursion_step(self, x, y, z, attention_mask):
        """`deep_steps` latent recursions; only the last records gradients."""
        for _ in range(self.config.deep_steps - 1):
            with torch.no_grad():
                y, z = self.latent_recursion(x, y, z, attention_mask)
        y, z = self.latent_recursion(x, y, z, attention_mask)
        return y, z, y.detach(), z.detach()

    @staticmethod
    def _pool_for_q(y: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(y.dtype)
        return (y * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def _q_hat(self, y: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.q_head(self._pool_for_q(y, attention_mask)))

    @staticmethod
    def _compute_act_labels(logits, target_ids, attention_mask, threshold: float) -> torch.Tensor:
        return TRMModel._act_labels(logits.argmax(dim=-1) == target_ids, attention_mask, threshold)

    @staticmethod
    def _act_labels(correct, attention_mask, threshold: float) -> torch.Tensor:
        """Per sequence: does the share of correctly predicted tokens reach `threshold` (all of them at 1.0)."""
        mask = attention_mask.bool()
        if threshold < 1.0:
            accuracy = (correct & mask).sum(dim=1).float() / mask.sum(dim=1).clamp(min=1).float()
            labels = accuracy >= threshold
        else:
            labels = (correct | ~mask).all(dim=1)
        return labels.float().unsqueeze(-1)

    def _supervision_losses(self, logits, q_hat, target_ids, attention_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, ACT loss) of one supervision step."""
        ce_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1),
                                  ignore_index=self.config.pad_token_id)
        labels = self._compute_act_labels(logits, target_ids, attention_mask, self.config.act_threshold)
        return ce_loss, halting_bce(q_hat, labels)

    def _output_logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.output_head(y)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        target_ids: Optional[torch.Tensor] = None,
        supervision_steps: Optional[int] = None,
        return_diagnostics: bool = False,
    ) -> Dict[str, Any]:
        """The seed's forward. `return_diagnostics=True` adds "diagnostics" to the output
        (trm_fast.diagnostics.recursion_diagnostics: per-step q_hat, confidence, entropy, norms, convergence)."""
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        self._trace = [] if return_diagnostics else None
        try:
            out = self._forward(input_ids, attention_mask, target_ids, supervision_steps)
        finally:
            trace, self._trace = self._trace, None
        if return_diagnostics:
            out["diagnostics"] = recursion_diagnostics(trace, out["all_logits"], out["q_hats"], attention_mask)
        return out

    def get_statistics(self, seq_len: Optional[int] = None) -> Dict[str, int]:
        """Parameters, TinyNet calls and forward FLOPs per token (trm_fast.diagnostics.model_statistics)."""
        return model_statistics(self, seq_len)

    def _forward(self, input_ids, attention_mask, target_ids, supervision_steps) -> Dict[str, Any]:
        states = self._supervision_states(input_ids, attention_mask, supervision_steps)
        return self._supervision_outputs(states, target_ids, attention_mask)

    def _supervision_states(self, input_ids, attention_mask, supervision_steps) -> List[Tuple[torch.Tensor, ...]]:
        """Per supervision step, (y of its deep recursion, with gradient; q_hat): the forward before the output
        head (which no later step depends on)."""
        x = self._embed(input_ids)
        y, z = self._init_states(x)
        states = []
        for _ in range(supervision_steps or self.config.supervision_steps):
            y_grad, _, y, z = self._deep_recursion_step(x, y, z, attention_mask)
            states.append((y_grad, self._q_hat(y_grad, attention_mask)))
        return states

    def _mean_losses(self, ce_losses, act_losses) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mean_losses(ce_losses, act_losses, self.config.act_weight)

    def _supervision_outputs(self, states, target_ids, attention_mask) -> Dict[str, Any]:
        """The forward's outputs from `_supervision_states`: each step's logits and losses."""
        all_logits = [self._output_logits(y_grad) for y_grad, _ in states]
        q_hats = [q_hat for _, q_hat in states]
        losses = None
        if target_ids is not None:
            losses = zip(*(self._supervision_losses(logits, q_hat, target_ids, attention_mask)
                           for logits, q_hat in zip(all_logits, q_hats)))
        return self._outputs(all_logits, q_hats, losses)

    def _outputs(self, all_logits, q_hats, losses) -> Dict[str, Any]:
        """The forward's result from the steps' logits, q_hats and losses ((ce losses, ACT losses), or None)."""
        ce_loss = act_loss = loss = None
        if losses is not None:
            loss, ce_loss, act_loss = self._mean_losses(*losses)
        return {
            "loss": loss,
            "ce_loss": ce_loss,
            "act_loss": act_loss,
            "logits": all_logits[-1] if all_logits else None,
            "all_logits": all_logits,
            "q_hats": q_hats,
        }

    # -- inference -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _inference_cycle(self, x, y, z, attention_mask, supervision_steps=None, q_threshold=None):
        """Per supervision step: `deep_steps` latent recursions, then pooled q_hat; halts batch-wide."""
        q_hat = None
        for _ in range(supervision_steps or self.config.supervision_steps):
            for _ in range(self.config.deep_steps):
                y, z = self.latent_recursion(x, y, z, attention_mask)
            q_hat = self._q_hat(y, attention_mask)
            if q_threshold is not None and bool((q_hat > q_threshold).all()):
                break
        return y, z, q_hat

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        repetition_penalty: float = 1.0,
        supervision_steps: Optional[int] = None,
        q_threshold: Optional[float] = 0.7,
        device: Optional[torch.device] = None,
    ) -> List[int]:
        """Seed generation: re-runs embedding and the inference cycle over the whole sequence per token."""
        cfg = self.config
        device = device or next(self.parameters()).device
        input_ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=device).unsqueeze(0)
        for _ in range(max_new_tokens):
            attention_mask = (input_ids != cfg.pad_token_id).long()
            x = self._embed(input_ids)
            y, z = self._init_states(x)
            y, z, _ = self._inference_cycle(x, y, z, attention_mask, supervision_steps, q_threshold)
            next_logits = self._output_logits(y)[:, -1] / max(temperature, 1e-5)
            next_logits = apply_repetition_penalty(next_logits, input_ids, repetition_penalty)
            next_token = sample_logits(next_logits, top_k=top_k, top_p=top_p)
            input_ids = torch.cat([input_ids, next_token.unsqueeze(1)], dim=1)
            token = int(next_token[0])
            if token == cfg.pad_token_id or (cfg.eos_token_id is not None and token == cfg.eos_token_id):
                break
        return input_ids.squeeze(0).tolist()
