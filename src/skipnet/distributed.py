"""Process-group plumbing for ``torchrun`` (DistributedDataParallel); single-process defaults otherwise.

``skipnet train`` becomes a data-parallel run when torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) is present with ``WORLD_SIZE > 1``: gloo on CPU, NCCL on CUDA (device ``cuda:LOCAL_RANK``).
Every rank holds the same weights; the trainer shards the training data, and :class:`DistContext` supplies
the pieces that keep a run independent of the number of processes K for a fixed global batch:

- the per-rank loss is a mean over the local batch and DDP averages gradients over ranks, so with equal
  shards the gradient is the single-process mean over the global batch -- for the cross-entropy and for the
  REINFORCE term ``-mean_b sum_i log pi(g_i) r_i`` alike (both are means over samples);
- REINFORCE baselines (``batch``/``ema``) use the *global* batch mean of the returns (one all-reduce);
- logged metrics are averaged over ranks; validation and test run on rank 0 over the whole split.

Routed execution (stage ``hrl``/``rl``/``sdv``) leaves a block's parameters without gradient on a rank
where no sample executes it; DDP runs with ``find_unused_parameters=True`` for those stages (never
``static_graph``), which reduces such gradients correctly (the idle rank contributes zero). ``SyncBatchNorm``
is a collective per BN call, so with ``--sync-bn`` the training forward uses masked execution (every rank
calls every BN, in the same order); see :attr:`DistContext.train_execution`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from skipnet.device import pick_device
from skipnet.errors import SkipnetError
from skipnet.gated import GateMode
from skipnet.losses import Baseline

log = logging.getLogger(__name__)

T = TypeVar("T")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Rank 0 evaluates the whole validation split while the others wait in a collective: allow for that.
TIMEOUT = timedelta(minutes=int(os.environ.get("SKIPNET_DIST_TIMEOUT_MIN", "60")))


def torchrun_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables, or ``None`` outside torchrun."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    except ValueError:
        raise SkipnetError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None


def find_unused_parameters(model: nn.Module, train_mode: GateMode | str) -> bool:
    """Whether a training forward in ``train_mode`` can leave some of ``model``'s parameters out of the graph.

    Masked modes (``hard``, ``soft``) run every block and every gate. ``all_on`` runs every block but
    computes no gate. ``sample`` and ``random`` route: a block that no sample of a rank executes is unused
    there (and stage ``rl`` leaves the classifier out of the loss).
    """
    mode = GateMode(train_mode)
    if mode in (GateMode.HARD, GateMode.SOFT):
        return False
    if mode == GateMode.ALL_ON:
        return getattr(model, "gates", None) is not None
    return True


def unsharded(loader: Any) -> Any:
    """A loader over the whole split behind the (evaluation) ``loader`` of one rank."""
    from skipnet.data import FolderLoader, TensorLoader

    if isinstance(loader, TensorLoader):
        if loader.world == 1:
            return loader
        full = copy.copy(loader)
        full.rank, full.world = 0, 1
        return full
    if isinstance(loader, FolderLoader):
        if loader.sampler is None:
            return loader
        dl = loader.loader
        return FolderLoader(
            loader.dataset, dl.batch_size, train=False, workers=dl.num_workers, seed=loader.seed, rank=0, world=1
        )
    return loader


class GlobalBaseline(Baseline):
    """:class:`~skipnet.losses.Baseline` whose batch mean is taken over the global batch (all ranks)."""

    def __init__(self, kind: str, ctx: DistContext, momentum: float = 0.9) -> None:
        super().__init__(kind, momentum)
        self._ctx = ctx

    def __call__(self, returns: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.kind in ("none", "self-critical"):  # per sample: nothing to share between processes
            return super().__call__(returns, greedy)
        # The parent's batch statistic is ``returns.mean(0)``; a (1, N) row holding the global mean gives it
        # exactly, and every rank then keeps the same moving average.
        return super().__call__(self._ctx.all_mean(returns.detach().mean(0)).unsqueeze(0))


@dataclass
class DistContext:
    """One process of a (possibly single-process) run: its rank, the world size and its device.

    Attributes:
        owned: this context initialised the process group (and destroys it in :meth:`cleanup`).
        sync_bn: BatchNorm was converted to SyncBatchNorm by :meth:`wrap`.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owned: bool = False
    sync_bn: bool = False
    _full: dict[int, Any] = field(default_factory=dict, repr=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def train_execution(self) -> str:
        """Execution of the training forward: ``masked`` under SyncBatchNorm, else ``auto``.

        SyncBatchNorm exchanges statistics at every BN call, so every rank must call the same BNs in the same
        order. Routing calls a block's BNs only where some sample executes it (and a partly executed
        downsampling block calls them in another order than a fully executed one), so it would hang or mix up
        statistics; masked execution calls all of them for every sample. The price: skipped samples enter the
        block's batch statistics (as in the authors' code) and no compute is saved in training.
        """
        return "masked" if self.sync_bn else "auto"

    # ---------------------------------------------------------------------------------------- wrapping
    def wrap(self, model: nn.Module, cfg: Any) -> nn.Module:
        """The module to train: ``model`` under SyncBatchNorm / DDP / ``torch.compile`` as ``cfg`` asks.

        ``model`` itself stays the bare network (its BatchNorms become SyncBatchNorms in place under
        ``--sync-bn``; their parameters are the same objects, so an optimizer built before keeps working).
        On several ranks the global RNG is re-seeded per rank here (from one draw shared by all), so that
        sampled gate decisions are independent across ranks; a resumed run then puts back each rank's own streams
        from its checkpoint (:meth:`skipnet.runstate.RunState.restore_rank_rng`).
        """
        from skipnet.stages import STAGES

        stage = STAGES[cfg.stage]
        train_model = model
        if self.world > 1:
            if cfg.sync_bn:
                nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.sync_bn = True
            shared = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the same draw on every rank
            torch.manual_seed(shared + 1_000_003 * self.rank)
            unused = find_unused_parameters(model, stage.train_mode)
            train_model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused,
                static_graph=False,
            )
        if getattr(cfg, "compile", False):
            train_model = compile_model(train_model)
        return train_model

    # ---------------------------------------------------------------------------------------- collectives
    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over ranks (``t`` itself in a single process)."""
        if self.world == 1:
            return t
        out = t.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (one tiny all-reduce; none in a single process)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        """Average 0-dim statistics over ranks (one all-reduce); returns plain floats, same on every rank."""
        if not stats:
            return {}
        keys = list(stats)
        t = torch.stack([stats[k].detach().float().reshape(()) for k in keys])
        if self.world > 1:
            t = self.all_mean(t.to(self.device))
        return dict(zip(keys, t.tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """``obj`` of rank ``src`` on every rank (picklable objects)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def gather_object(self, obj: T) -> list[T] | None:
        """Every rank's (picklable) ``obj``, in rank order, on rank 0; ``None`` on the other ranks."""
        if self.world == 1:
            return [obj]
        # One broadcast per rank (the collective the rest of training uses), not torch's gather_object: with it, a
        # finished two-process run aborted at exit in about one launch in four ("terminate called without an
        # active exception").
        every = [self.broadcast_object(obj if r == self.rank else None, src=r) for r in range(self.world)]
        return every if self.main else None

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its (picklable) result to every rank."""
        return self.broadcast_object(fn() if self.main else None)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The local rank 0 of each machine runs the body first (extracting and caching data), the others after."""
        if self.world > 1 and self.local_rank != 0:
            self.barrier()
        try:
            yield
        finally:
            if self.world > 1 and self.local_rank == 0:
                self.barrier()

    def full_split(self, loader: Any) -> Any:
        """The whole split behind an evaluation ``loader`` (which is sharded across ranks), built once."""
        if self.world == 1 or loader is None:
            return loader
        key = id(loader)
        if key not in self._full:
            self._full[key] = (loader, unsharded(loader))  # keep ``loader`` alive: ids are not reused
        return self._full[key][1]

    def baseline(self, kind: str) -> Baseline:
        """A REINFORCE baseline over the global batch."""
        return Baseline(kind) if self.world == 1 else GlobalBaseline(kind, self)

    def cleanup(self) -> None:
        """Destroy the process group this context created.

        Drop every DistributedDataParallel module first: one still alive when the interpreter exits is torn
        down after the process group's threads and aborts the process ("terminate called without an active
        exception") now and then.
        """
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
        self.owned = False

    # ---------------------------------------------------------------------------------------- precision
    def autocast(self, amp: str):
        """Autocast on this device type for ``--amp bf16|fp16``; a no-op context for ``none``."""
        check_amp(amp, self.device)
        if amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AMP_DTYPES[amp])

    def grad_scaler(self, amp: str):
        """A GradScaler for fp16 (CUDA); ``None`` otherwise (bf16 keeps fp32's exponent range)."""
        if amp == "fp16" and self.device.type == "cuda":
            return torch.amp.GradScaler("cuda")
        return None


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in ("none", "bf16", "fp16"):
        raise SkipnetError(f"--amp must be none, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise SkipnetError(
            "--amp fp16 needs a CUDA device (CPU float16 autocast is slow and has no loss scaling); "
            "use --amp bf16 on CPU"
        )
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SkipnetError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use fp16")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(
            "--amp bf16: this CPU has no native bfloat16 arithmetic (AVX-512 BF16 or AMX), so oneDNN emulates it: "
            "measured 80x slower than float32 for a matrix product on an AVX2 machine; use --amp none here",
            stacklevel=2,
        )


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (``True`` when PyTorch cannot tell)."""
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else True
    except RuntimeError:
        return True


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile`` the training module (``--compile``), batch dimension dynamic.

    The routed forward reads decisions on the host (``nonzero``/``.item()``), which breaks the graph once
    per gated block; each piece between breaks is compiled with a symbolic batch size, so subsets of most
    sizes reuse it. Masked stages (``sp``, ``soft``) compile to one graph. ``options`` go to ``torch.compile``.
    """
    return torch.compile(model, dynamic=True, **options)


def setup(cfg: Any) -> DistContext:
    """A context for this process: torchrun's environment if present, else a single CPU/GPU process.

    Validates ``--amp`` and ``--sync-bn`` against the device before any data is loaded.
    """
    env = torchrun_env()
    rank, world, local_rank = env if env is not None else (0, 1, 0)
    device = pick_device(cfg.device, local_rank)
    check_amp(getattr(cfg, "amp", "none"), device)
    sync_bn = bool(getattr(cfg, "sync_bn", False))
    if sync_bn and world > 1 and device.type != "cuda":
        raise SkipnetError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm has no CPU implementation")
    if sync_bn and world == 1:  # refused, not ignored, as every option that nothing would read
        raise SkipnetError(
            "--sync-bn synchronises BatchNorm across torchrun processes, and this run is one process; drop it, or "
            "start the run with torchrun --nproc_per_node N"
        )
    ctx = DistContext(rank=rank, world=world, local_rank=local_rank, device=device)
    if world == 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return ctx
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        ctx.owned = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise SkipnetError("the process group does not match RANK/WORLD_SIZE of the environment")
    if rank != 0:  # one copy of the run's log lines: rank 0's
        logging.getLogger("skipnet").setLevel(logging.WARNING)
    return ctx
