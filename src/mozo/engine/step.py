"""The hybrid step: first-order units by backprop, zeroth-order units by forward passes only.

One call does, for a batch (docs/method.md, The hybrid step):
1. One forward of both towers at theta. A tower holding FO units runs with autograd (which records
   nothing below its lowest FO unit, since nothing there requires grad); a tower without FO units
   runs under `no_grad`, so it stores no activation at all. The forward also caches, per tower, the
   hidden state entering its lowest ZO unit (the prefix cache) and the detached features.
   Its loss is L(theta): backward gives the FO gradients and, one-sided, the ZO baseline.
2. For each of q directions: perturb the ZO units in place (direction regenerated from a seed),
   re-run only the towers that hold ZO units, starting from the prefix cache, reusing the other
   tower's cached features; restore. Noise (dropout, router) is re-seeded identically in every forward.
   With `zo.granularity=tower`, each ZO tower is perturbed and re-run alone (one loss difference per tower and
   direction): the same tower forwards, and no tower's coefficient carries the other tower's term.
   With `zo.granularity=unit`, each ZO unit alone, its tower re-run from the cached input of its own layer.
   With `zo.rank_directions` (data parallel) each rank draws its own q directions and the ranks' loss
   differences are all-gathered: every rank applies one update over the q x N directions.
   The loss of every evaluation is the continual-learning method's (`mozo.methods`), the same function
   in the FO forward and in each ZO forward. `train.accumulate=k` runs steps 1-2 on k micro-batches,
   summing FO gradients and loss differences (same directions).
3. Apply the ZO rule, then (`zo.steps_per_batch`) further forward-only ZO estimates and updates from
   where the previous ended, then the FO optimizer. FO parameters do not move before all ZO forwards are done,
   so every loss of one estimate is evaluated at the same FO parameters.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from mozo.backbone.towers import MODALITIES, TOWER_STREAMS
from mozo.methods import MethodConfig, Prepared
from mozo.methods.base import Method
from mozo.methods.baseline import Baseline
from mozo.peft.inject import MozoCLIP
from mozo.zo.config import ZOConfig, in_parts
from mozo.zo.directions import as_law
from mozo.seeds import mix_seed
from mozo.zo.estimator import Estimator, Group
from mozo.zo.plan import Plan
from mozo.zo.rules import UpdateContext, ZORecord, get_rule

class NonFiniteLossError(FloatingPointError):
    """The loss is NaN or infinite; parameters were left as they were before the step."""


@dataclass
class StepStats:
    loss: float
    forward_passes: int  # loss evaluations (each a forward of the towers that needed recomputing)
    backward_passes: int
    tower_forwards: dict = field(default_factory=dict)  # modality -> forwards of that tower
    layer_forwards: dict = field(default_factory=dict)  # modality -> encoder layers executed
    zo: Optional[ZORecord] = None
    zo_extra: list = field(default_factory=list)  # zo.steps_per_batch > 1: the records of the further ZO updates


def forwards_per_step(zo: ZOConfig, zo_towers: int, zo_units: int = 0) -> int:
    """Loss evaluations one step makes: the first forward, then per direction and ZO group one perturbed
    forward (two two-sided, the first of which is the first forward under zo.fo_at_perturbed), plus the two
    loss evaluations the rule's update makes (`Rule.extra_forwards`: two for conservative). Tested against
    `StepStats.forward_passes` of real steps."""
    if not zo_towers:
        return 1
    groups = {"joint": 1, "tower": zo_towers, "unit": zo_units}[zo.granularity]
    perturbed = zo.q * groups * (2 if zo.two_sided else 1)
    extra = get_rule(zo.rule).extra_forwards
    # zo.steps_per_batch: each further ZO update re-estimates at its new point (one-sided: L there first)
    further = (zo.steps_per_batch - 1) * (perturbed + (0 if zo.two_sided else 1) + extra)
    return 1 + perturbed - (1 if zo.fo_at_perturbed else 0) + extra + further


def check_accumulate(accumulate: int, zo: ZOConfig) -> None:
    """train.accumulate > 1 sums micro-batches' FO gradients and loss differences; what needs more than that (a
    forward at the perturbed point, re-evaluations, further or per-rank estimates) is refused, naming it."""
    if accumulate > 1:
        clash = [name for name, on in (("zo.fo_at_perturbed", zo.fo_at_perturbed), ("zo.steps_per_batch > 1", zo.steps_per_batch > 1),
                                       ("zo.rank_directions", zo.rank_directions), ("zo.guide_weight", zo.guide_weight > 0),
                                       (f"zo.rule={zo.rule} (it re-evaluates the loss)", get_rule(zo.rule).extra_forwards > 0)) if on]
        if clash:
            raise ValueError(f"train.accumulate={accumulate} is not implemented with {', '.join(clash)}; use train.accumulate=1")


class HybridStep:
    """A training step for one model and plan. Build once per task (the FO optimizer lives here)."""

    def __init__(self, model: MozoCLIP, plan: Plan | str, zo: ZOConfig | None = None, fo_lr: float = 1e-3,
                 fo_weight_decay: float = 0.0, seed: int = 0, method: Method | None = None,
                 precision: str = "fp32",
                 reduce_scalars: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reduce_grads: Callable[[list[torch.Tensor]], None] | None = None, noise_rank: int = 0,
                 gather_scalars: Callable[[torch.Tensor], torch.Tensor] | None = None, world_size: int = 1,
                 accumulate: int = 1):
        self.model = model
        self.plan = model.plan(plan) if isinstance(plan, str) else plan
        self.zo = zo or ZOConfig()
        self.accumulate = accumulate  # micro-batches per step (train.accumulate)
        check_accumulate(accumulate, self.zo)
        self.seed, self.precision = seed, precision
        self.method = method or Baseline(MethodConfig())  # its loss is the loss of every evaluation of the step
        self._prepared = Prepared()
        self.reduce_scalars = reduce_scalars or (lambda t: t)
        self.reduce_grads = reduce_grads
        self.step_index = 0  # the ZO seed counter: checkpoints store it
        self.noise_rank = noise_rank  # data-parallel rank: dropout/router noise differs per rank (rank 0 = one-process stream)
        # zo.rank_directions: rank `noise_rank` draws its own direction seeds, and `gather_scalars` (DistContext.gather:
        # (world_size, n), rank order) brings every rank's loss differences to every rank.
        self.gather_scalars = gather_scalars or (lambda t: t.unsqueeze(0))
        self.world_size = world_size
        if self.zo.rank_directions and world_size > 1 and gather_scalars is None:
            raise ValueError("zo.rank_directions with world_size > 1 needs gather_scalars (DistContext.gather)")
        self._saved: Optional[list[torch.Tensor]] = None  # zo.rank_directions, world_size > 1: ZO units before perturbing
        self._nonfinite: Optional[str] = None
        self.zo_lr = self.zo.learning_rate(fo_lr)

        units = {mode: [u for u in model.unit_list() if self.plan.mode(u.info.modality, u.info.layer) == mode] for mode in ("fo", "zo", "frozen")}
        for u in model.unit_list():
            u.requires_grad_(self.plan.mode(u.info.modality, u.info.layer) == "fo")
        self.fo_params = [p for u in units["fo"] for p in u.parameters()]
        # zo.parts: which parameters of a ZO unit the estimate perturbs and the rule updates (the rest stay put)
        self.zo_params = {m: [p for u in units["zo"] if u.info.modality == m for n, p in u.named_parameters()
                              if in_parts(n, self.zo.parts)] for m in MODALITIES}
        for m in {u.info.modality for u in units["zo"]}:
            if not self.zo_params[m]:
                names = sorted({n for u in units["zo"] for n, _ in u.named_parameters()})
                raise ValueError(f"zo.parts={self.zo.parts!r} matches no parameter of the {m} ZO units; their parameters "
                                 f"are named {', '.join(names)} (shell-style patterns, comma-separated)")
        self.zo_towers = [m for m in MODALITIES if self.zo_params[m]]
        self.fo_towers = [m for m in MODALITIES if self.plan.has("fo", m)]
        # 0-based index of the lowest ZO layer per tower: perturbed forwards start there. zo.granularity=unit: the input of
        # every ZO unit's layer is cached (one hidden state per ZO layer), each unit's forwards start at its own.
        zo_layers = {m: sorted({u.info.layer for u in units["zo"] if u.info.modality == m}) for m in self.zo_towers}
        self.capture_at = {m: ([layer - 1 for layer in zo_layers[m]] if self.zo.granularity == "unit" else zo_layers[m][0] - 1)
                           if m in self.zo_towers else None for m in MODALITIES}
        self.fo_optimizer = torch.optim.AdamW(self.fo_params, lr=fo_lr, weight_decay=fo_weight_decay) if self.fo_params else None
        # The estimator's parameter groups: one per ZO tower, or (zo.granularity=unit) one per ZO unit, "<tower>.<layer>".
        mine = {id(p) for ps in self.zo_params.values() for p in ps}
        if self.zo.granularity == "unit":
            self.group_at = {f"{u.info.modality}.{u.info.layer}": (u.info.modality, u.info.layer) for u in units["zo"]}
            group_params = {g: [p for p in self.model.unit(m, layer).parameters() if id(p) in mine] for g, (m, layer) in self.group_at.items()}
            group_params = {g: ps for g, ps in group_params.items() if ps}
            streams = {g: mix_seed(TOWER_STREAMS[m], layer) for g, (m, layer) in self.group_at.items()}
        else:
            self.group_at = {m: (m, None) for m in self.zo_towers}
            group_params, streams = {m: self.zo_params[m] for m in self.zo_towers}, TOWER_STREAMS
        self.estimator = Estimator({g: Group(ps, self.zo.eps(self.group_at[g][0]), streams[g]) for g, ps in group_params.items()},
                                   self.zo.distribution, self.zo.two_sided, "joint" if self.zo.granularity == "joint" else "group")
        # (a plan without ZO units, such as a frozen control, has nothing to guide)
        self.guide_sources = self._guide_sources(units, mine) if self.zo.guide_weight and units["zo"] else {}
        self.rule = get_rule(self.zo.rule)(group_params, lr=self.zo_lr, weight_decay=self.zo.weight_decay)
        # A language tower with no trainable unit and no noise (no units, or frozen units without dropout or
        # router noise) maps the same prompts to the same features at every step: they are computed once and
        # reused while the prompts stay the same (docs/benchmarks.md, optimisation 2).
        lang_units = [u for u in model.unit_list() if u.info.modality == "language"]
        self.static_text = ("language" not in self.fo_towers and "language" not in self.zo_towers
                            and not any(u.has_noise() for u in lang_units))
        self._text_params = [p for u in lang_units for p in u.parameters()]
        self._text_cache: Optional[tuple[dict, tuple, torch.Tensor]] = None  # (prompt tensors, unit versions, features)

    def _guide_sources(self, units: dict, mine: set[int]) -> dict[int, list[torch.Tensor]]:
        """zo.guide_weight: for each ZO parameter (`mine`: the ids zo.parts selected), the same-named, same-shaped
        parameters of the FO units one layer below and above in its tower (their gradients are its direction's
        surrogate). Refused if none has any."""
        fo_at = {(u.info.modality, u.info.layer): u for u in units["fo"]}
        sources = {}
        for u in units["zo"]:
            m, layer = u.info.modality, u.info.layer
            neighbours = [fo_at[(m, k)] for k in (layer - 1, layer + 1) if (m, k) in fo_at]
            for name, p in u.named_parameters():
                found = [q for n in neighbours for qn, q in n.named_parameters() if qn == name and q.shape == p.shape]
                if id(p) in mine and found:
                    sources[id(p)] = found
        if not sources:
            raise ValueError("zo.guide_weight takes each ZO unit's direction from the FO units of the neighbouring layers, "
                             f"but plan {self.plan.text!r} has no FO unit next to a ZO unit in the same tower; use a layer-wise "
                             "plan (e.g. vision:hop-even) or zo.guide_weight=0")
        return sources

    def _guided(self, law):
        """The step's law with this batch's surrogate gradients (the neighbouring FO units' mean gradient)."""
        guide = {}
        for pid, sources in self.guide_sources.items():
            grads = [q.grad for q in sources if q.grad is not None]
            if grads:
                guide[pid] = torch.stack(grads).mean(0)
        return replace(as_law(law), guide_weight=self.zo.guide_weight, guide=guide)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint needs to continue this step bitwise: the ZO seed counter and the optimizer states."""
        return {"step_index": self.step_index, "fo_optimizer": self.fo_optimizer.state_dict() if self.fo_optimizer else None,
                "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_index = int(state["step_index"])
        if state.get("fo_optimizer") is not None and self.fo_optimizer is not None:
            self.fo_optimizer.load_state_dict(state["fo_optimizer"])
        self.rule.load_state_dict(state.get("rule") or {})

    def set_lr(self, fo: float, zo: float) -> None:
        """Learning rates of this step (schedules call it before every step)."""
        if self.fo_optimizer is not None:
            for group in self.fo_optimizer.param_groups:
                group["lr"] = fo
        self.zo_lr = zo

    def skip(self) -> None:
        """Advance the seed counter without a step (a skipped non-finite batch): later steps keep their seeds."""
        self.step_index += 1

    # -- helpers ---------------------------------------------------------------------------------
    def _autocast(self):
        device = next(self.model.clip.parameters()).device
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _loss(self, feats: dict, labels: torch.Tensor) -> torch.Tensor:
        return self.method.loss(self.model.logits(feats["vision"], feats["language"]).float(), labels, self._prepared)

    def _zo_loss(self, cache: dict, feats: dict, labels: torch.Tensor, counts: Counter, groups) -> torch.Tensor:
        """Loss with the towers of `groups` (tower names, or zo.granularity=unit's unit groups) recomputed from their prefix
        cache (a unit group's from its own layer), other towers' features reused."""
        f = dict(feats)
        with torch.no_grad(), self._autocast():
            for g in groups:
                m, layer = self.group_at.get(g, (g, None))
                # zo.granularity=unit caches one hidden state per ZO layer: a unit starts at its own, a whole tower at the lowest
                start = cache[m] if not isinstance(cache[m], dict) else cache[m][layer - 1 if layer else min(cache[m])]
                f[m], _ = self.model.encode(m, start=start)
                counts[f"tower:{m}"] += 1
                counts[f"layers:{m}"] += self.model.num_layers(m) - start.layer
            loss = self._loss(f, labels)
        counts["forward"] += 1
        return loss

    def _text_cache_hit(self, text_inputs: dict) -> bool:
        if self._text_cache is None:
            return False
        cached, versions, _ = self._text_cache
        return versions == tuple(p._version for p in self._text_params) and cached.keys() == text_inputs.keys() and all(
            cached[key].shape == v.shape and cached[key].device == v.device and torch.equal(cached[key], v)
            for key, v in text_inputs.items())

    def noise_seed(self, k: int) -> int:
        """The seed of the dropout and router noise of step k (every forward of the step uses it)."""
        # Rank 0 keeps the one-process stream; other ranks draw independent masks for their shard.
        return mix_seed(self.seed, k, 0) if self.noise_rank == 0 else mix_seed(self.seed, k, 0, self.noise_rank)

    def direction_seeds(self, k: int, rank: int | None = None) -> list[int]:
        """The q direction seeds of step k: the same on every rank, or (zo.rank_directions) those of `rank` (default:
        this rank), a function of (seed, step, direction, rank) where rank 0 keeps the one-process seeds."""
        r = (self.noise_rank if rank is None else rank) if self.zo.rank_directions else 0
        return [mix_seed(self.seed, k, d + 1) if r == 0 else mix_seed(self.seed, k, d + 1, r) for d in range(self.zo.q)]

    def law(self, k: int):
        """The directions' law of step k: dense, or (zo.subspace_rank) the subspace of k's window of
        zo.subspace_every steps, the same on every rank."""
        return self.zo.law(mix_seed(self.seed, "subspace", k // self.zo.subspace_every))

    def _restore_saved(self) -> None:
        """zo.rank_directions on N > 1 ranks: put the ZO units back to the bits saved before this rank's perturbations.
        Each rank perturbs along its own z, and theta + eps z - eps z rounds differently for different z: undone by
        subtraction, replicas would drift apart by an ulp here and there."""
        if self._saved is not None:
            with torch.no_grad():
                for p, saved in zip((p for m in self.zo_towers for p in self.zo_params[m]), self._saved):
                    p.copy_(saved)
            self._saved = None

    def _check(self, loss: torch.Tensor, where: str) -> None:
        # Recorded, raised after the step's scalar all-reduce: in a data-parallel run a rank raising alone
        # would leave the other ranks waiting in a collective forever.
        if self._nonfinite is None and not torch.isfinite(loss).all():
            self._nonfinite = f"non-finite loss ({loss.item()}) at {where}"

    def _micro_batches(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
        """(images, labels, weight) per micro-batch: the whole batch with weight 1, or train.accumulate chunks."""
        if self.accumulate == 1:
            return [(pixel_values, labels, 1.0)]
        n = len(labels)
        return [(px, lb, len(lb) / n) for px, lb in zip(torch.tensor_split(pixel_values, self.accumulate),
                                                         torch.tensor_split(labels, self.accumulate)) if len(lb)]

    def _forward_and_differences(self, pixel_values, labels, text_inputs, seeds, weight: float, counts: Counter):
        """One (micro-)batch: the method's constants, the forward at theta (FO backward of weight * loss), and
        the ZO loss differences along `seeds`. Returns (L(theta), Differences or None, prefix cache, features)."""
        model, cfg = self.model, self.zo
        with torch.no_grad():  # the method's per-batch constants (a teacher's logits), counted as forwards
            self._prepared = self.method.prepare(model, pixel_values, labels, text_inputs)
        for m, n in self._prepared.tower_forwards.items():
            counts[f"tower:{m}"] += n
            counts[f"layers:{m}"] += n * model.num_layers(m)
        if cfg.fo_at_perturbed and self.zo_towers:  # the FO forward runs at theta + eps z(seeds[0])
            self.estimator.perturb(seeds[0], +1.0, self.zo_towers)
        inputs = {"vision": {"pixel_values": pixel_values}, "language": text_inputs}
        feats, cache = {}, {}
        with self._autocast():
            # Towers without FO units first: their no-grad transients never sit on top of the
            # activations an FO tower saves for backward (docs/benchmarks.md, optimisation 1).
            for m in sorted(MODALITIES, key=lambda m: m in self.fo_towers):
                if m == "language" and self.static_text and self._text_cache_hit(text_inputs):
                    feats[m], cache[m] = self._text_cache[2], None
                    continue
                with contextlib.nullcontext() if m in self.fo_towers else torch.no_grad():
                    feats[m], cache[m] = model.encode(m, inputs[m], capture_at=self.capture_at[m])
                if m == "language" and self.static_text:
                    self._text_cache = ({key: v.detach().clone() for key, v in text_inputs.items()},
                                        tuple(p._version for p in self._text_params), feats[m].detach())
                counts[f"tower:{m}"] += 1
                counts[f"layers:{m}"] += model.num_layers(m)
        loss0 = self._loss(feats, labels)
        counts["forward"] += 1
        self._check(loss0, "the first forward")
        if self.fo_params:
            (loss0 if weight == 1.0 else loss0 * weight).backward()
            counts["backward"] += 1
        feats = {m: f.detach() for m, f in feats.items()}
        loss0 = loss0.detach()
        if self.guide_sources:  # zo.guide_weight: directions lean towards the neighbouring FO units' gradients
            if self.reduce_grads is not None:  # data parallel: the global batch's gradients, the same guide on every rank
                self.reduce_grads([p.grad for p in self.fo_params if p.grad is not None])  # (accumulate is 1: once a step)
            self.estimator.law = self._guided(self.estimator.law)
        # One loss difference per direction for all ZO towers together, or (zo.granularity=tower) one per direction
        # and tower, each tower perturbed alone: the same tower forwards, without the other tower's term.
        diffs = None
        if self.zo_towers:
            diffs = self.estimator.differences(seeds, lambda names: self._zo_loss(cache, feats, labels, counts, names),
                                               loss0, self._check)
            if cfg.fo_at_perturbed:
                loss0 = (diffs.plus[0] + diffs.minus[0]) / 2  # the loss at theta, to first order
            self._restore_saved()  # zo.rank_directions: theta exactly, the same bits on every rank
        return loss0, diffs, cache, feats

    # -- the step --------------------------------------------------------------------------------
    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor, text_inputs: dict) -> StepStats:
        model, cfg = self.model, self.zo
        model.train()
        k = self.step_index
        noise_seed = self.noise_seed(k)
        self._nonfinite = None
        seeds = self.direction_seeds(k)
        self.estimator.law = self.law(k)
        counts: Counter = Counter()
        try:
            model.noise.seed = noise_seed
            if cfg.rank_directions and self.world_size > 1 and self.zo_towers:  # memory: one copy of the ZO units
                self._saved = [p.detach().clone() for m in self.zo_towers for p in self.zo_params[m]]
            # train.accumulate: the batch in micro-batches, each weighted by its share of the images; FO gradients
            # and ZO loss differences (the same directions) summed over them, then one update of each.
            loss0, diffs = None, None
            for px, lb, weight in self._micro_batches(pixel_values, labels):
                loss_c, diffs_c, cache, feats = self._forward_and_differences(px, lb, text_inputs, seeds, weight, counts)
                loss0 = loss_c if weight == 1.0 else (loss_c * weight if loss0 is None else loss0 + loss_c * weight)
                if diffs_c is not None and weight != 1.0:
                    scaled = [d * weight for d in diffs_c.diffs]
                    diffs_c.diffs = scaled if diffs is None else [x + y for x, y in zip(diffs.diffs, scaled)]
                diffs = diffs_c
            record, extra_records = None, []
            # One all-reduce for every scalar of the step: the loss differences and the loss. A non-finite
            # value on any rank is non-finite on all of them after it, so all ranks raise here together, before
            # any update. (A rank whose L(theta) failed still ran the perturbed forwards: every rank must
            # perturb and restore alike, or the rounding of theta + eps z - eps z would set replicas apart.)
            # zo.rank_directions: an all-gather instead, every rank's (differences, loss) to every rank; the same rule.
            local = torch.cat([d.reshape(-1) for d in (diffs.diffs if diffs else [])] + [loss0.reshape(-1)]).float()
            if cfg.rank_directions:
                gathered = self.gather_scalars(local)  # (N, n): row r holds rank r's differences and loss
                if gathered.shape[0] != self.world_size:
                    raise ValueError(f"gather_scalars returned {gathered.shape[0]} ranks, but world_size is {self.world_size}")
                scalars = torch.cat([gathered[:, :-1].reshape(-1), gathered[:, -1].mean().reshape(1)])
            else:
                scalars = self.reduce_scalars(local)
            if self._nonfinite is not None or not torch.isfinite(scalars).all():
                raise NonFiniteLossError(f"{self._nonfinite or 'non-finite loss on another rank'}; lower the learning rate "
                                         "or epsilon, or enable train.skip_nonfinite")
            loss_mean = float(scalars[-1])
            if self.zo_towers:
                if cfg.rank_directions:  # all ranks' directions, in rank order (rank 0's are the one-process seeds)
                    seeds = [s for r in range(self.world_size) for s in self.direction_seeds(k, r)]
                coefs = self.estimator.coefficients(scalars[:-1], diffs.blocks * (self.world_size if cfg.rank_directions else 1))
                record = ZORecord(k, seeds, coefs, self.zo_lr, cfg.update, self.estimator.law)
                self._zo_update(record, cache, feats, labels, loss0, counts)
                extra_records = self._further_zo_steps(k, cache, feats, labels, counts)

            if self.fo_optimizer is not None:
                if self.reduce_grads is not None and not self.guide_sources:  # (a guided step reduced them before its ZO forwards)
                    self.reduce_grads([p.grad for p in self.fo_params if p.grad is not None])
                self.fo_optimizer.step()
                self.fo_optimizer.zero_grad(set_to_none=True)
        except BaseException:
            self.estimator.undo()
            self._restore_saved()
            if self.fo_optimizer is not None:
                self.fo_optimizer.zero_grad(set_to_none=True)
            raise
        finally:
            model.noise.seed = None
        self.step_index += 1
        return StepStats(loss_mean, counts["forward"], counts["backward"],
                         {m: counts[f"tower:{m}"] for m in MODALITIES}, {m: counts[f"layers:{m}"] for m in MODALITIES}, record,
                         extra_records)

    @torch.no_grad()
    def _further_zo_steps(self, k: int, cache: dict, feats: dict, labels: torch.Tensor, counts: Counter) -> list[ZORecord]:
        """zo.steps_per_batch - 1 more ZO updates on the same batch, forward-only: each a fresh estimate at the
        point the previous update reached (new direction seeds), from the same prefix cache and the other
        tower's cached features, with the step's noise seed. A non-finite loss (on any rank) ends them there,
        keeping the updates already applied; FO parameters move only after all of them."""
        records = []
        evaluate = lambda names: self._zo_loss(cache, feats, labels, counts, names)  # noqa: E731
        for j in range(1, self.zo.steps_per_batch):
            seeds = [mix_seed(self.seed, k, "further", j, d + 1) for d in range(self.zo.q)]
            self._nonfinite = None
            loss_j = None if self.zo.two_sided else evaluate(self.zo_towers)
            diffs = self.estimator.differences(seeds, evaluate, loss_j, self._check)
            scalars = self.reduce_scalars(torch.stack([d.reshape(()) for d in diffs.diffs]).float())
            if self._nonfinite is not None or not torch.isfinite(scalars).all():
                break
            record = ZORecord(k, seeds, self.estimator.coefficients(scalars, diffs.blocks), self.zo_lr, self.zo.update, self.estimator.law)
            at_theta = loss_j if loss_j is not None else (diffs.plus[0] + diffs.minus[0]) / 2  # two-sided: L(theta) to first order
            self._zo_update(record, cache, feats, labels, at_theta, counts)
            records.append(record)
        self._nonfinite = None
        return records

    @torch.no_grad()
    def _zo_update(self, record: ZORecord, cache: dict, feats: dict, labels: torch.Tensor, loss0: torch.Tensor, counts: Counter) -> None:
        """The rule object applies the estimate; it may evaluate the loss at the groups' current values."""
        def evaluate() -> torch.Tensor:
            self.model.noise.seed = self.noise_seed(record.step)
            return self._zo_loss(cache, feats, labels, counts, self.zo_towers)

        record.extra.update(self.rule.apply(self.estimator.seeds_of(record.seeds), record.coefs, self.zo_lr, record.distribution,
                                            UpdateContext(evaluate=evaluate, loss0=loss0, reduce=self.reduce_scalars)))
