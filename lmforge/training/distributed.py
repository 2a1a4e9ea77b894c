"""Several processes, one loop: PyTorch's own engine (torchrun, DDP, FSDP2, DCP) behind a few calls.

The loop in :mod:`lmforge.training.loop` stays the same loop; under ``torchrun`` it asks this
module four things:

- **join the job**: :func:`job` starts the process group from torchrun's environment (gloo on
  the CPU, NCCL on GPUs) and ends it, or does nothing when the process runs alone;
- **wrap the model**: :func:`wrap` gives ``DistributedDataParallel`` (the model fits on each
  device: every rank holds it whole and gradients are averaged) or FSDP2's ``fully_shard`` (each
  transformer block's parameters, gradients and AdamW state sharded across the ranks, gathered
  block by block in forward and backward), after nanoGPT's ``train.py`` and torchtitan;
- **sum across ranks**: :func:`all_sum` and :func:`sum_totals` (targets of an accumulation
  window, the step's metrics, a vote to stop);
- **sharded checkpoints**: :func:`save_sharded` / :func:`load_sharded` write and read an FSDP
  run's weights and optimizer state with ``torch.distributed.checkpoint`` (each rank its shards,
  into one folder); :func:`gather_full` consolidates the weights into plain tensors.

Batch sources deal a *global* batch out to the ranks (:mod:`lmforge.data.samplers`,
``tasks.base.Batches``), so N ranks × batch b train on exactly the rows one process with batch
N·b would: the same numbers, to float rounding.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LMForgeError
from ..runtime import launched, local_rank
from .config import Strategy

T = TypeVar("T")
SHARDED_DIR = "sharded"  # a checkpoint's DCP folder (FSDP runs)


class PeerLost(LMForgeError):
    """Another process of the job stopped: this one cannot go on alone."""


def active() -> bool:
    """Whether this process is in a started process group."""
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def job(device: str = "auto", *, timeout_minutes: float = 30.0) -> Iterator[bool]:
    """Join the job torchrun started (and leave it at the end); yields whether this process is
    one of several. Alone, or already in a group, it does nothing.

    The backend follows the device: NCCL when this rank trains on a GPU, gloo on the CPU."""
    if active() or not launched():
        yield active()
        return
    gpu = torch.cuda.is_available() and device != "cpu"
    if gpu:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(
        backend="nccl" if gpu else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes)
    )
    try:
        yield True
    except BaseException:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    with contextlib.suppress(Exception):
        # Leave together: a rank that tears its connections down while a peer's gloo threads
        # still use them has been seen to abort the peer at exit ("terminate called …", -6).
        dist.barrier()
        dist.destroy_process_group()


# ---- collectives ------------------------------------------------------------------------------


def _peer_lost(err: BaseException) -> PeerLost:
    return PeerLost(f"another process of this job stopped ({short_reason(err)})")


PEER_GONE = re.compile(r"Connection (?:reset|closed|refused)[a-z ]*|Broken pipe|[Tt]imed out|NCCL error[^.]*")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another rank is gone (not a bug here)."""
    return isinstance(err, PeerLost | dist.DistError) or bool(PEER_GONE.search(str(err)))


def short_reason(err: BaseException) -> str:
    """What a failed collective says, in a few words (gloo's and NCCL's messages run long)."""
    text = str(err).strip()
    found = PEER_GONE.search(text)
    if found:
        return found.group(0).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (the values themselves when alone)."""
    if not active():
        return list(values)
    on_gpu = dist.get_backend() == "nccl"  # NCCL reduces tensors on this rank's GPU only
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    except (RuntimeError, dist.DistError) as err:
        raise _peer_lost(err) from None
    return tensor.tolist()


def sum_totals(a: float, b: float, named: dict[str, float]) -> tuple[float, float, dict[str, float]]:
    """Two totals and a dict of named ones (the same keys on every rank), summed over all ranks."""
    keys = sorted(named)
    first, second, *rest = all_sum([a, b, *(named[k] for k in keys)])
    return first, second, dict(zip(keys, rest, strict=True))


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    box = [value]
    try:
        dist.broadcast_object_list(box, src=0)
    except (RuntimeError, dist.DistError) as err:
        raise _peer_lost(err) from None
    return box[0]


def barrier() -> None:
    """Wait until every rank is here."""
    if active():
        try:
            dist.barrier()
        except (RuntimeError, dist.DistError) as err:
            raise _peer_lost(err) from None


def writer_first(work: Callable[[], T]) -> T | None:
    """Run ``work()`` on rank 0 before the other ranks go on (they get None), or raise on every
    rank the one-line reason it failed, so no rank waits for a writer that is gone. Alone: ``work()``."""
    if not active():
        return work()
    if dist.get_rank() == 0:
        try:
            result = work()
        except Exception as err:
            why = (
                err.one_line()
                if isinstance(err, LMForgeError)
                else f"rank 0 failed: {type(err).__name__}: {err}"
            )
            broadcast(why)
            raise
        broadcast(None)
        return result
    why = broadcast(None)
    if why is not None:
        raise LMForgeError(why)
    return None


# ---- wrapping the model -----------------------------------------------------------------------


def choose(strategy: Strategy, model: nn.Module, device: torch.device) -> Literal["ddp", "fsdp"]:
    """``auto``: DDP when the model, its gradients and AdamW's two moments (16 bytes a
    parameter in fp32) take under half of one device's memory; FSDP otherwise. CPUs: DDP."""
    if strategy != "auto":
        return strategy
    if device.type != "cuda":
        return "ddp"
    need = 16 * sum(p.numel() for p in model.parameters())
    return "ddp" if need < 0.5 * torch.cuda.get_device_properties(device).total_memory else "fsdp"


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one (encoder and decoder stacks)."""
    found: list[nn.Module] = []
    for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        found.extend(getattr(stack, "blocks", None) or [])
    return found


def wrap(
    model: nn.Module, strategy: Literal["ddp", "fsdp"], *, device: torch.device, bf16: bool
) -> nn.Module:
    """The model as the job trains it: DDP around it, or the model itself sharded by FSDP2
    (block by block, then the rest: embeddings, final norm, head; bf16 parameters with fp32
    gradient reduction when ``bf16``)."""
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # every rank shards the same weights: rank 0's (as DDP starts)
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mp_policy": policy} if policy is not None else {}
    for block in blocks_of(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulate gradients locally (``sync=False``: every micro-step but the window's last,
    nanoGPT's ``no_sync``) or reduce them across ranks in this backward."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
    yield


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradients to ``max_norm`` by their global norm (over all shards); returns it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(total, "full_tensor"):  # a DTensor: the norm of FSDP's sharded gradients
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)


# ---- sharded checkpoints (FSDP) ---------------------------------------------------------------


def _options(frozen: bool, *, full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, ignore_frozen_params=not frozen)


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, frozen: bool) -> None:
    """Every rank writes its shards of the weights (all of them, or only the trainable ones when
    ``frozen`` is False: a PEFT run's adapter and head) and of the optimizer state into
    ``folder`` (one DCP checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options(frozen))
    try:
        dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(folder))
    except (RuntimeError, dist.DistError) as err:
        raise _peer_lost(err) from None


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, frozen: bool) -> None:
    """Read what :func:`save_sharded` wrote back into the sharded model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options(frozen))
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_options(frozen),
    )


def gather_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's weights gathered into plain CPU tensors, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(True, full=True))
    return {k: v.detach().cpu() for k, v in state.items()}


def read_sharded_weights(folder: Path, model: nn.Module) -> None:
    """Fill a plain model (one process, no job) from a sharded checkpoint's weights: the tensors
    the checkpoint holds (all of them, or a PEFT run's trainable ones)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    saved = {k.removeprefix("model.") for k in metadata.state_dict_metadata if k.startswith("model.")}
    own = model.state_dict()
    wanted = {k: own[k] for k in saved if k in own}
    if missing := sorted(saved - set(wanted)):
        raise LMForgeError(
            f"the sharded checkpoint does not fit the model: tensor '{missing[0]}'", file=folder
        )
    with warnings.catch_warnings():  # "no process group: loading in a single process" — as meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": wanted}, checkpoint_id=str(folder))
    model.load_state_dict(wanted, strict=False)
