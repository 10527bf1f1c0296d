"""`GraphedTrainStep`: a whole training step (forward, backward, optimizer step) replayed as two CUDA graphs.

A train step of the seed's config launches about 900 kernels, and on a slow host their launches, not the GPU,
set its time (benchmarks/NOTES.md, issue 3). Captured once per input shape, a step is two launches: the forward
and backward, then the update, which the host launches once the ids' range check (`IdRangeCheck`, read back
from the first graph while the GPU runs it) and the checks of what the graphs read have passed, so no weight changes
on a refused step (a call with the shapes of a captured one launches the first graph before any host check). Dropout
stays random: the Triton kernels' seeds and torch's dropout are drawn from torch's CUDA generator, whose
state a replay advances. The first call of a shape is an ordinary step (it also warms up: optimizer state,
Triton autotuning), after which the step is captured; later calls replay it.

What a graph fixes at capture: the optimizer's hyper-parameters that are Python numbers (a learning rate that
changes between steps must be a tensor, updated in place, e.g. `AdamW(params, lr=torch.tensor(3e-4,
device="cuda"), capturable=True)`; a float one that changes after capture raises), the autocast state and
the model's train / eval mode (both part of the graph's key), and the addresses of the weights and of the
optimizer's state (when they change, e.g. after `model.to` or `optimizer.load_state_dict`, the graphs are
captured again). Gradients are not accumulated across calls: each call is one step from zeroed gradients.
Off CUDA each call runs the step eagerly.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import cuda_graphs
from .graphed_forward import IdRangeCheck, _graphs_on, autocast_state, forward_for_capture
from .model import TRMModel

LOSSES = ("loss", "ce_loss", "act_loss")


def backward_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                      max_grad_norm: Optional[float] = None) -> None:
    """The update of a training step from its loss, on gradients the caller zeroed: backward, then `update`."""
    loss.backward()
    update(model, optimizer, max_grad_norm)


def update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float] = None) -> None:
    """Gradient-norm clipping (when `max_grad_norm` is given), then the optimizer's step."""
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


class GraphedTrainStep:
    """`step(input_ids, attention_mask=None, target_ids=..., supervision_steps=None)` trains `model` one step
    with `optimizer` (built with `capturable=True` where it has the option: torch's Adam, AdamW, ...) and
    returns {"loss", "ce_loss", "act_loss"} of that step's forward. `max_grad_norm` clips the gradients' norm
    first; `keep_logits=False` computes the losses without [B, L, vocab] logits (TRMModel's option)."""

    def __init__(self, model: TRMModel, optimizer: torch.optim.Optimizer, max_grad_norm: Optional[float] = None,
                 keep_logits: bool = True):
        if not isinstance(model, TRMModel):
            raise TypeError(f"GraphedTrainStep takes a trm_fast.TRMModel, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be None or > 0, got {max_grad_norm!r}")
        self.model, self.optimizer = model, optimizer
        self.max_grad_norm, self.keep_logits = max_grad_norm, keep_logits
        self.graphs: Dict[tuple, tuple] = {}  # key -> what _capture returns
        self.weights, self.state = None, None
        if _graphs_on(model.token_embed.weight.device):
            self._check_capturable()

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 target_ids: Optional[torch.Tensor] = None,
                 supervision_steps: Optional[int] = None) -> Dict[str, torch.Tensor]:
        model = self.model
        if target_ids is None:
            raise ValueError("GraphedTrainStep needs target_ids (a training step minimizes their loss)")
        inputs = (input_ids, attention_mask, target_ids)
        autocast = autocast_state()
        key = (cuda_graphs.inputs_key(inputs), cuda_graphs.typed(supervision_steps), autocast, model.training)
        if key in self.graphs:  # inputs like a checked call's: the GPU starts first, the host checks while it runs
            losses = self._replay(self.graphs[key], inputs)
            if losses is not None:
                return losses
        model._check_inputs(input_ids, attention_mask, target_ids, supervision_steps)  # the ranges too, before a step
        if not _graphs_on(model.token_embed.weight.device):
            return self._step(inputs, supervision_steps, autocast)
        weights, state = cuda_graphs.weights_key(model), self._state_key()
        if (weights, state) != (self.weights, self.state):  # moved or replaced: every shape's graphs are stale
            self.graphs = {}
        losses = cuda_graphs.on_side_stream(lambda: self._step(inputs, supervision_steps, autocast))
        self.graphs[key] = self._capture(inputs, supervision_steps, autocast)
        self.weights, self.state = weights, self._state_key()  # (the first step created the optimizer's state)
        return losses

    def _replay(self, graphs: tuple, inputs) -> Optional[Dict[str, torch.Tensor]]:
        """A captured step on `inputs`: the forward-backward graph, then the host's checks (ids' range, the weights'
        and the optimizer state's addresses, float learning rates), then the update graph; None, with nothing updated,
        where the weights or the optimizer's state moved since the capture (the replay read their old memory, which
        the graphs hold, and wrote only memory of their own)."""
        forward_backward, update_graph, static_inputs, static_losses, lrs, id_range, _ = graphs
        cuda_graphs.copy_into(static_inputs, inputs)
        forward_backward.replay()  # changes no weight
        id_range.check()
        if (cuda_graphs.weights_key(self.model), self._state_key()) != (self.weights, self.state):
            self.graphs = {}
            return None
        if self._float_lrs() != lrs:
            raise ValueError("a learning rate given as a float changed since the step was captured; give the "
                             "optimizer tensor learning rates and update them in place (fill_)")
        update_graph.replay()
        return {name: t.clone() for name, t in static_losses.items()}

    def _step(self, inputs, supervision_steps, autocast) -> Dict[str, torch.Tensor]:
        """One training step from zeroed gradients; the forward's losses, detached."""
        losses = self._forward_backward(inputs, supervision_steps, autocast)
        update(self.model, self.optimizer, self.max_grad_norm)
        return losses

    def _forward_backward(self, inputs, supervision_steps, autocast) -> Dict[str, torch.Tensor]:
        """Zeroed gradients, the forward and its backward; the forward's losses, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        result = forward_for_capture(self.model, *inputs, supervision_steps, self.keep_logits, autocast,
                                     one_backward=True)
        result["loss"].backward()
        return {name: result[name].detach() for name in LOSSES}

    def _capture(self, inputs, supervision_steps, autocast) -> tuple:
        """(forward-backward graph, update graph, static input buffers, static losses, float learning rates, the
        IdRangeCheck the first graph holds, the weights they read: `held_weights`) of a step on inputs like `inputs`.
        The two graphs share a memory pool of their own (the update reads the gradients the first leaves in it)."""
        self._check_capturable()
        static_inputs = cuda_graphs.static_copies(inputs, self.model.token_embed.weight.device)
        static_losses: Dict[str, torch.Tensor] = {}
        id_range = IdRangeCheck(self.model, static_inputs[0], static_inputs[2])

        def forward_backward():
            id_range.bounds_then_clamp()
            static_losses.update(self._forward_backward(static_inputs, supervision_steps, autocast))
        forward_backward_graph = cuda_graphs.capture(forward_backward, warmups=0)
        update_graph = cuda_graphs.capture(lambda: update(self.model, self.optimizer, self.max_grad_norm),
                                           warmups=0, pool=forward_backward_graph.pool())
        return (forward_backward_graph, update_graph, static_inputs, static_losses, self._float_lrs(), id_range,
                cuda_graphs.held_weights(self.model))

    def _check_capturable(self) -> None:
        if any(group.get("capturable") is False for group in self.optimizer.param_groups):
            raise ValueError(f"{type(self.optimizer).__name__} must be built with capturable=True to be replayed in "
                             "a CUDA graph (its step counter then lives on the GPU)")

    def _state_key(self) -> tuple:
        """The addresses of the optimizer's state tensors, which the update graph reads and writes."""
        return tuple(t.data_ptr() for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t))

    def _float_lrs(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups if not isinstance(group["lr"], torch.Tensor)]
