"""The training loop: one code path for one process and N under ``torchrun``.

Every training step (``qat``, ``distill``, ``lora``) hands the loop its parameter groups and
a ``step_loss(i)`` closure (the loss on batch ``i``). Under ``torchrun`` (``torch.distributed``
initialised, gloo on CPU, nccl on GPU) the parameters are wrapped in torch's
``DistributedDataParallel``: it starts every rank from rank 0's values and averages the
gradients during ``backward``, so all ranks stay identical. Micro-batch ``j`` of step ``t``
on rank ``r`` of ``W`` is batch ``order[(t·A + j)·W + r]`` of one seeded order (``A``
micro-batches accumulated per step), so that W processes with A micro-batches each see the
batches one process sees with W·A: the same global batch, the same loss curve. One process
is the case ``W = 1`` (no wrapper: DDP of one rank is the identity). Rank 0 alone prints and
writes checkpoints; the other ranks wait at a barrier until it is written, and a resumed run
checks that every rank resumed the same step.

Random draws (dropout) come from generators reseeded before each step from ``(seed, rank,
step)``: a resumed run draws exactly what the uninterrupted one drew, on every rank, without
any random state in the checkpoint; the caller's random state (CPU and CUDA) is restored after.
The loss reported, and the held-out loss that decides early stopping, are averaged over the
ranks, so every rank takes the same decisions.

With ``sharding="fsdp"`` the model is sharded over the ranks instead (FSDP2, torch's
``fully_shard``; :mod:`slimline.train.sharding`) for the run and handed back whole: the same
batches, the same averaged gradients, a memory share of 1/W per rank. Checkpoints then gather
every shard (all ranks) and rank 0 writes the whole tensors, so a run resumes under either
sharding and any number of ranks with the same global batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from slimline.train.options import LoopOptions
from slimline.train.precision import MasterWeights, autocast
from slimline.train.resume import LoopState, load_state, save_state
from slimline.train.sharding import Sharded, clip_gradients, full, shard_like


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where the tensors of collectives live: the current GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(value: float) -> float:
    """The mean of ``value`` over the ranks (itself in one process), the same on every rank."""
    size = world()[1]
    if size == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return float(tensor) / size


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of optimizer step ``step`` on ``rank``: a hash of the three, so that steps
    and ranks draw unrelated streams and a resumed run draws what the first one did."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63


def _cuda_devices(params: Sequence[torch.Tensor]) -> list[int]:
    """The CUDA devices whose generators the run may draw from: the parameters' and the
    current one, when CUDA is in use (never initialising it otherwise)."""
    if not torch.cuda.is_initialized():
        return []
    found = {p.device.index for p in params if p.device.type == "cuda"}
    found.add(torch.cuda.current_device())
    return sorted(i for i in found if i is not None)


@contextmanager
def seeded_steps(params: Sequence[torch.Tensor]) -> Iterator[Callable[[int], None]]:
    """A ``reseed(seed)`` for the CPU generator and the CUDA generators of ``params``'
    devices; the caller's states of those generators are restored on leaving."""
    devices = _cuda_devices(params)
    with torch.random.fork_rng(devices=devices):

        def reseed(value: int) -> None:
            torch.default_generator.manual_seed(value)
            for index in devices:  # these devices only: torch.manual_seed would seed all
                torch.cuda.default_generators[index].manual_seed(value)

        yield reseed


def batch_order(n_batches: int, length: int, seed: int) -> list[int]:
    """``length`` batch indices: seeded permutations of ``range(n_batches)``, one per epoch."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < length:
        order.extend(torch.randperm(n_batches, generator=g).tolist())
    return order[:length]


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps to 1, then a cosine to 0 at ``steps`` (SGDR, arXiv 1608.03983)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


class _Trained(nn.Module):
    """The trained parameters as a module, so that DDP can hold them; its forward is the
    step's loss on one batch (the parameters are used inside the closure's model)."""

    def __init__(self, params: Sequence[nn.Parameter], step_loss: Callable[[int], torch.Tensor]):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.step_loss = step_loss

    def forward(self, index: int) -> torch.Tensor:
        return self.step_loss(index)


def make_optimizer(
    groups: list[dict[str, Any]], options: LoopOptions
) -> torch.optim.Optimizer:
    """The named optimizer over ``groups`` (fused Adam/AdamW kernels where they apply)."""
    if options.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, weight_decay=options.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kind = torch.optim.AdamW if options.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, weight_decay=options.weight_decay, fused=fused or None)


def train_loop(
    param_groups: Sequence[dict[str, Any]],
    step_loss: Callable[[int], torch.Tensor],
    n_batches: int,
    *,
    steps: int,
    seed: int,
    name: str,
    lr_fields: str = "lr",
    progress: bool = False,
    options: LoopOptions | None = None,
    evaluate: Callable[[], float] | None = None,
    after_step: Callable[[int], None] | None = None,
    tokens: Callable[[int], int] | None = None,
    model: nn.Module | None = None,
    before_update: Callable[[], None] | None = None,
) -> list[float]:
    """Run ``steps`` optimizer steps on ``param_groups``; returns the loss of each step.

    ``step_loss(i)`` is the loss on batch ``i`` (of ``n_batches``); each group's learning
    rate follows :func:`warmup_cosine` from its ``lr``. ``name`` labels the progress bar and
    errors; ``lr_fields`` are the config fields to lower should the loss stop being finite
    (ValueError naming the step, raised before that step changes anything). ``evaluate()``
    is the held-out loss (every ``options.eval_every`` steps, and before the first: the
    best evaluated parameters are kept); ``after_step(t)`` runs after each optimizer step;
    ``tokens(i)`` counts batch ``i``'s tokens for the progress bar's tokens/s.
    ``model`` is the module ``step_loss`` runs (needed by ``sharding="fsdp"``, which shards
    it for the run); ``before_update()`` runs after the gradients are complete and averaged,
    before clipping and the optimizer step (e.g. to zero the gradients of pruned weights).
    """
    opts = options or LoopOptions()
    if not any(True for g in param_groups for _ in g["params"]):
        raise ValueError(f"{name}: nothing to train (no parameter requires gradients)")
    with _held(model, [dict(g) for g in param_groups], opts, name) as (groups, sharded):
        rank, size = world()
        params = [p for g in groups for p in g["params"]]
        module = _Trained(params, step_loss)
        # DDP broadcasts rank 0's parameters on construction and all-reduces the gradients.
        engine: nn.Module = module
        if size > 1 and sharded is None:
            engine = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
        masters = MasterWeights(groups) if opts.master_weights else None
        trained = [p for g in (masters.groups if masters else groups) for p in g["params"]]
        optimizer = make_optimizer(masters.groups if masters else groups, opts)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: warmup_cosine(t, steps, opts.warmup)
        )
        run = {"name": name, "steps": steps, "seed": seed, "n_batches": n_batches,
               "global_micro_batches": opts.accumulation * size,
               "shapes": [list(p.shape) for p in params]}  # fmt: skip
        with seeded_steps(params) as reseed:
            state = _start(opts, run, trained, optimizer, schedule, masters, sharded is not None)
            runner = _Runner(engine, params, trained, optimizer, schedule, masters, opts, name,
                             lr_fields, reseed=lambda t: reseed(step_seed(seed, rank, t)),
                             sharded=sharded, before_update=before_update)  # fmt: skip
            if evaluate is not None and state.step == 0 and state.best_params is None:
                runner.reseed(-1)
                runner.evaluate(evaluate, state)
            order = batch_order(n_batches, steps * opts.accumulation * size, seed)
            _run(runner, state, run, steps, order=order, progress=progress, evaluate=evaluate,
                 after_step=after_step, tokens=tokens)  # fmt: skip
            if state.best_params is not None:
                runner.restore(state.best_params)
        return state.losses


@contextmanager
def _held(
    model: nn.Module | None, groups: list[dict[str, Any]], opts: LoopOptions, name: str
) -> Iterator[tuple[list[dict[str, Any]], Sharded | None]]:
    """The groups to train and, under ``sharding="fsdp"`` on several ranks, the model
    sharded for the run (whole again on leaving)."""
    if opts.sharding != "fsdp" or world()[1] == 1:
        yield groups, None
        return
    if model is None:
        raise ValueError(f"{name}: sharding 'fsdp' needs the model the loss runs")
    sharded = Sharded(model, groups)
    try:
        yield sharded.groups, sharded
    finally:
        sharded.close()


def _start(
    opts: LoopOptions,
    run: dict[str, Any],
    trained: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    masters: MasterWeights | None,
    sharded: bool,
) -> LoopState:
    """A fresh state, or the one in ``opts.checkpoint_dir`` with parameters restored."""
    if not opts.checkpoint_dir:
        return LoopState()
    resumed = load_state(opts.checkpoint_dir, run, trained, optimizer,
                         place=shard_like if sharded else lambda v, _: v)  # fmt: skip
    _check_ranks_agree(opts.checkpoint_dir, -1 if resumed is None else resumed.step)
    if resumed is None:
        return LoopState()
    schedule.last_epoch = resumed.step
    if masters is not None:
        masters.masters_to_params()
    return resumed


def _check_ranks_agree(directory: str, step: int) -> None:
    """ValueError on every rank when the ranks did not resume the same step (-1: none), e.g.
    a checkpoint directory that is not on a file system every rank shares."""
    if world()[1] == 1:
        return
    mine = torch.tensor([step], dtype=torch.int64, device=collective_device())
    steps = [torch.zeros_like(mine) for _ in range(world()[1])]
    dist.all_gather(steps, mine)
    found = [int(s) for s in steps]
    if len(set(found)) > 1:
        raise ValueError(f"checkpoint_dir: the ranks found different checkpoints in {directory} "
                         f"(steps by rank, -1 none: {found}); it must be one directory every "
                         "rank reads")  # fmt: skip


def _run(
    runner: _Runner,
    state: LoopState,
    run: dict[str, Any],
    steps: int,
    *,
    order: list[int],
    progress: bool,
    evaluate: Callable[[], float] | None,
    after_step: Callable[[int], None] | None,
    tokens: Callable[[int], int] | None,
) -> None:
    """The steps from ``state.step`` to ``steps`` (or early stopping)."""
    rank, size = world()
    opts = runner.opts
    bar = tqdm(total=steps, initial=state.step, desc=runner.name, leave=False,
               disable=not progress or rank != 0)  # fmt: skip
    with bar:
        while state.step < steps and not state.stopped:
            t = state.step
            micro = [order[(t * opts.accumulation + j) * size + rank]
                     for j in range(opts.accumulation)]  # fmt: skip
            start = time.perf_counter()
            runner.reseed(t)
            state.losses.append(runner.step(t, micro))
            state.step += 1
            if after_step is not None:
                after_step(t)
            if evaluate is not None and opts.eval_every and state.step % opts.eval_every == 0:
                runner.evaluate(evaluate, state)
            _show(bar, state.losses[-1], micro, tokens, size, time.perf_counter() - start)
            due = opts.checkpoint_every and (state.step % opts.checkpoint_every == 0
                                             or state.step == steps or state.stopped)  # fmt: skip
            if opts.checkpoint_dir and due:
                if runner.sharded is not None:  # every rank gathers, rank 0 writes
                    save_state(opts.checkpoint_dir, run, runner.trained, runner.optimizer, state,
                               whole=full, write=rank == 0)  # fmt: skip
                elif rank == 0:
                    save_state(opts.checkpoint_dir, run, runner.trained, runner.optimizer, state)
                if size > 1:  # no rank runs ahead of a checkpoint that may yet fail to write
                    dist.barrier()
    if evaluate is not None and not state.stopped and (
        not opts.eval_every or state.step % opts.eval_every
    ):
        runner.evaluate(evaluate, state)  # the last steps count too


def _show(bar: Any, loss: float, micro: list[int], tokens: Callable[[int], int] | None,
          size: int, seconds: float) -> None:  # fmt: skip
    bar.update(1)
    postfix = {"loss": f"{loss:.4g}"}
    if tokens is not None:
        postfix["tok/s"] = f"{sum(tokens(i) for i in micro) * size / max(seconds, 1e-9):.0f}"
    bar.set_postfix(postfix, refresh=False)


class _Runner:
    """One optimizer step and one evaluation, with the loop's fixed collaborators."""

    def __init__(
        self,
        engine: nn.Module,
        params: list[nn.Parameter],
        trained: list[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        masters: MasterWeights | None,
        opts: LoopOptions,
        name: str,
        lr_fields: str,
        *,
        reseed: Callable[[int], None],
        sharded: Sharded | None = None,
        before_update: Callable[[], None] | None = None,
    ) -> None:
        self.engine, self.params, self.trained = engine, params, trained
        self.sharded, self.before_update = sharded, before_update
        self.optimizer, self.schedule, self.masters = optimizer, schedule, masters
        self.opts, self.name, self.lr_fields = opts, name, lr_fields
        self.reseed = reseed  # the random state of step t (-1: before the first)

    def step(self, t: int, micro: list[int]) -> float:
        """Accumulate the micro-batches' gradients, check the loss, step; the mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        total = 0.0
        for j, index in enumerate(micro):
            with self._sync(last=j == len(micro) - 1):
                with autocast(self.params, self.opts.autocast):
                    loss = self.engine(index)
                (loss.float() / len(micro)).backward()
            total += float(loss.detach())
        value = mean_over_ranks(total / len(micro))  # the global batch's, on every rank
        if not math.isfinite(value):  # every rank sees it, nothing was updated yet
            raise ValueError(f"{self.name}: the loss became {value} at step {t}; "
                             f"lower {self.lr_fields}")  # fmt: skip
        if self.sharded is not None:
            self.sharded.average_extras()
        if self.before_update is not None:
            self.before_update()
        if self.masters is not None:
            self.masters.gradients_to_masters()
        if self.opts.max_grad_norm is not None and self.sharded is not None:
            clip_gradients(self.trained, self.opts.max_grad_norm)
        elif self.opts.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trained, self.opts.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        if self.masters is not None:
            self.masters.masters_to_params()
        return value

    def _sync(self, *, last: bool) -> AbstractContextManager[Any]:
        no_sync = getattr(self.engine, "no_sync", None)
        return nullcontext() if last or no_sync is None else no_sync()

    @torch.no_grad()
    def evaluate(self, evaluate: Callable[[], float], state: LoopState) -> None:
        """Evaluate; keep the parameters when best, count toward early stopping if not."""
        with autocast(self.params, self.opts.autocast):
            value = float(evaluate())
        value = mean_over_ranks(value)  # every rank keeps and stops alike
        if value < state.best:
            state.best, state.bad = value, 0
            state.best_params = [p.detach().clone() for p in self.trained]
        else:
            state.bad += 1
            state.stopped = bool(self.opts.patience) and state.bad >= self.opts.patience

    @torch.no_grad()
    def restore(self, values: list[torch.Tensor]) -> None:
        for p, value in zip(self.trained, values, strict=True):
            p.copy_(value)
        if self.masters is not None:
            self.masters.masters_to_params()

