"""Import the adapter weights of the MoE-Adapters4CL reference code (Yu et al., CVPR 2024) as mozo MoE units.

The reference adds to each residual block of OpenAI's CLIP (``visual.transformer.resblocks.{i}`` and
``transformer.resblocks.{i}``):

- ``adaptmlp_list.{e}.down_proj`` / ``.up_proj``: expert e, an AdaptFormer bottleneck
  ``up(dropout(relu(down(x)))) * 0.1`` (``adapter_scalar=0.1`` is a constructor argument, not saved);
- ``router_list.{t}`` and ``w_noise_list.{t}``: (width, experts) gate and noise matrices, one pair per
  task router (one in the class-incremental code, ``Task_num`` in the MTIL code);
- ``mean`` / ``std``: constant buffers of its noisy-gating maths.

Its routing (noisy top-k over the block's first token after attention, whole samples mixed, output
added after the MLP) is what `mozo.peft.moe.MoEAdapter` computes, so the import is a renaming:
block i -> unit ``{vision|language}_{i+1}``, ``down_proj``/``up_proj`` -> ``experts.{e}.down``/``.up``,
``router_list.{task}`` -> ``w_gate``, ``w_noise_list.{task}`` -> ``w_noise``. Checkpoints saved by the
reference (``{"state_dict": model.state_dict()}``, possibly with ``module.`` prefixes) hold the whole
CLIP as well; only the adapter tensors are read here (the backbone loader ignores them in turn).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

_KEY = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(adaptmlp_list|router_list|w_noise_list)\.(.+)$")
_TOWER = {"visual.transformer": "vision", "transformer": "language"}
_EXPERT = {"down_proj": "down", "up_proj": "up"}
REFERENCE_SCALE = 0.1  # the reference's adapter_scalar; not stored in its checkpoints


def _state(source, name: str) -> dict[str, torch.Tensor]:
    """The flat state dict of a path or dict, unwrapped from {"state_dict": ...} and `module.` prefixes."""
    if isinstance(source, (str, Path)):
        name = str(source)
        try:
            source = torch.load(str(Path(source).expanduser()), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RuntimeError(f"cannot read MoE-Adapters checkpoint {name}: {type(exc).__name__}: {exc}") from exc
    if isinstance(source, dict) and isinstance(source.get("state_dict"), dict):
        source = source["state_dict"]
    if not isinstance(source, dict):
        raise ValueError(f"MoE-Adapters checkpoint {name} holds a {type(source).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in source.items()}


def moe_adapters_to_mozo(source, task: int = -1, name: str = "state dict") -> dict[str, torch.Tensor]:
    """The reference's adapter tensors renamed to `MozoCLIP.units` state-dict keys (float32).

    `task` picks the router pair of multi-router (MTIL) checkpoints: an index into ``router_list``,
    -1 = the last one (the only one in the class-incremental code).
    """
    out: dict[str, torch.Tensor] = {}
    routers: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}
    for key, value in _state(source, name).items():
        m = _KEY.match(key)
        if m is None:
            continue
        tower, block, kind, rest = m.groups()
        unit = f"{_TOWER[tower]}_{int(block) + 1}"
        if kind == "adaptmlp_list":
            expert, _, param = rest.partition(".")
            proj, _, part = param.partition(".")
            if proj not in _EXPERT or part not in ("weight", "bias"):
                raise ValueError(f"{name}: {key} is not a down_proj/up_proj weight or bias; adapters with a layer norm "
                                 "(adapter_layernorm_option='in'/'out') or a learnable scale have no mozo counterpart")
            out[f"{unit}.experts.{int(expert)}.{_EXPERT[proj]}.{part}"] = value.float()
        else:
            target = "w_gate" if kind == "router_list" else "w_noise"
            routers.setdefault(f"{unit}.{target}", {})[int(rest)] = (key, value)
    if not out:
        raise ValueError(f"{name} holds no MoE-Adapters tensors (keys like "
                         "'visual.transformer.resblocks.0.adaptmlp_list.0.down_proj.weight')")
    for target, by_task in routers.items():
        tasks = sorted(by_task)
        if not -len(tasks) <= task < len(tasks):
            raise ValueError(f"{name}: task {task} out of range, {target} has {len(tasks)} routers")
        out[target] = by_task[tasks[task]][1].float()
    return out


def load_moe_adapters(model, source, task: int = -1) -> dict[str, torch.Tensor]:
    """Load reference MoE-Adapters weights into the MoE units of a `MozoCLIP`; returns what was loaded.

    The model must have the same units (layers, experts, rank, width) as the checkpoint: every
    mismatch is reported, since a partial import would train or evaluate a different model.
    """
    name = str(source) if isinstance(source, (str, Path)) else "state dict"
    if model.peft.kind != "moe":
        raise ValueError(f"MoE-Adapters weights need a model with peft.kind='moe', not {model.peft.kind!r}")
    scales = {e.scale for u in model.unit_list() for e in u.experts}
    if scales != {REFERENCE_SCALE}:
        raise ValueError(f"the reference adapters scale by {REFERENCE_SCALE} (not saved in the checkpoint); "
                         f"this model uses peft.moe.scale={sorted(scales)}")
    state = moe_adapters_to_mozo(source, task, name)
    own = model.units.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state) if state[k].shape != own[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"{name} does not match this model's MoE units (check peft.layers, peft.moe.num_experts, peft.moe.rank):"
                         + (f" missing {missing[:6]}" if missing else "") + (f" not in the model {extra[:6]}" if extra else "")
                         + (f" shapes {shapes[:4]}" if shapes else ""))
    model.units.load_state_dict(state)
    return state
