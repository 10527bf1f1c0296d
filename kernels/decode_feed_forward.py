"""`trm_fast::decode_ffn_add_norm`: a TinyBlock's second half for the rows of a batched decode step,
`out[:] = layer_norm(h + linear(gelu(linear(h, w1, b1)), w2, b2))` (inference only).

Unfused this is four launches (two cuBLAS GEMMs, a GELU, an add + LayerNorm), about 12 us at 64 rows on
the H100, mostly fixed cost. Here it is three, from 5 to 64 rows:
- the first linear with bias and GELU in the tile kernel's epilogue (`decode_linear`);
- the second linear split along its long K (the hidden dimension) into SPLITS float32 partial products,
  so that more programs share the work and each one's loop over K is shorter;
- the add + LayerNorm kernel, which sums the partial products in a fixed order (deterministic), adds b2
  and h, and normalizes into `out` (any row stride: the decoder's y or z slot).
Elsewhere (1-4 rows: the matrix-vector kernels; more than 64: cuBLAS) it runs the decode linears and the
add + LayerNorm kernel one after another.
"""
import torch

from trm_fast import torch_ops
from trm_fast.kernels import add_layer_norm, decode_linear

SPLITS = 4


def decode_ffn_add_norm_triton(h, w1, b1, w2, b2, ln_weight, ln_bias, eps: float, out, splits: int = SPLITS,
                               config=None) -> None:
    """The tile-kernel path (`config`: the second linear's tiles, default `decode_linear.tile_config`)."""
    a = decode_linear.decode_linear_triton(h, w1, b1, True)
    parts = decode_linear.split_k_partials(a, w2, splits, config)
    add_layer_norm.add_layer_norm_triton(parts, h, ln_weight, ln_bias, eps, out, x_bias=b2)


def _check(h, w1, b1, w2, b2, ln_weight, ln_bias, out):
    if h.dim() != 2 or w1.dim() != 2 or w2.dim() != 2:
        raise ValueError("decode_ffn_add_norm: h, w1 and w2 must be 2-D")
    (M, D), hidden = h.shape, w1.shape[0]
    expected = {"w1": (w1, (hidden, D)), "b1": (b1, (hidden,)), "w2": (w2, (D, hidden)), "b2": (b2, (D,)),
                "ln_weight": (ln_weight, (D,)), "ln_bias": (ln_bias, (D,)), "out": (out, (M, D))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"decode_ffn_add_norm: {name} must be {list(shape)} for h {list(h.shape)} and w1 "
                             f"{list(w1.shape)}, got {list(tensor.shape)}")
    if any(t.dtype != h.dtype for t in (w1, b1, w2, b2)):
        raise ValueError(f"decode_ffn_add_norm: weights and biases must be of h's dtype {h.dtype}")
    if h.stride(1) != 1 or out.stride(1) != 1 or not (w1.is_contiguous() and w2.is_contiguous()):
        raise ValueError("decode_ffn_add_norm: h and out need contiguous rows, w1 and w2 must be contiguous")


@torch.library.custom_op("trm_fast::decode_ffn_add_norm", mutates_args=("out",))
def decode_ffn_add_norm(h: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                        ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    _check(h, w1, b1, w2, b2, ln_weight, ln_bias, out)
    if not h.is_cuda:
        torch_ops.decode_ffn_add_norm(h, w1, b1, w2, b2, ln_weight, ln_bias, eps, out)
    elif decode_linear.fits_tiles(h, w1):
        decode_ffn_add_norm_triton(h, w1, b1, w2, b2, ln_weight, ln_bias, eps, out)
    else:
        a = torch.ops.trm_fast.decode_linear(h, w1, b1, True)
        add_layer_norm.add_layer_norm_triton(torch.ops.trm_fast.decode_linear(a, w2, b2, False), h, ln_weight,
                                             ln_bias, eps, out)


@decode_ffn_add_norm.register_fake
def _(h, w1, b1, w2, b2, ln_weight, ln_bias, eps, out):
    return None
