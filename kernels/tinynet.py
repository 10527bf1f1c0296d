"""The Triton TinyNet op table, with the interface of `trm_fast.torch_ops`: `TRMModel(config, kernels="triton")`
runs TinyNet on these ops (each a `torch.library` op with a fake kernel and autograd; Triton on CUDA, the
same math in PyTorch elsewhere).

`AUTO_ON_CUDA` is False: on the H100 these ops win when a step is replayed as one CUDA graph
(`GraphedForward`, `GraphedTrainStep`: 1.9x and 1.3x torch.compile), but launched one by one from the host
they are slower than the torch path (more, smaller kernels; benchmarks/NOTES.md, issue 3), so
`kernels="auto"` keeps the torch path and an explicit `kernels="triton"` selects these ops.
"""
from trm_fast.kernels.attention import causal_attention  # noqa: F401
from trm_fast.kernels.concat_linear import concat_linear  # noqa: F401
from trm_fast.kernels.cross_entropy import cross_entropy  # noqa: F401
from trm_fast.kernels.embedding import embed  # noqa: F401
from trm_fast.kernels.feed_forward import feed_forward  # noqa: F401
from trm_fast.kernels.halting_loss import halting_loss  # noqa: F401
from trm_fast.kernels.head_cross_entropy import head_cross_entropy  # noqa: F401
from trm_fast.kernels.linear import linear  # noqa: F401
from trm_fast.kernels.masked_mean import masked_mean  # noqa: F401
from trm_fast.kernels.mean_losses import mean_losses  # noqa: F401
from trm_fast.kernels.q_head import q_head  # noqa: F401
from trm_fast.kernels.residual_layer_norm import add_layer_norm, add_layer_norm_and_cast  # noqa: F401

AUTO_ON_CUDA = False
# TinyNet leaves the biases of the output projection and of the FFN's second layer to `add_layer_norm`, whose
# backward reduction then forms their gradients (no column sums of their own)
RESIDUAL_BIAS_IN_NORM = True
# the ops add their weight gradients into the float32 sums of the weights' cast copies (trm_fast.grad_sums)
SUMS_WEIGHT_GRADS = True
# TinyNet's output state carries its copy in the autocast dtype, written by its last LayerNorm, which the next calls'
# projections read (the concat kernel at bf16 speed); the copy's gradients are summed in float32 (trm_fast.grad_sums)
STATES_CARRY_COPIES = True
