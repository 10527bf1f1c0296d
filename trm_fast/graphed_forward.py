"""`GraphedForward`: a model's forward without gradients, replayed as one CUDA graph per input shape.

Inference (and evaluation) of a fixed batch shape calls the same few hundred kernels every time; captured
once, the whole recursion (every TinyNet call, the q heads) is one launch, so the host no longer paces the GPU;
the output head and the losses run after it as ordinary launches (the GPU is still busy with the graph when the
host queues them), so the logits are fresh tensors and no [B, L, vocab] copy is made out of the graph.
Without logits (`keep_logits=False`) the losses are in the graph too. The graph reads the model's weights in
place (in-place updates are seen; weights moved or reallocated, e.g. by `model.to`, are noticed and the graphs
captured again) and is captured under the autocast state of its first call; the model must stay in eval mode
(dropout would be frozen into the graph). Off CUDA it calls the model under `torch.no_grad()`.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from . import cuda_graphs
from .model import TRMModel, check_id_bounds, id_bounds


class GraphedForward:
    """`graphed(input_ids, attention_mask=None, target_ids=None, supervision_steps=None, keep_logits=True)`
    returns what `model(...)` returns under `torch.no_grad()`. One graph per shape and argument set, captured
    on its first call (a warm-up run, then the capture). Each call checks its arguments as the model does; a call
    with a captured graph's shapes and arguments launches it first (checked as those of an earlier call, the ids'
    range by `IdRangeCheck` and the weights' addresses while the graph runs). Outputs computed in the graph (the
    q_hats; without logits, the losses too) are copied out of its buffers, or, with `clone_outputs=False`, are those
    buffers: valid until the next call of the same shape."""

    def __init__(self, model: TRMModel, clone_outputs: bool = True):
        if not isinstance(model, TRMModel):
            raise TypeError(f"GraphedForward takes a trm_fast.TRMModel, got {type(model).__name__}")
        self.model, self.clone_outputs = model, clone_outputs
        self.graphs: Dict[tuple, tuple] = {}  # key -> (graph, static inputs, static outputs)
        self.pool, self.weights = None, None

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 target_ids: Optional[torch.Tensor] = None, supervision_steps: Optional[int] = None,
                 keep_logits: bool = True) -> Dict[str, Any]:
        model = self.model
        if model.training:
            raise ValueError("GraphedForward needs the model in eval mode (dropout would be frozen into the graph)")
        autocast = autocast_state()
        inputs = (input_ids, attention_mask, target_ids)
        key = (cuda_graphs.inputs_key(inputs), cuda_graphs.typed(supervision_steps), cuda_graphs.typed(keep_logits),
               autocast)
        if key in self.graphs:  # inputs like a checked call's: the GPU starts first, the host checks while it runs
            result = self._replay(self.graphs[key], inputs, keep_logits, autocast)
            if result is not None:
                return result
        if not _graphs_on(model.token_embed.weight.device):
            with torch.no_grad():
                return model(input_ids, attention_mask, target_ids, supervision_steps, keep_logits=keep_logits)
        model._check_inputs(input_ids, attention_mask, target_ids, supervision_steps)  # before the capture's warm-up
        if not keep_logits and target_ids is None:
            raise ValueError("keep_logits=False needs target_ids")
        weights = cuda_graphs.weights_key(model)
        if weights != self.weights:  # first call, or weights moved: graphs would read stale memory
            self.graphs, self.pool, self.weights = {}, None, weights
        self.graphs[key] = self._capture(inputs, supervision_steps, keep_logits, autocast)
        return self._replay(self.graphs[key], inputs, keep_logits, autocast)

    def _replay(self, graphs: tuple, inputs, keep_logits: bool, autocast) -> Optional[Dict[str, Any]]:
        """The outputs of a captured forward on `inputs`, or None where the weights moved since the capture (the
        replay read their old memory, which the graph holds: `cuda_graphs.held_weights`)."""
        graph, static_inputs, outputs, id_range, _ = graphs
        cuda_graphs.copy_into(static_inputs, inputs)
        graph.replay()
        id_range.check()
        model = self.model
        if cuda_graphs.weights_key(model) != self.weights:
            self.graphs, self.pool = {}, None
            return None
        if not keep_logits:
            return _cloned(outputs) if self.clone_outputs else outputs
        with torch.no_grad(), autocast_context(autocast), model.memoized_forward():  # the head's weight cast once
            result = model._supervision_outputs(outputs["states"], static_inputs[2], outputs["attention_mask"])
        if self.clone_outputs:
            result["q_hats"] = _cloned(result["q_hats"])
        return result

    def _capture(self, inputs, supervision_steps, keep_logits, autocast) -> tuple:
        """(graph, static input buffers, static outputs, the IdRangeCheck it holds, the weights it reads) for inputs
        like `inputs`."""
        model = self.model
        device = model.token_embed.weight.device
        static_inputs = cuda_graphs.static_copies(inputs, device)
        ids, mask, targets = static_inputs
        outputs: Dict[str, Any] = {}
        id_range = IdRangeCheck(model, ids, targets)

        def forward():
            id_range.bounds_then_clamp()
            with torch.no_grad():
                result = forward_for_capture(model, ids, mask, targets, supervision_steps, keep_logits, autocast,
                                             before_heads=True)
            outputs.clear()
            outputs.update(result)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = cuda_graphs.capture(forward, pool=self.pool)
        return graph, static_inputs, outputs, id_range, cuda_graphs.held_weights(model)


class IdRangeCheck:
    """The vocabulary check of a replay's id buffers (input, target), which holds the GPU back for none of the
    replay: `bounds_then_clamp()`, captured first in the graph, copies their [min, max] to the host and then clamps
    them into the vocabulary, so that the rest of the graph reads nothing outside the embeddings whatever the ids;
    after launching the graph, `check()` waits for that copy alone and raises as the model's input check does.
    A graph whose results a refused call throws away can hold it; one that changes state must be launched after
    the check."""

    def __init__(self, model: TRMModel, ids: torch.Tensor, targets: Optional[torch.Tensor]):
        self.named = {"input_ids": ids, **({"target_ids": targets} if targets is not None else {})}
        self.vocab_size = model.config.vocab_size
        self.host = torch.empty(2 * len(self.named), dtype=torch.long, pin_memory=ids.is_cuda)
        self.copied = torch.cuda.Event(external=True) if ids.is_cuda else None  # a node of the graph that records it

    def bounds_then_clamp(self) -> None:
        self.host.copy_(_bounds_then_clamp(self.named, self.vocab_size), non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def check(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()
        check_id_bounds(self.named, self.host.tolist(), self.vocab_size)


def _bounds_then_clamp(named: Dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """`id_bounds(named)`, then each tensor clamped into [0, vocab_size) in place: one kernel on CUDA
    (kernels/id_bounds.py), torch's steps elsewhere or without Triton."""
    ids = list(named.values())
    if ids[0].is_cuda:
        try:
            from trm_fast.kernels.id_bounds import id_bounds_then_clamp
        except ImportError:
            pass
        else:
            return id_bounds_then_clamp(ids, vocab_size)
    bounds = id_bounds(named)
    for t in ids:
        t.clamp_(0, vocab_size - 1)
    return bounds


def forward_for_capture(model: TRMModel, ids, mask, targets, supervision_steps, keep_logits: bool,
                        autocast: Optional[torch.dtype], before_heads: bool = False,
                        one_backward: bool = False) -> Dict[str, Any]:
    """The model's forward without its host-side checks (a read-back would break a capture), under `autocast`
    (a dtype, or None for off). With keep_logits and `before_heads`, only up to the output head: {"states":
    `_supervision_states`, "attention_mask"}, which `_supervision_outputs` finishes. `one_backward`: the caller
    runs the forward's backward exactly once (TRMModel.memoized_forward)."""
    with autocast_context(autocast):
        attention_mask = mask if mask is not None else (ids != model.config.pad_token_id).long()
        with model.memoized_forward(one_backward=(supervision_steps or 0) if one_backward else None):
            if keep_logits and before_heads:
                return {"states": model._supervision_states(ids, attention_mask, supervision_steps),
                        "attention_mask": attention_mask}
            if keep_logits:
                return model._forward(ids, attention_mask, targets, supervision_steps)
            return model._forward_without_logits(ids, attention_mask, targets, supervision_steps)


def autocast_context(autocast: Optional[torch.dtype]):
    """CUDA autocast to `autocast` (a dtype, or None for off), without autocast's cast cache (which breaks
    capture)."""
    return torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None, cache_enabled=False)


def autocast_state() -> Optional[torch.dtype]:
    """The dtype of CUDA autocast where it is on, else None."""
    return torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None


def _graphs_on(device: torch.device) -> bool:
    return device.type == "cuda"


def _cloned(value):
    """A copy of graph outputs: tensors, in dicts and lists (other values as they are)."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cloned(v) for v in value]
    return value
