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

try:  # the class transformers uses for hidden_act="quick_gelu"
    from transformers.activations import QuickGELUActivation
except ImportError:  # pragma: no cover - transformers is a hard dependency; kept for clarity
    QuickGELUActivation = ()

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
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        xs, gs, outs = x.reshape(-1), grad.contiguous().view(-1), out.view(-1)
        # d/dx [x s(ax)] = s + a x s (1 - s), in at most 16 pieces written into the result: the backward then
        # holds the incoming gradient, the result and two small pieces instead of three full-size buffers.
        step = max(_CHUNK, -(-xs.numel() // 16))
        for i in range(0, xs.numel(), step):
            xi = xs[i:i + step]
            s = torch.sigmoid(_ALPHA * xi)
            d = torch.sub(1.0, s).mul_(s).mul_(xi).mul_(_ALPHA).add_(s)
            torch.mul(d, gs[i:i + step], out=outs[i:i + step])
        return out


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
