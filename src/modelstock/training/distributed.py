"""Model Stock during training across processes: one model per replica, merged by all-reduce.

Each replica (one rank, or a data-parallel group of ``ranks_per_replica`` consecutive ranks with
DDP inside) trains one model. A merge needs, per layer, only the sum of the task vectors and a
few scalars, because

    sum_{i != j} <d_i, d_j> = |sum_i d_i|^2 - sum_i |d_i|^2

so it is one all-reduce of the task vectors (bucketed) plus one of the squared norms
``|d_i|^2``; no rank ever holds another replica's weights. From these the ratio uses the
*norm-weighted* mean cosine

    cos_w = sum_{i<j} <d_i, d_j> / sum_{i<j} |d_i| |d_j|

which for N = 2 is exactly the paper's cosine, and for N > 2 is the mean of the pairwise cosines
weighted by ``|d_i| |d_j|`` (equal to the plain mean when the norms agree, as the paper observes
they do; a pair with a zero task vector gets weight 0 rather than cosine 0).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import stock
from ..checkpoint import StateDictReader
from ..engine import LayerPlan, MergeOptions, plan_merge
from ..errors import ModelStockError
from ..report import LayerReport, MergeReport
from .periodic import Anchor, Periodic, anchor_reader, copy_anchor, live_tensors, unwrap

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_BUCKET_NUMEL = 1 << 24  # 64 MiB of float32 in flight per all-reduce


def norm_weighted_cos(sum_sq: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``sum_{i<j} <d_i,d_j> / sum_{i<j} |d_i||d_j|`` from ``|sum_i d_i|^2`` (shape ``[...]``)
    and the ``|d_i|^2`` (shape ``[N, ...]``); 0 where fewer than two task vectors are nonzero."""
    sq = sq_norms.to(torch.float64).clamp_min(0)
    norms = sq.sqrt().movedim(0, -1)
    pairs = stock.pair_values(norms.unsqueeze(-1) * norms.unsqueeze(-2)).sum(-1)
    dots = (sum_sq.to(torch.float64) - sq.sum(0)) / 2
    cos = torch.where(pairs > 0, dots / torch.where(pairs > 0, pairs, 1.0), 0.0)
    return cos.clamp(-1.0, 1.0)


def replica_group(ranks_per_replica: int) -> dist.ProcessGroup:
    """The process group of this rank's replica (consecutive blocks of ``ranks_per_replica``
    ranks), to pass to ``DistributedDataParallel(process_group=...)``. Call on every rank."""
    group, _ = dist.new_subgroups(group_size=ranks_per_replica)
    return group


def _seconds(timeout: float | timedelta) -> float:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _row_numel(p: LayerPlan, granularity: str) -> int | None:
    """Elements per row for ``granularity="row"`` (as the engine does: tensors of 2+ dims)."""
    if granularity != "row" or len(p.shape) < 2 or p.numel == 0:
        return None
    return p.numel // p.shape[0]


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
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
        super().__init__(period, unit, optimizers, optimizer_state)
        if not (dist.is_available() and dist.is_initialized()):
            raise ModelStockError("torch.distributed is not initialized: call torch.distributed."
                                  "init_process_group first (e.g. under torchrun)")
        if granularity == "model":
            raise ModelStockError("granularity 'model' is not supported in distributed merges "
                                  "(it needs every layer's sums before writing any); use 'tensor' "
                                  "or 'row'")
        self.options = MergeOptions(granularity=granularity, clamp=clamp)
        self.timeout = _seconds(timeout)
        self.group = group if group is not None else dist.new_group(
            timeout=timedelta(seconds=self.timeout))
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if ranks_per_replica < 1 or world % ranks_per_replica:
            raise ModelStockError(f"ranks_per_replica={ranks_per_replica} does not divide the "
                                  f"{world} ranks of the group")
        self.n = world // ranks_per_replica
        if self.n < 2:
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
        names = unwrap(model).state_dict()
        full = unwrap(anchor).state_dict() if isinstance(anchor, torch.nn.Module) else anchor
        extra = [k for k, v in full.items() if isinstance(v, torch.Tensor) and k not in names]
        if extra:
            raise ModelStockError(f"the anchor has {len(extra)} tensor(s) that the model lacks "
                                  f"(is it the right model?): {', '.join(extra[:5])}")
        self.anchor = copy_anchor(full, live, anchor_device, anchor_dtype)
        local = StateDictReader(live, f"replica {self.replica}")
        # The engine's planner decides each tensor's rule; two copies of the local model stand
        # in for the N replicas (the rules depend only on names, shapes and dtypes).
        plan = plan_merge(anchor_reader(self.anchor, live), [local, local], self.options)
        self.layers, self.warnings = plan.layers, list(plan.warnings)
        if self.n > 2:
            self.warnings.append(f"distributed merge of {self.n} replicas: cos is the "
                                 "norm-weighted mean of the pairwise cosines")
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
        reports: dict[str, LayerReport] = {}
        for bucket in self._buckets():
            self._merge_bucket(bucket, live, reports)
        self._copy_layers(live, reports)
        for p in self.layers:
            if p.rule == "anchor":
                live[p.name].copy_(self.anchor[p.name])
                reports[p.name] = LayerReport(p.name, list(p.shape), p.rule, _dtype(p), note=p.note)
        return MergeReport(method="model-stock", n_models=self.n,
                           granularity=self.options.granularity, clamp=self.options.clamp,
                           layers=[reports[p.name] for p in self.layers], anchor="anchor",
                           models=[f"replica {i}" for i in range(self.n)],
                           warnings=list(self.warnings))

    def _compute_dtype(self, p: LayerPlan) -> torch.dtype:
        dtypes = [p.out_dtype] + ([self.anchor[p.name].dtype] if p.anchored else [])
        return stock.compute_dtype_for(*dtypes)

    def _buckets(self) -> list[list[LayerPlan]]:
        """Summed layers (Model Stock and averaged) in groups of about ``bucket_numel`` elements
        with one compute dtype each."""
        buckets: list[list[LayerPlan]] = []
        size, dtype = 0, None
        for p in self.layers:
            if not (p.anchored or p.rule == "average"):
                continue
            dt = self._compute_dtype(p)
            if not buckets or dt != dtype or size + p.numel > self.bucket_numel:
                buckets.append([])
                size, dtype = 0, dt
            buckets[-1].append(p)
            size += p.numel
        return buckets

    def _w0(self, name: str) -> torch.Tensor:
        return self.anchor[name].reshape(-1).to(device=self.device)

    def _merge_bucket(self, bucket: list[LayerPlan], live: dict[str, torch.Tensor],
                      reports: dict[str, LayerReport]) -> None:
        dtype = self._compute_dtype(bucket[0])
        gran = self.options.granularity
        segs = [p.shape[0] if _row_numel(p, gran) else 1 for p in bucket]
        buf = torch.zeros(sum(p.numel for p in bucket), dtype=dtype, device=self.device)
        sq = torch.zeros((self.n, sum(segs)), dtype=torch.float64, device=self.device)
        offsets, off, seg_off = [], 0, 0
        for p, r in zip(bucket, segs, strict=True):
            offsets.append((off, seg_off))
            if self.leader:  # the other ranks of a replica hold the same weights: count once
                w = live[p.name].reshape(-1)
                if p.anchored:
                    d = stock.task_vectors(self._w0(p.name), [w], dtype)
                    buf[off : off + p.numel].copy_(d[0])
                    sq[self.replica, seg_off : seg_off + r] = (
                        stock.gram(d, _row_numel(p, gran)).reshape(-1))
                else:
                    buf[off : off + p.numel].copy_(w)
            off, seg_off = off + p.numel, seg_off + r
        names = ", ".join(p.name for p in bucket[:3]) + (", ..." if len(bucket) > 3 else "")
        self._all_reduce([buf, sq], f"all-reduce of {names}")
        self._written = True
        for p, r, (off, seg_off) in zip(bucket, segs, offsets, strict=True):
            total = buf[off : off + p.numel]
            if p.anchored:
                reports[p.name] = self._write_anchored(p, total, sq[:, seg_off : seg_off + r],
                                                       live[p.name])
            else:
                out = (total / self.n).to(p.out_dtype)
                if not stock.all_finite(out):
                    raise ModelStockError("averaged values are not finite (has a replica "
                                          "diverged?)", tensor=p.name)
                live[p.name].copy_(out.view(p.shape))
                reports[p.name] = LayerReport(p.name, list(p.shape), p.rule, _dtype(p),
                                              note=p.note)

    def _write_anchored(self, p: LayerPlan, total: torch.Tensor, sq: torch.Tensor,
                        target: torch.Tensor) -> LayerReport:
        row = _row_numel(p, self.options.granularity)
        sum_sq = stock.gram(total.view(1, -1), row).reshape(-1)  # |sum_i d_i|^2 per segment
        if not torch.isfinite(sum_sq).all():
            raise ModelStockError("task vectors are not finite (has a replica diverged?)",
                                  tensor=p.name)
        cos = norm_weighted_cos(sum_sq, sq)
        t = stock.stock_ratio(cos if row else cos[0], self.n, self.options.clamp)
        out = torch.empty(p.numel, dtype=p.out_dtype, device=self.device)
        stock.combine(self._w0(p.name), total, t / self.n, out, row)  # w0 + t/N sum_i d_i
        target.copy_(out.view(p.shape))
        return self._describe(p, sum_sq.sum(), sq.sum(1), t)

    def _describe(self, p: LayerPlan, sum_sq: torch.Tensor, sq: torch.Tensor,
                  t: torch.Tensor) -> LayerReport:
        rep = LayerReport(p.name, list(p.shape), p.rule, _dtype(p))
        rep.norms = [float(x) for x in sq.clamp_min(0).sqrt()]
        rep.cos = float(norm_weighted_cos(sum_sq, sq))
        if self.n == 2:
            rep.pair_cos = [rep.cos]
        rep.angle_deg = math.degrees(math.acos(max(-1.0, min(1.0, rep.cos))))
        rep.t = float(t.mean())
        if t.ndim:
            rep.t_min, rep.t_max = float(t.min()), float(t.max())
        zero = [i for i, x in enumerate(rep.norms) if x == 0]
        if len(zero) == self.n:
            rep.note = "every task vector is zero: output equals the anchor"
        elif zero:
            rep.note = f"task vector of replica(s) {zero} is zero"
        return rep

    def _copy_layers(self, live: dict[str, torch.Tensor], reports: dict[str, LayerReport]) -> None:
        """Integer/bool tensors: every replica takes replica 0's values (one broadcast of bytes);
        the report notes a tensor whose values differed on some replica."""
        copies = [p for p in self.layers if p.rule == "copy"]
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
            reports[p.name] = LayerReport(p.name, list(p.shape), p.rule, _dtype(p), note=note)


def _dtype(p: LayerPlan) -> str:
    return str(p.out_dtype).removeprefix("torch.")
