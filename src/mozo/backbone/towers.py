"""Uniform, layer-by-layer access to the two towers of a transformers `CLIPModel`.

mozo runs the towers itself instead of calling `CLIPModel.forward`, for three reasons:
- PEFT units that sit beside the MLP (MoE adapters, bottleneck adapters) read the block input `x`
  and add to `x + mlp(ln_2(x))`; running the block here makes that explicit, with no module surgery;
- a perturbed zeroth-order forward can start from a cached hidden state at layer k (the prefix
  cache), which needs a forward that begins in the middle of the encoder;
- plans and units never special-case a model class: both towers look the same (`embed`, `layers`,
  `head`);
- the top layer can be computed for the pooled token (and the router's first token) only, since no
  other row of it is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mozo.backbone.activations import run_mlp

MODALITIES = ("vision", "language")
# The ZO direction stream of each tower (zo/estimator.py): equal-shaped units of the two towers never share z.
TOWER_STREAMS = {"vision": 1, "language": 2}

# A parallel unit maps the block input x (B, T, D) to a residual added after the MLP.
ParallelUnit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TowerInput:
    """What a tower needs besides its layers: the hidden state entering `layer`, the attention mask,
    and what pooling needs (token positions of EOS for text)."""

    hidden: torch.Tensor
    mask: Optional[torch.Tensor]
    pool_index: Optional[torch.Tensor]
    layer: int = 0  # 0-based index of the first layer still to run


def run_block(layer: nn.Module, h: torch.Tensor, mask: Optional[torch.Tensor], parallel: Optional[ParallelUnit],
              rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One CLIP residual block: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) [+ unit(x)].

    `rows` (B, K): compute only these token positions' outputs (every token still serves as a key and
    value), returning (B, K, D). The last block of a tower needs only what pooling and the MoE router
    read, so running it on those rows gives the same features for a fraction of the block's work.
    """
    if rows is None:
        h = h + layer.self_attn(hidden_states=layer.layer_norm1(h), attention_mask=mask)[0]
    else:
        h = _attend_from_rows(layer.self_attn, layer.layer_norm1, h, mask, rows)
    out = h + run_mlp(layer.mlp, layer.layer_norm2(h))
    if parallel is not None:
        out = out + parallel(h)
    return out


def _attend_from_rows(attn: nn.Module, norm: nn.Module, h: torch.Tensor, mask: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """h[rows] + attention(norm(h)) for the query positions `rows` only (transformers' CLIPAttention maths:
    scaled dot product over heads, its q/k/v/out projections, so LoRA-wrapped projections apply)."""
    x = norm(h)
    (batch, length, width), k_rows = h.shape, rows.shape[1]
    pick = rows[:, :, None].expand(-1, -1, width)
    heads = lambda t, n: t.view(batch, n, attn.num_heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    q = heads(attn.q_proj(x.gather(1, pick)), k_rows)
    k, v = heads(attn.k_proj(x), length), heads(attn.v_proj(x), length)
    if mask is not None:  # (B|1, 1, T, T) additive -> the kept query rows (B, 1, K, T)
        mask = mask.expand(batch, -1, -1, -1).gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, length))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    return h.gather(1, pick) + attn.out_proj(out.transpose(1, 2).reshape(batch, k_rows, width))


class Tower:
    """One modality of a CLIPModel: embedding, encoder layers, pooling and projection."""

    def __init__(self, clip: nn.Module, modality: str):
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        self.modality = modality
        self.clip = clip
        self.body = clip.vision_model if modality == "vision" else clip.text_model
        self.projection = clip.visual_projection if modality == "vision" else clip.text_projection

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.encoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def width(self) -> int:
        return self.body.config.hidden_size

    def embed(self, inputs: dict) -> TowerInput:
        if self.modality == "vision":
            h = self.body.pre_layrnorm(self.body.embeddings(inputs["pixel_values"]))
            return TowerInput(h, None, None)
        ids = inputs["input_ids"]
        h = self.body.embeddings(input_ids=ids)
        pad = inputs.get("attention_mask")
        mask = _causal_mask(ids.shape[1], pad, h.dtype, h.device)
        eos = self.body.config.eos_token_id
        if eos == 2:  # legacy configs: EOS is the highest id in each sequence (transformers does the same)
            pool = ids.to(torch.int).argmax(dim=-1)
        else:
            pool = (ids == eos).int().argmax(dim=-1)
        return TowerInput(h, mask, pool)

    def run(self, x: TowerInput, stop: int, parallel: dict[int, ParallelUnit]) -> TowerInput:
        """Run layers x.layer .. stop-1 (0-based), applying parallel units keyed by 0-based layer.

        Running to the top computes the last layer only at the rows `head` reads (and the first token,
        which the MoE router reads): the returned state then holds those rows only.
        """
        h, pool = x.hidden, x.pool_index
        for i in range(x.layer, stop):
            rows = None
            if i == self.num_layers - 1:
                rows, pool = self._pooled_rows(h, pool)
            h = run_block(self.layers[i], h, x.mask, parallel.get(i), rows)
        return TowerInput(h, x.mask, pool, stop)

    def _pooled_rows(self, h: torch.Tensor, pool: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Token rows the top layer must compute, and where the pooled token sits among them."""
        zeros = torch.zeros(h.shape[0], 1, dtype=torch.long, device=h.device)
        if pool is None:  # vision: the class token, which is also the router's first token
            return zeros, None
        return torch.cat([zeros, pool.long()[:, None]], dim=1), torch.ones_like(pool)  # text: first token and EOS

    def head(self, x: TowerInput) -> torch.Tensor:
        """Pool, project and L2-normalise: the features CLIP compares."""
        if self.modality == "vision":
            pooled = self.body.post_layernorm(x.hidden[:, 0, :])
        else:
            h = self.body.final_layer_norm(x.hidden)
            pooled = h[torch.arange(h.shape[0], device=h.device), x.pool_index]
        return F.normalize(self.projection(pooled), dim=-1)


def _causal_mask(length: int, pad: Optional[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (B|1, 1, T, T) mask: causal, plus padding keys masked when a padding mask is given."""
    neg = torch.finfo(dtype).min
    causal = torch.full((length, length), neg, dtype=dtype, device=device).triu(1)[None, None]
    if pad is None:
        return causal
    keys = (1.0 - pad[:, None, None, :].to(dtype)) * neg
    return (causal + keys).clamp(min=neg)
