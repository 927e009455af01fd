"""CLIP's MLP with an activation that keeps one tensor for backward instead of two.

OpenAI CLIP uses QuickGELU, `x * sigmoid(1.702 x)`. Written as plain tensor ops (as transformers does),
autograd keeps both `x` and `sigmoid(1.702 x)` for backward: two tensors of the MLP's hidden width (4x the
model width) per layer, the largest thing a frozen CLIP block saves. `quick_gelu` keeps only `x` and
recomputes the sigmoid in backward, one cheap element-wise op. For ViT-B/16 at batch 4 with 10 prompts of
77 tokens the sigmoid copies are 183 MiB of the 715 MiB fo kept (docs/benchmarks.md, optimisation 4).
The forward is bitwise the same as transformers'; the gradient agrees to rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from transformers.activations import QuickGELUActivation  # what transformers builds for hidden_act="quick_gelu"

_ALPHA = 1.702
_CHUNK = 1 << 18  # elements per piece of the backward (1 MiB in fp32): bounds its temporaries


class _QuickGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sigmoid(_ALPHA * x).mul_(x)  # = x * sigmoid(1.702 x), the same rounding

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # d/dx [x s(ax)] = s + a x s (1 - s). Small tensors: built in place, three buffers of x's size at most
        # (the gradient, s, the derivative). Large ones: in at most 16 pieces written into the result, holding
        # the gradient, the result and two small pieces.
        step = max(_CHUNK, -(-x.numel() // 16))
        if x.numel() <= step:
            return _slope(x).mul_(grad)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        xs, gs, outs = x.reshape(-1), grad.contiguous().view(-1), out.view(-1)
        for i in range(0, xs.numel(), step):
            torch.mul(_slope(xs[i:i + step]), gs[i:i + step], out=outs[i:i + step])
        return out


def _slope(x: torch.Tensor) -> torch.Tensor:
    """d/dx [x sigmoid(a x)] = s + a x s (1 - s) with s = sigmoid(a x), built in place on one new buffer."""
    s = torch.sigmoid(_ALPHA * x)
    return torch.sub(1.0, s).mul_(s).mul_(x).mul_(_ALPHA).add_(s)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """`x * sigmoid(1.702 x)` that saves only `x` for backward."""
    return _QuickGELU.apply(x)


def run_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' CLIPMLP (fc1 -> activation -> fc2), with the lean QuickGELU when autograd records.

    Other activations (some hub checkpoints use GELU) run as the model defines them.
    """
    act = getattr(mlp, "activation_fn", None)
    if torch.is_grad_enabled() and isinstance(act, QuickGELUActivation) and hasattr(mlp, "fc1"):
        return mlp.fc2(quick_gelu(mlp.fc1(x)))
    return mlp(x)
