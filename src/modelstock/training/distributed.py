"""Model Stock during training across processes: one model per replica, merged by all-reduce.

Each replica (one rank, or a data-parallel group of ``ranks_per_replica`` consecutive ranks with
DDP inside) trains one model. A merge is the post-hoc merge's rules with an all-reduce between
their statistics and their coefficients, and no rank ever holds another replica's weights. Each
replica knows its own task vector ``d_i`` and its norm, so with ``u_i = d_i / |d_i|`` (0 for a
zero vector)

    sum_{i<j} cos_ij = (|sum_i u_i|^2 - #nonzero) / 2

and the paper's mean of pairwise cosines costs one all-reduce of ``sum_i u_i`` beside the one of
``sum_i d_i`` that the output needs (plus the ``|d_i|^2``, one number per tensor or row).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import _blocks, stock
from ..checkpoint import StateDictReader
from ..errors import ModelStockError
from ..plan import LayerPlan, plan_merge
from ..recipe import Recipe
from ..report import LayerReport, MergeReport, layer_report
from ..rules import Copy, Follow, Mean, ModelStock
from .periodic import (
    Anchor,
    Periodic,
    anchor_reader,
    live_tensors,
    prepare_anchor,
    rounding_shares,
    warn_rounding,
)

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_BUCKET_NUMEL = 1 << 24  # 64 MiB of float32 in flight per all-reduce


def replica_group(ranks_per_replica: int) -> dist.ProcessGroup:
    """The process group of this rank's replica (consecutive blocks of ``ranks_per_replica``
    ranks), to pass to ``DistributedDataParallel(process_group=...)``. Call on every rank."""
    group, _ = dist.new_subgroups(group_size=ranks_per_replica)
    return group


# What torchrun exports; trainers (the Hugging Face Trainer through accelerate, Lightning's
# TorchElasticEnvironment) read these to make one distributed run of all processes.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "NODE_RANK",
                      "TORCHELASTIC_RUN_ID")


def join_replica_group(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """Join torchrun's process group (for the merges), then hide torchrun's variables, so that
    a trainer in this process trains its own model (a replica) instead of joining all processes
    into one data-parallel model. On GPU, the process's local GPU becomes its only visible
    device (call this before anything touches CUDA). Returns this process's replica index."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ModelStockError("RANK/WORLD_SIZE are not set: launch with torchrun "
                              "--nproc-per-node N (one process per replica)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        if torch.cuda.is_initialized():
            raise ModelStockError("init_replica_process_group must run before CUDA is used")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in
                                                      range(torch.cuda.device_count())]
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[local % len(devices)]
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    return rank


def merge_statistics(report: MergeReport) -> dict[str, float]:
    """What the training callbacks log about a merge: the mean ``t`` and mean angle over the
    tensors whose ratio came from an angle (not copies, averages or running statistics);
    empty when there are none."""
    merged = [x for x in report.layers if x.t is not None and x.angle_deg is not None]
    if not merged:
        return {}
    return {"modelstock_mean_t": sum(x.t for x in merged) / len(merged),
            "modelstock_mean_angle": sum(x.angle_deg for x in merged) / len(merged)}


def _seconds(timeout: float | timedelta) -> float:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


class DistributedModelStock(Periodic):
    """Model Stock during training across replicas (torch.distributed: gloo on CPU, NCCL on GPU).

    Create it on every rank after ``torch.distributed.init_process_group`` (e.g. under
    ``torchrun``), with this rank's ``model`` (DDP-wrapped or not) and the pretrained ``anchor``.
    Ranks ``[r*G, (r+1)*G)`` of ``group`` (default: all) form replica ``r``, with
    ``G = ranks_per_replica``; N = world size / G replicas are merged. `step` and `merge` are
    collective: every rank must call them in the same order. Every ``period`` steps each replica's
    weights are replaced by the Model Stock merge of all N replicas' weights (see the module
    docstring for the rule when N > 2). ``optimizer_state`` is as in `PeriodicModelStock`.

    Collectives run in a process group of their own, created with ``timeout`` (seconds): a
    replica that dies or never reaches the merge makes the others raise `ModelStockError` instead
    of hanging (with NCCL, also set ``TORCH_NCCL_BLOCKING_WAIT=1`` for a Python exception rather
    than the watchdog's abort). Memory per rank: the anchor (on ``anchor_device``) plus one bucket
    of ``bucket_numel`` task-vector elements (or the largest tensor, if larger).
    """

    def __init__(self, model: torch.nn.Module, anchor: Anchor, period: int = 1,
                 unit: str = "step", optimizers: Sequence[torch.optim.Optimizer] | None = None,
                 optimizer_state: str = "keep", granularity: str = "tensor", clamp: bool = True,
                 anchor_device: str | torch.device | None = "cpu",
                 anchor_dtype: torch.dtype | None = None, ranks_per_replica: int = 1,
                 group: dist.ProcessGroup | None = None,
                 timeout: float | timedelta = DEFAULT_TIMEOUT_S,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, buffers: str = "follow") -> None:
        super().__init__(period, unit, optimizers, optimizer_state)
        if not (dist.is_available() and dist.is_initialized()):
            raise ModelStockError("torch.distributed is not initialized: call torch.distributed."
                                  "init_process_group first (e.g. under torchrun)")
        if granularity == "model":
            raise ModelStockError("granularity 'model' is not supported in distributed merges "
                                  "(it needs every layer's sums before writing any); use 'tensor' "
                                  "or 'row'")
        self.recipe = Recipe(granularity=granularity, clamp=clamp, buffers=buffers)
        self.timeout = _seconds(timeout)
        self.group = group if group is not None else dist.new_group(
            timeout=timedelta(seconds=self.timeout))
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if ranks_per_replica < 1 or world % ranks_per_replica:
            raise ModelStockError(f"ranks_per_replica={ranks_per_replica} does not divide the "
                                  f"{world} ranks of the group")
        self.n = world // ranks_per_replica
        if self.n < self.recipe.min_models:
            raise ModelStockError(f"Model Stock needs at least 2 replicas, got {self.n} "
                                  f"({world} rank(s), {ranks_per_replica} per replica)")
        self.replica = rank // ranks_per_replica
        self.leader = rank % ranks_per_replica == 0  # contributes the replica's weights
        self.src = dist.get_global_rank(self.group, 0)
        self.model = model
        self._written = False  # whether the merge in progress has changed any weight yet
        self.bucket_numel = bucket_numel
        live = live_tensors(model)
        self.device = next(iter(live.values())).device
        self.anchor, self.rounding = prepare_anchor(anchor, model, anchor_device, anchor_dtype)
        local = StateDictReader(live, f"replica {self.replica}")
        # The engine's planner decides each tensor's rule; two copies of the local model stand
        # in for the N replicas (the rules depend only on names, shapes and dtypes).
        plan = plan_merge(anchor_reader(self.anchor, live), [local, local], self.recipe)
        self.plan, self.layers, self.warnings = plan, plan.layers, list(plan.warnings)
        unsupported = [p for p in self.layers if not isinstance(p.rule, ModelStock | Mean | Follow
                                                                   | Copy)]
        if unsupported:  # the rules _merge knows how to reduce across replicas
            raise ModelStockError(f"rule {unsupported[0].rule.name} cannot run in a distributed "
                                  "merge", tensor=unsupported[0].name)
        self._check_replicas_agree()

    # -- collectives -------------------------------------------------------------------------
    def _collective(self, what: str, issue) -> None:
        """Run ``issue()`` (which starts async collectives and returns their works) and wait."""
        try:
            for work in issue():
                work.wait()
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses on timeout or loss
            raise ModelStockError(
                f"Model Stock merge #{self.merges + 1}: {what} across {self.n} replicas failed "
                f"(a replica died, hung, or is not merging; timeout {self.timeout:g} s); "
                f"{'this replica is partly merged' if self._written else 'no weight was changed'}"
                f": {_first_line(e)}") from None

    def _all_reduce(self, tensors: list[torch.Tensor], what: str,
                    op=dist.ReduceOp.SUM) -> None:
        self._collective(what, lambda: [dist.all_reduce(t, op=op, group=self.group,
                                                        async_op=True) for t in tensors])

    def _check_replicas_agree(self) -> None:
        """Same tensors, shapes, dtypes and rules on every rank, and the same anchor values."""
        sig = "|".join(f"{p.name}:{p.shape}:{p.out_dtype}:{p.rule}" for p in self.layers)
        fp = torch.tensor([zlib.crc32(sig.encode()), len(self.layers)], dtype=torch.float64)
        both = torch.cat([fp, -fp]).to(self.device)
        self._all_reduce([both], "checking the model structure", dist.ReduceOp.MAX)
        if not torch.equal(both[:2], -both[2:]):
            raise ModelStockError("the replicas' models differ in their tensors (names, shapes "
                                  "or dtypes): every replica must train the same architecture")
        sums = torch.stack([self.anchor[p.name].double().sum() if p.name in self.anchor
                            else torch.zeros((), dtype=torch.float64) for p in self.layers])
        both = torch.cat([sums, -sums]).to(self.device)
        self._all_reduce([both], "checking the anchor", dist.ReduceOp.MAX)
        k = len(self.layers)
        differ = [p.name for p, hi, lo in zip(self.layers, both[:k], both[k:], strict=True)
                  if not (hi == -lo or (math.isnan(hi) and math.isnan(lo)))]
        if differ:
            raise ModelStockError("the anchor differs across replicas (every replica must "
                                  "start from the same pretrained weights)", tensor=differ[0])

    # -- the merge ---------------------------------------------------------------------------
    def _merge(self) -> MergeReport:
        self._written = False
        live = live_tensors(self.model)
        missing = [p.name for p in self.layers if p.name not in live]
        if missing:
            raise ModelStockError("the model no longer has this tensor", tensor=missing[0])
        count = torch.tensor([self.merges, -self.merges], dtype=torch.float64, device=self.device)
        self._all_reduce([count], "starting the merge", dist.ReduceOp.MAX)
        if count[0] != -count[1]:
            raise ModelStockError(f"replicas are at different merges ({int(-count[1]) + 1} to "
                                  f"{int(count[0]) + 1}): call step()/merge() in lockstep")
        shares = self._rounding_shares(live)
        reports: dict[str, LayerReport] = {}
        self._t: dict[str, torch.Tensor] = {}
        # Statistics first, so that a follower finds its owner's ratio.
        for kind in (ModelStock, Mean, Follow):
            for bucket in self._buckets(kind):
                self._merge_bucket(bucket, live, reports)
        self._copy_layers(live, reports)
        for p in self.layers:
            if isinstance(p.rule, Copy) and p.rule.source == "anchor":
                live[p.name].copy_(self.anchor[p.name])
                reports[p.name] = layer_report(p.name, p.shape, p.rule.name, p.out_dtype,
                                               note=p.note)
        report = MergeReport(method="model-stock", n_models=self.n,
                             granularity=self.recipe.granularity, clamp=self.recipe.clamp,
                             layers=[reports[p.name] for p in self.layers], anchor="anchor",
                             models=[f"replica {i}" for i in range(self.n)],
                             warnings=list(self.warnings), buffers=self.recipe.buffers)
        warn_rounding(report, shares)
        return report

    def _rounding_shares(self, live: dict[str, torch.Tensor]) -> dict[str, float]:
        """`rounding_shares` over every replica (each measures its own, the largest wins)."""
        if not self.rounding:
            return {}
        mine = rounding_shares(self.anchor, [live], self.rounding,
                               self.recipe.granularity == "row")
        names = sorted(mine)
        worst = torch.tensor([mine[k] for k in names], dtype=torch.float64, device=self.device)
        self._all_reduce([worst], "comparing the anchor's rounding", dist.ReduceOp.MAX)
        return dict(zip(names, worst.tolist(), strict=True))

    def _compute_dtype(self, p: LayerPlan) -> torch.dtype:
        if not p.out_dtype.is_floating_point:
            return torch.float64  # an integer follower: interpolated, then rounded
        return stock.compute_dtype_for(p.out_dtype, self.anchor[p.name].dtype
                                       if p.name in self.anchor else None)

    def _buckets(self, kind: type) -> list[list[LayerPlan]]:
        """The tensors of one rule kind in groups of about ``bucket_numel`` elements with one
        compute dtype each (one all-reduce per group)."""
        buckets: list[list[LayerPlan]] = []
        size, dtype = 0, None
        for p in self.layers:
            if not isinstance(p.rule, kind):
                continue
            dt = self._compute_dtype(p)
            if not buckets or dt != dtype or size + p.numel > self.bucket_numel:
                buckets.append([])
                size, dtype = 0, dt
            buckets[-1].append(p)
            size += p.numel
        return buckets

    def _segments(self, p: LayerPlan) -> int:
        """How many ratios the tensor gets: one per row, or one."""
        return p.shape[0] if p.row_numel(self.recipe) else 1

    def _merge_bucket(self, bucket: list[LayerPlan], live: dict[str, torch.Tensor],
                      reports: dict[str, LayerReport]) -> None:
        """All-reduce the bucket's sums (task vectors, or values for `Mean`), and for Model
        Stock the unit vectors and squared norms; then write each tensor."""
        dtype = self._compute_dtype(bucket[0])
        stats = isinstance(bucket[0].rule, ModelStock)
        numel = sum(p.numel for p in bucket)
        segs = [self._segments(p) for p in bucket]
        total = torch.zeros(numel, dtype=dtype, device=self.device)
        units = torch.zeros(numel if stats else 0, dtype=dtype, device=self.device)
        sq = torch.zeros((self.n, sum(segs) if stats else 0), dtype=torch.float64,
                         device=self.device)
        off = seg_off = 0
        for p, r in zip(bucket, segs, strict=True):
            if self.leader:  # the other ranks of a replica hold the same weights: count once
                w = live[p.name].reshape(-1)
                if isinstance(p.rule, Mean):
                    total[off : off + p.numel].copy_(w)
                else:
                    d = stock.task_vectors(self._w0(p.name), [w], dtype)
                    total[off : off + p.numel].copy_(d[0])
                    if stats:
                        self._units(p, d[0], units[off : off + p.numel],
                                    sq[self.replica, seg_off : seg_off + r])
            off, seg_off = off + p.numel, seg_off + r
        names = ", ".join(p.name for p in bucket[:3]) + (", ..." if len(bucket) > 3 else "")
        self._all_reduce([total, units, sq] if stats else [total], f"all-reduce of {names}")
        self._written = True
        off = seg_off = 0
        for p, r in zip(bucket, segs, strict=True):
            part = total[off : off + p.numel]
            if isinstance(p.rule, Mean):
                out = (part / self.n).to(p.out_dtype)
                reports[p.name] = layer_report(p.name, p.shape, p.rule.name, p.out_dtype,
                                               note=p.note)
            else:
                if stats:
                    t, rep = self._ratio(p, part, units[off : off + p.numel],
                                         sq[:, seg_off : seg_off + r])
                else:
                    t = self._t[p.rule.owner]
                    t = t.mean() if t.ndim else t
                    rep = layer_report(p.name, p.shape, p.rule.name, p.out_dtype, t=t,
                                       note=p.note)
                self._t[p.name] = t
                out = self._interpolate(p, part, t)
                reports[p.name] = rep
            if not _blocks.all_finite(out):
                raise ModelStockError("merged values are not finite (has a replica "
                                      "diverged?)", tensor=p.name)
            live[p.name].copy_(out.view(p.shape))
            off, seg_off = off + p.numel, seg_off + r

    def _w0(self, name: str) -> torch.Tensor:
        return self.anchor[name].reshape(-1).to(device=self.device)

    def _units(self, p: LayerPlan, d: torch.Tensor, units: torch.Tensor,
               sq: torch.Tensor) -> None:
        """This replica's ``|d|^2`` per segment into ``sq`` and ``d / |d|`` into ``units``."""
        row = p.row_numel(self.recipe)
        sq.copy_(stock.gram(d.view(1, -1), row).reshape(-1))
        norms = sq.sqrt()
        inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0).to(d.dtype)
        if row:
            torch.mul(d.view(-1, row), inv.unsqueeze(1), out=units.view(-1, row))
        else:
            torch.mul(d, inv, out=units)

    def _ratio(self, p: LayerPlan, total: torch.Tensor, units: torch.Tensor, sq: torch.Tensor
               ) -> tuple[torch.Tensor, LayerReport]:
        """The rule's ratio from the reduced unit vectors, and the tensor's report entry (with
        one ratio per row, its cos is the whole tensor's for N = 2, else the mean over rows)."""
        row = p.row_numel(self.recipe)
        unit_sq = stock.gram(units.view(1, -1), row).reshape(-1)  # |sum_i u_i|^2 per segment
        if not (torch.isfinite(unit_sq).all() and torch.isfinite(sq).all()):
            raise ModelStockError("task vectors are not finite (has a replica diverged?)",
                                  tensor=p.name)
        cos = stock.mean_cos_from_units(unit_sq, (sq > 0).sum(0), self.n)
        t = p.rule.ratio(cos if row else cos[0], self.n)
        note = p.rule.note_for_cos(cos, self.n)
        norms = sq.sum(1).clamp_min(0).sqrt()
        tensor_cos = cos.mean()
        if row and self.n == 2 and bool((norms > 0).all()):  # the whole tensor's cosine, exact
            sum_sq = float(stock.gram(total.view(1, -1))[0, 0])
            tensor_cos = (sum_sq - float(sq.sum())) / 2 / float(norms.prod())
        rep = layer_report(p.name, p.shape, p.rule.name, p.out_dtype, norms=norms,
                           cos=min(1.0, max(-1.0, float(tensor_cos))), t=t, note=note,
                           who="replica")
        if self.n == 2:
            rep.pair_cos = [rep.cos]
        return t, rep

    def _interpolate(self, p: LayerPlan, total: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``w0 + t/N sum_i d_i`` in the output dtype (an integer tensor rounded)."""
        row = p.row_numel(self.recipe)
        if not p.out_dtype.is_floating_point:
            return (self._w0(p.name).double() + (t / self.n) * total).round().to(p.out_dtype)
        out = torch.empty(p.numel, dtype=p.out_dtype, device=self.device)
        return _blocks.combine(self._w0(p.name), total, t / self.n, out, row)

    def _copy_layers(self, live: dict[str, torch.Tensor], reports: dict[str, LayerReport]) -> None:
        """Integer/bool tensors: every replica takes replica 0's values (one broadcast of bytes);
        the report notes a tensor whose values differed on some replica."""
        copies = [p for p in self.layers if isinstance(p.rule, Copy) and p.rule.source == "first"]
        if not copies:
            return
        mine = [live[p.name].contiguous().view(-1).view(torch.uint8) for p in copies]
        received = torch.cat(mine).to(self.device)
        self._collective("broadcast of integer tensors", lambda: [
            dist.broadcast(received, src=self.src, group=self.group, async_op=True)])
        differs = torch.zeros(len(copies), dtype=torch.float64, device=self.device)
        off = 0
        for i, (p, m) in enumerate(zip(copies, mine, strict=True)):
            got = received[off : off + m.numel()]
            differs[i] = float(not torch.equal(got, m.to(self.device)))
            live[p.name].copy_(got.clone().view(live[p.name].dtype).view(p.shape))
            off += m.numel()
        self._all_reduce([differs], "comparing integer tensors", dist.ReduceOp.MAX)
        for p, d in zip(copies, differs, strict=True):
            note = p.note + ("; values differ across replicas, kept replica 0's" if d else "")
            reports[p.name] = layer_report(p.name, p.shape, p.rule.name, p.out_dtype, note=note)

