"""`TRMModel`: the drop-in for the seed model, running TinyNet through the dispatch layer."""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import decoding, reference, seeds
from .early_exit import EarlyExit, compacted_early_exit
from .early_exit import reset_runs as reset_early_exit_runs
from .dispatch import check_kernels_choice, tinynet_ops
from .grad_sums import cast_summing_grads, joined_input, params_summing_grads, summing_grads
from .linear_cross_entropy import linear_cross_entropy
from .reference import TRMConfig
from .torch_ops import autocast_dtype


class DispatchTinyNet(reference.TinyNet):
    """The seed's TinyNet (same parameters and keys); each op runs on the backend chosen by `kernels`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.1, kernels: str = "auto"):
        super().__init__(d_model, n_heads, dropout)
        self.kernels = check_kernels_choice(kernels)
        self._memo: Optional[dict] = None

    @contextlib.contextmanager
    def memoized(self, z_copy_only: bool = False, joined_uses: int = 0):
        """Within, the TinyNet calls of one forward share the autocast copies of the linear weights (cast once,
        as autocast's own cache does for F.linear) and the key mask, instead of making them per call, and their
        dropout seeds are drawn together (trm_fast.seeds). `z_copy_only`: the forward reads `forward_xyz`'s output
        (the latent z) only through the projections, in the autocast dtype, so where states carry their copy in
        that dtype z is that copy alone (the same values; its LayerNorm writes no float32 output). `joined_uses`:
        the forward's backward runs once, so the weights' copies get JoinedRows for that many tracked calls
        (trm_fast.grad_sums: the FFN's, the output projection's and the QKV projection's weight gradients one GEMM
        each) and the gradient sums of the copies and LayerNorm parameters band slots."""
        outer = self._memo
        self._memo = {"z_copy_only": z_copy_only, "joined_uses": joined_uses} if outer is None else outer
        try:
            with seeds.drawn_together():
                yield
        finally:
            self._memo = outer

    def _joined_uses(self) -> int:
        """The memo's `joined_uses` (0 outside `memoized`)."""
        return self._memo["joined_uses"] if self._memo is not None else 0

    def _memo_get(self, key, make):
        if self._memo is None:
            return make()
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def linear_params(self, ops, *params: torch.Tensor):
        """The linear-layer parameters in the autocast dtype when autocast is on (else as they are), cast once per
        forward within `memoized` (the model's output head and embedding share its copy of the tied weight)."""
        dtype = autocast_dtype(params[0].device.type)
        if dtype is None:
            return params
        sum_grads = ops.SUMS_WEIGHT_GRADS and not torch.compiler.is_compiling()
        joined_uses = self._joined_uses()
        # the QKV weight's JoinedRows are shifted by a slot: the attention backward reads its output while it
        # writes the gradient
        qkv_weight = self.block.attn.in_proj_weight
        return tuple(self._memo_get((p, dtype), lambda p=p: self._cast(p, dtype, sum_grads, joined_uses,
                                                                       int(p is qkv_weight)))
                     for p in params)

    @staticmethod
    def _cast(param: torch.Tensor, dtype: torch.dtype, sum_grads: bool, joined_uses: int,
              joined_shift: int) -> torch.Tensor:
        """param.to(dtype), recorded for autograd even under no_grad: the training forward's no-grad deep steps
        come first, and its last step's gradient then flows through the same copy (one cast per parameter). With
        `sum_grads`, the ops add their gradients for it into a float32 sum (trm_fast.grad_sums), with JoinedRows
        for `joined_uses` tracked uses (shifted by `joined_shift` slots)."""
        with torch.enable_grad():
            return cast_summing_grads(param, dtype, joined_uses, joined_shift) if sum_grads else param.to(dtype)

    def _block(self, ops, h: torch.Tensor, attn_mask: Optional[torch.Tensor], copy_only: bool = False) -> torch.Tensor:
        """The TinyNet block on the projection's output h; with `copy_only` (where states carry copies) the new state
        is its copy in the autocast dtype alone."""
        block, attn = self.block, self.block.attn
        if ops.SUMS_WEIGHT_GRADS and h.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # h is read by the QKV projection and the first LayerNorm: the LayerNorm's backward hands its gradient of
            # h to a sum that the projection's input-gradient GEMM adds into (no add of the two)
            h = summing_grads(h)
        key_valid = self._memo_get(("key_valid", attn_mask), lambda: (attn_mask != 0) if attn_mask is not None else
                                   torch.ones(h.shape[:2], dtype=torch.bool, device=h.device))

        def p(rate: float) -> float:  # dropout rates apply in training only
            return rate if self.training else 0.0

        # where the op table says so, the biases of the output projection and of the FFN's second layer are added by
        # the LayerNorms after them (float32 masters, summed there), which also form their gradients
        out_bias, ffn_bias = attn.out_proj.bias, block.ffn[2].bias
        in_norm = ops.RESIDUAL_BIAS_IN_NORM
        a = ops.causal_attention(h, key_valid, *self.linear_params(ops, attn.in_proj_weight, attn.in_proj_bias,
                                                                   attn.out_proj.weight),
                                 None if in_norm else self.linear_params(ops, out_bias)[0], attn.num_heads,
                                 p(attn.dropout))
        # the FFN reads the LayerNorm's output in the autocast dtype: the copy autocast would make, written by the
        # LayerNorm itself
        ln1 = self._norm_params(ops, block.ln1, out_bias if in_norm else None)
        ffn_params = self.linear_params(ops, block.ffn[0].weight, block.ffn[0].bias, block.ffn[2].weight)
        # in a tracked call the FFN's input goes to a slot of its first weight's JoinedRows, if it has them
        cast_into = joined_input(ffn_params[0], h.shape)
        h, h_cast = ops.add_layer_norm_and_cast(h, a, ln1[0], ln1[1], block.ln1.eps, p(block.dropout.p),
                                                autocast_dtype(h.device.type), ln1[2] if in_norm else None,
                                                cast_into=cast_into)
        f = ops.feed_forward(h_cast, *ffn_params, None if in_norm else self.linear_params(ops, ffn_bias)[0])
        ln2 = self._norm_params(ops, block.ln2, ffn_bias if in_norm else None)
        args = (h, f, ln2[0], ln2[1], block.ln2.eps, p(block.ffn[3].p))
        residual_bias = ln2[2] if in_norm else None
        copy_dtype = _state_copy_dtype(ops, h)
        if copy_dtype is None:
            return ops.add_layer_norm(*args, residual_bias)
        # the new state and its copy in the autocast dtype, which the next calls' projections read (their gradients
        # summed in float32 by the GEMMs that form them)
        state, copy = ops.add_layer_norm_and_cast(*args, copy_dtype, residual_bias, cast_sums_grads=True,
                                                  cast_only=copy_only)
        _keep_copy(state, copy)
        return state

    def _projection_inputs(self, ops, states: tuple) -> tuple:
        """The states as the projection reads them: where the op table says so, their copies in the autocast dtype
        (made by the call that made the state, or here once and kept with the state: x's for every call)."""
        dtype = _state_copy_dtype(ops, states[0])
        return states if dtype is None else tuple(_copy_of(state, dtype) for state in states)

    def _norm_params(self, ops, norm: torch.nn.LayerNorm, residual_bias: Optional[torch.Tensor]) -> tuple:
        """A LayerNorm's weight and bias (and the residual bias it adds, when given): where the op table sums
        gradients, aliases that share one float32 gradient sum (trm_fast.grad_sums), once per forward as the
        linear parameters' casts are."""
        params = (norm.weight, norm.bias) + ((residual_bias,) if residual_bias is not None else ())
        if not (ops.SUMS_WEIGHT_GRADS and norm.weight.requires_grad) or torch.compiler.is_compiling():
            return params

        def aliases():
            with torch.enable_grad():
                return params_summing_grads(*params, band_slots=self._joined_uses())
        return self._memo_get(("norm",) + params, aliases)

    def reads_z_as_copy(self) -> bool:
        """Within `memoized(z_copy_only=True)`: the forward reads z only through its autocast copy."""
        return self._memo is not None and self._memo["z_copy_only"]

    def forward_xyz(self, x, y, z, attn_mask):
        ops = tinynet_ops(self.kernels, x.device)
        h = ops.concat_linear(self._projection_inputs(ops, (x, y, z)),
                              *self.linear_params(ops, self.xyz_proj.weight, self.xyz_proj.bias),
                              self._qkv_input_slot(ops, x))
        return self._block(ops, h, attn_mask, self.reads_z_as_copy())

    def forward_yz(self, y, z, attn_mask):
        ops = tinynet_ops(self.kernels, y.device)
        h = ops.concat_linear(self._projection_inputs(ops, (y, z)),
                              *self.linear_params(ops, self.yz_proj.weight, self.yz_proj.bias),
                              self._qkv_input_slot(ops, y))
        return self._block(ops, h, attn_mask)

    def _qkv_input_slot(self, ops, state: torch.Tensor) -> Optional[torch.Tensor]:
        """Where a tracked call's projection writes its output h (the QKV projection's input): the next input slot
        of the QKV weight's JoinedRows, if it has them (trm_fast.grad_sums), else None."""
        if not self._joined_uses():
            return None
        return joined_input(self.linear_params(ops, self.block.attn.in_proj_weight)[0], state.shape)


def _state_copy_dtype(ops, state: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype where the op table has states carry a copy in it (eager calls), else None."""
    if not ops.STATES_CARRY_COPIES or torch.compiler.is_compiling():
        return None
    return autocast_dtype(state.device.type)


def _keep_copy(state: torch.Tensor, copy: torch.Tensor) -> None:
    """Attach `copy` (state in another dtype) to `state`, valid while state is not modified in place; nothing
    when the copy is the state itself (a state already in that dtype: no reference cycle)."""
    if copy is not state:
        state.dtype_copy = (copy, state._version)


def _copy_of(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """state in `dtype`: the copy attached to it, else a cast, attached (recorded for autograd even under no_grad,
    as the weights' casts are; its gradient summed in float32 where its uses support that: trm_fast.grad_sums)."""
    if state.dtype == dtype:
        return state
    copy, version = getattr(state, "dtype_copy", (None, None))
    if copy is None or copy.dtype != dtype or version != state._version:
        with torch.enable_grad():
            copy = cast_summing_grads(state, dtype) if state.requires_grad else state.to(dtype)
        _keep_copy(state, copy)
    return copy


def _check_positive_int(name: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}")


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int, device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {ids.dtype}")
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"{name} must have shape [batch, seq_len] with both > 0, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but the model is on {device}")


def id_bounds(named_ids: Dict[str, torch.Tensor]) -> torch.Tensor:
    """[min, max] of each tensor, in one int64 tensor on their device (one read-back checks them all)."""
    return torch.cat([torch.stack(torch.aminmax(ids)) for ids in named_ids.values()]).long()


def check_id_bounds(names, bounds: List[int], vocab_size: int) -> None:
    """Raise unless each named tensor's [min, max] (flattened in `bounds`) lies within [0, vocab_size)."""
    for name, low, high in zip(names, bounds[::2], bounds[1::2]):
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} has ids outside [0, vocab_size={vocab_size}): min {low}, max {high}")


class TRMModel(reference.TRMModel):
    """Drop-in for the seed `TRMModel`: same constructor, methods, outputs and state_dict keys.

    `kernels`: "auto" (Triton on CUDA when available, else torch), "torch", or "triton".
    """

    def __init__(self, config: TRMConfig, kernels: str = "auto"):
        if not isinstance(config, TRMConfig):
            raise TypeError(f"config must be a TRMConfig, got {type(config).__name__} (use TRMConfig.from_dict)")
        super().__init__(config)
        self.kernels = kernels

    def _make_tiny_net(self, config: TRMConfig) -> DispatchTinyNet:
        return DispatchTinyNet(config.d_model, config.n_heads, config.dropout)

    @property
    def kernels(self) -> str:
        return self.tiny_net.kernels

    @kernels.setter
    def kernels(self, value: str) -> None:
        self.tiny_net.kernels = check_kernels_choice(value)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                target_ids: Optional[torch.Tensor] = None, supervision_steps: Optional[int] = None,
                return_diagnostics: bool = False, early_exit: Optional[EarlyExit] = None,
                keep_logits: bool = True) -> Dict[str, Any]:
        """The seed's forward. `early_exit=EarlyExit(threshold, criterion, min_steps)` runs token-level
        early exit instead (inference; trm_fast.early_exit): logits, exit_step, exit_counts, shallow_ratio,
        compute_cost, and ce_loss when target_ids are given. `keep_logits=False` (with target_ids) computes
        each step's loss with `linear_cross_entropy`, never holding [B, L, vocab] logits: the losses and
        q_hats as usual, "logits" None and "all_logits" empty."""
        self._check_inputs(input_ids, attention_mask, target_ids, supervision_steps)
        if early_exit is not None:
            result = compacted_early_exit(self, input_ids, early_exit, attention_mask, supervision_steps)
            if target_ids is not None:
                result["ce_loss"] = F.cross_entropy(result["logits"].flatten(0, 1).float(), target_ids.flatten(),
                                                    ignore_index=self.config.pad_token_id)
            return result
        if not isinstance(return_diagnostics, bool):
            raise TypeError(f"return_diagnostics must be a bool, got {type(return_diagnostics).__name__}")
        if not keep_logits:
            if target_ids is None or return_diagnostics:
                raise ValueError("keep_logits=False needs target_ids and excludes return_diagnostics (both use logits)")
            if attention_mask is None:
                attention_mask = (input_ids != self.config.pad_token_id).long()
            with self.memoized_forward():
                return self._forward_without_logits(input_ids, attention_mask, target_ids, supervision_steps)
        with self.memoized_forward(return_diagnostics):
            return super().forward(input_ids, attention_mask, target_ids, supervision_steps, return_diagnostics)

    def memoized_forward(self, diagnostics: bool = False, one_backward: Optional[int] = None):
        """TinyNet's `memoized` for one forward of the model: z only as its autocast copy unless a TinyNet call hook
        (trm_fast.task_vectors) or the diagnostics' trace reads it. `one_backward` (the forward's supervision steps,
        0 for the config's): the caller runs the forward's backward exactly once, so its tracked TinyNet calls may
        share row buffers for their weight gradients (`memoized`'s joined_uses; trm_fast.graphed_train_step)."""
        joined_uses = 0
        if one_backward is not None:  # the tracked calls: the last latent recursion of each supervision step
            joined_uses = 2 * self.config.latent_steps * (one_backward or self.config.supervision_steps)
        return self.tiny_net.memoized(z_copy_only=self._call_hook is None and not diagnostics,
                                      joined_uses=joined_uses)

    def _check_inputs(self, input_ids, attention_mask, target_ids, supervision_steps,
                      check_ranges: bool = True) -> None:
        """The forward's arguments: ids in range on the model's device, mask and targets of their shape. The
        replayed graphs check the ranges themselves (`check_ranges=False`: trm_fast.graphed_forward)."""
        device = self.token_embed.weight.device
        _check_ids("input_ids", input_ids, self.config.vocab_size, device)
        for name, other in (("attention_mask", attention_mask), ("target_ids", target_ids)):
            if other is not None and (not isinstance(other, torch.Tensor) or other.shape != input_ids.shape):
                shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
        named_ids = {"input_ids": input_ids}
        if target_ids is not None:
            _check_ids("target_ids", target_ids, self.config.vocab_size, device)
            named_ids["target_ids"] = target_ids
        _check_positive_int("supervision_steps", supervision_steps, allow_none=True)
        if check_ranges and not torch.compiler.is_compiling():
            check_id_bounds(named_ids, id_bounds(named_ids).tolist(), self.config.vocab_size)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The seed's embedding on the op table's `embed`; where the op table sums weight gradients and the output
        head shares the token weight, the embedding adds its gradient into the head's cast copy's sum."""
        self._grow_positional_table(input_ids.size(1))
        ops = tinynet_ops(self.kernels, input_ids.device)
        head_copy = None
        if ops.SUMS_WEIGHT_GRADS and self.config.tie_embeddings and torch.is_grad_enabled():
            head_copy, = self.tiny_net.linear_params(ops, self.output_head.weight)  # (the op uses its grad sum, if any)
        return ops.embed(input_ids, self.token_embed.weight, self.pos_embed.weight, self.config.pad_token_id,
                         self.dropout.p if self.training else 0.0, head_copy)

    def _init_states(self, x: torch.Tensor):
        """The seed's (x.clone(), zeros); where states carry their autocast copy, y's is x's and z's zeros in that
        dtype (no casts of their own). Where the forward reads z only through its copy (`reads_z_as_copy`), y is x
        itself (the clone is never written in place and is read through x's copy) and z its copy alone."""
        dtype = _state_copy_dtype(tinynet_ops(self.kernels, x.device), x)
        if dtype is not None and self.tiny_net.reads_z_as_copy():
            _copy_of(x, dtype)
            return x, torch.zeros_like(x, dtype=dtype)
        y, z = super()._init_states(x)
        if dtype is not None:
            _keep_copy(y, _copy_of(x, dtype))
            _keep_copy(z, torch.zeros_like(z, dtype=dtype))
        return y, z

    def _deep_recursion_step(self, x, y, z, attention_mask):
        """The seed's deep recursion step; the detached states it hands to the next step keep their autocast copies
        (detached), which that step's projections read instead of casting the states again."""
        y, z, y_next, z_next = super()._deep_recursion_step(x, y, z, attention_mask)
        for state, detached in ((y, y_next), (z, z_next)):
            copy, version = getattr(state, "dtype_copy", (None, None))
            if copy is not None:
                detached.dtype_copy = (copy.detach(), version)
        return y, z, y_next, z_next

    def _output_logits(self, y: torch.Tensor) -> torch.Tensor:
        """The output head; where the op table has states carry their autocast copy, on y's copy with the head's
        weight cast once per forward (their gradients summed in float32: trm_fast.grad_sums)."""
        ops = tinynet_ops(self.kernels, y.device)
        dtype = _state_copy_dtype(ops, y)
        if dtype is None:
            return super()._output_logits(y)
        return ops.linear(_copy_of(y, dtype), *self.tiny_net.linear_params(ops, self.output_head.weight), None)

    def _q_hat(self, y: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The seed's q head on the op table's `q_head` (with the Triton ops one kernel each way)."""
        norm, linear = self.q_head
        return tinynet_ops(self.kernels, y.device).q_head(self._pool_for_q(y, attention_mask), norm.weight, norm.bias,
                                                          norm.eps, linear.weight, linear.bias,
                                                          autocast_dtype(y.device.type))

    def _pool_for_q(self, y: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The seed's pooling of y for the q head, on the op table's `masked_mean`."""
        return tinynet_ops(self.kernels, y.device).masked_mean(y, attention_mask)

    def _supervision_losses(self, logits, q_hat, target_ids, attention_mask):
        """The seed's step losses, the cross-entropy and argmax on the kernels' op (one read of the logits)."""
        ops = tinynet_ops(self.kernels, logits.device)
        ce_loss, correct = ops.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1),
                                             self.config.pad_token_id)
        return ce_loss, self._halting_loss(ops, correct, q_hat, target_ids, attention_mask)

    def _halting_loss(self, ops, correct, q_hat, target_ids, attention_mask) -> torch.Tensor:
        """A step's ACT loss from its bool argmax == target per token (on the op table's `halting_loss`)."""
        return ops.halting_loss(correct.view_as(target_ids), attention_mask, q_hat, self.config.act_threshold)

    def _mean_losses(self, ce_losses, act_losses):
        """The seed's mean losses, on the op table's `mean_losses`."""
        ops = tinynet_ops(self.kernels, ce_losses[0].device)
        return ops.mean_losses(ce_losses, act_losses, self.config.act_weight)

    def _supervision_outputs(self, states, target_ids, attention_mask) -> Dict[str, Any]:
        """The seed's outputs; where states carry their autocast copy and the losses need gradients, each step's
        output head and loss are one op whose forward also forms the loss's gradient (no second read of the
        logits: kernels/head_cross_entropy.py)."""
        ops = tinynet_ops(self.kernels, self.output_head.weight.device)
        dtype = _state_copy_dtype(ops, states[0][0]) if states else None
        if target_ids is None or dtype is None or not torch.is_grad_enabled():
            return super()._supervision_outputs(states, target_ids, attention_mask)
        weight, = self.tiny_net.linear_params(ops, self.output_head.weight)

        def head_and_loss(y):
            logits, ce, correct = ops.head_cross_entropy(_copy_of(y, dtype).flatten(0, 1), weight,
                                                         target_ids.flatten(), self.config.pad_token_id)
            return logits.view(*y.shape[:2], -1), ce, correct
        return self._outputs_from_fused_heads(ops, states, target_ids, attention_mask, head_and_loss)

    def _forward_without_logits(self, input_ids, attention_mask, target_ids, supervision_steps) -> Dict[str, Any]:
        """The seed's training forward with the output head and cross-entropy fused per step."""
        def head_and_loss(y):
            ce, correct = linear_cross_entropy(y.reshape(-1, y.size(-1)), self.output_head.weight,
                                               target_ids.reshape(-1), self.config.pad_token_id)
            return None, ce, correct
        states = self._supervision_states(input_ids, attention_mask, supervision_steps)
        ops = tinynet_ops(self.kernels, input_ids.device)
        return self._outputs_from_fused_heads(ops, states, target_ids, attention_mask, head_and_loss)

    def _outputs_from_fused_heads(self, ops, states, target_ids, attention_mask, head_and_loss) -> Dict[str, Any]:
        """The forward's result where `head_and_loss(y)` gives a step's (logits or None, cross-entropy, bool argmax ==
        target per token)."""
        all_logits, ce_losses, act_losses = [], [], []
        for y_grad, q_hat in states:
            logits, ce, correct = head_and_loss(y_grad)
            all_logits += [logits] if logits is not None else []
            ce_losses.append(ce)
            act_losses.append(self._halting_loss(ops, correct, q_hat, target_ids, attention_mask))
        return self._outputs(all_logits, [q_hat for _, q_hat in states], (ce_losses, act_losses))

    # -- generation (exact incremental decoding: trm_fast.decoding) ------------------------------------
    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 0.0, repetition_penalty: float = 1.0,
                 supervision_steps: Optional[int] = None, q_threshold: Optional[float] = 0.7,
                 device: Optional[torch.device] = None) -> List[int]:
        """The seed's `generate` (same arguments, same tokens), decoded incrementally with a KV cache.

        In training mode with dropout > 0 it runs the seed's algorithm, whose dropout masks an incremental
        decoder cannot reproduce. Greedy decoding on CUDA (`top_k=1`) takes the argmax on the GPU where
        the seed draws from a one-hot distribution: the same tokens, without using the random generator.
        """
        prompt = self._check_prompt("prompt_ids", prompt_ids)
        self._check_generation_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                    supervision_steps, q_threshold)
        if device is not None and torch.device(device) != self.token_embed.weight.device:
            raise ValueError(f"device {device} differs from the model's device {self.token_embed.weight.device}")
        if self.training and self.config.dropout > 0:
            return super().generate(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                    supervision_steps, q_threshold, device)
        new = decoding.decode(self, [prompt], max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                              supervision_steps, q_threshold, stop_ids=self._stop_ids(None))
        return prompt + [token for _, token in new]

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 0.0, repetition_penalty: float = 1.0,
                       supervision_steps: Optional[int] = None, q_threshold: Optional[float] = 0.7,
                       per_sequence_halting: bool = False, eos_token_id: Optional[int] = None,
                       schedule: str = "auto", cuda_graph: Optional[bool] = None) -> List[List[int]]:
        """Decode prompts of different lengths together; returns each prompt + its new tokens.

        A sequence stops after the pad id (the seed's rule) or `eos_token_id` (default: the config's) and
        leaves the batch. Halting is batch-wide over the unfinished sequences, as the seed's (stop the
        supervision loop when every q_hat exceeds `q_threshold`); with `per_sequence_halting=True` each
        sequence halts on its own and gets exactly what `generate` gives it alone. Dropout is not applied.
        `schedule` ("auto", "lazy", "all_steps") and `cuda_graph` pick how it runs, not what it returns.
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        batch = [self._check_prompt(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
        self._check_generation_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                    supervision_steps, q_threshold)
        if schedule not in ("auto", "lazy", "all_steps"):
            raise ValueError(f"schedule must be 'auto', 'lazy' or 'all_steps', got {schedule!r}")
        if cuda_graph and (schedule == "lazy" or not self.token_embed.weight.is_cuda):
            raise ValueError("cuda_graph=True needs a model on CUDA and the 'all_steps' (or 'auto') schedule")
        outputs = [list(p) for p in batch]
        for row, token in decoding.decode(self, batch, max_new_tokens, temperature, top_k, top_p,
                                          repetition_penalty, supervision_steps, q_threshold,
                                          per_sequence_halting, self._stop_ids(eos_token_id), schedule, cuda_graph):
            outputs[row].append(token)
        return outputs

    @torch.no_grad()
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 0.0, repetition_penalty: float = 1.0,
               supervision_steps: Optional[int] = None, q_threshold: Optional[float] = 0.7,
               eos_token_id: Optional[int] = None) -> Iterator[int]:
        """Yield the new token ids of `generate(prompt_ids, ...)` one by one, as each is decided."""
        prompt = self._check_prompt("prompt_ids", prompt_ids)
        self._check_generation_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                                    supervision_steps, q_threshold)
        return self._stream(prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                            supervision_steps, q_threshold, self._stop_ids(eos_token_id))

    def _stream(self, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, supervision_steps,
                q_threshold, stop_ids) -> Iterator[int]:
        with torch.no_grad():
            for _, token in decoding.decode(self, [prompt], max_new_tokens, temperature, top_k, top_p,
                                            repetition_penalty, supervision_steps, q_threshold,
                                            stop_ids=stop_ids, sync_every=1):
                yield token

    def reset_state(self) -> None:
        """Drop the decoding and early-exit caches and captured CUDA graphs kept between calls."""
        decoding.reset_decoders(self)
        reset_early_exit_runs(self)

    def _stop_ids(self, eos_token_id: Optional[int]) -> List[int]:
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        if eos is not None and not (isinstance(eos, int) and 0 <= eos < self.config.vocab_size):
            raise ValueError(f"eos_token_id must be an int in [0, vocab_size={self.config.vocab_size}), got {eos!r}")
        return [self.config.pad_token_id] + ([eos] if eos is not None else [])

    def _check_prompt(self, name: str, prompt_ids: Sequence[int]) -> List[int]:
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.tolist()
        try:
            prompt = [operator.index(t) for t in prompt_ids]
        except TypeError as exc:
            raise TypeError(f"{name} must be a sequence of int token ids ({exc})") from None
        if not prompt:
            raise ValueError(f"{name} must contain at least one token id")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"{name} has ids outside [0, vocab_size={self.config.vocab_size}): {bad[:5]}")
        return prompt

    @staticmethod
    def _check_generation_args(max_new_tokens, temperature, top_k, top_p, repetition_penalty, supervision_steps,
                               q_threshold) -> None:
        _check_positive_int("max_new_tokens", max_new_tokens, allow_zero=True)
        _check_positive_int("top_k", top_k, allow_zero=True)
        _check_positive_int("supervision_steps", supervision_steps, allow_none=True)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
        if q_threshold is not None and not 0.0 <= q_threshold <= 1.0:
            raise ValueError(f"q_threshold must be None or in [0, 1], got {q_threshold!r}")
