"""Distributed set-up shared by the training recipes: one process, DDP or FSDP2, from torchrun's or
accelerate's environment variables (gloo on CPU, nccl on GPUs).

Every function is a no-op (or the plain single-process operation) when ``world_size`` is 1, so a
recipe calls them unconditionally.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from t2r_export.architectures import get_adapter
from t2r_export.models.attention import FEATURE_MAP_ATTR
from t2r_export.models.swap import decoder_layers


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # the model is sharded with FSDP2 (only with world_size > 1)
    fsdp: bool = False
    # this process created the process group, so it also destroys it
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(fsdp: bool = False) -> Distributed:
    """Rank, world size and device from torchrun's / accelerate's environment variables."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns_group = world_size > 1 and not torch_dist.is_initialized()
    if owns_group:
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    rank = torch_dist.get_rank() if world_size > 1 else 0
    return Distributed(rank, world_size, device, fsdp and world_size > 1, owns_group)


def global_mean(value: torch.Tensor, dist: Distributed) -> float:
    """The mean of a scalar over all ranks (every rank gets the same float)."""
    value = value.detach().float().clone()
    if dist.world_size > 1:
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        value /= dist.world_size
    return value.item()


def shard_fsdp(model, dist: Distributed) -> None:
    """FSDP2 in place: each decoder layer is one unit (gathered for its forward), the rest the root.

    The feature maps stay whole on every rank and ``sync_feature_map_grads`` averages their
    gradients: they are tiny, and in attention transfer their loss never flows back through a
    layer's output, so FSDP's backward hooks would never reduce (or even see) their gradients.
    """
    from torch.distributed.fsdp import fully_shard

    replicated = set(feature_map_parameters(model))
    for layer in decoder_layers(model, get_adapter(model.config.model_type)):
        fully_shard(layer, ignored_params=replicated)
    fully_shard(model, ignored_params=replicated)


def sync_feature_map_grads(model, dist: Distributed) -> None:
    """Average the replicated feature maps' gradients over ranks (FSDP only; DDP does its own)."""
    if not dist.fsdp:
        return
    for p in feature_map_parameters(model):
        if p.grad is not None:
            torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)
            p.grad /= dist.world_size


def clip_gradients(params: list, max_norm: float, dist: Distributed) -> None:
    if not dist.fsdp:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    from torch.distributed.tensor import DTensor

    # sharded gradients' norms are summed over ranks (full_tensor); replicated ones are whole already
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
    norms += [torch.nn.utils.get_total_norm(whole)] if whole else []
    total = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
    if total > max_norm:
        for g in grads:
            g.mul_(max_norm / (total + 1e-6))


def reshard(model, dist: Distributed) -> None:
    """Put every FSDP unit back to sharded parameters.

    A forward without a backward (evaluation, or units that got no gradient in attention transfer)
    leaves the root's parameters gathered; optimizers and state dicts must see the sharded ones.
    """
    if not dist.fsdp:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def wrap_ddp(model, dist: Distributed):
    if dist.world_size == 1 or dist.fsdp:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def feature_map_parameters(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if FEATURE_MAP_ATTR in name]


def micro_batches(batch: torch.Tensor, dist: Distributed, grad_accum: int):
    """This rank's slices of a global batch ``[G, L+1]``: micro-step a takes rows ``(a*world + rank)*b ...``."""
    per_rank = batch.shape[0] // (grad_accum * dist.world_size)
    for a in range(grad_accum):
        start = (a * dist.world_size + dist.rank) * per_rank
        yield a, batch[start : start + per_rank].to(dist.device)


def gradient_sync(model, sync: bool, dist: Distributed):
    if sync or dist.world_size == 1:
        return contextlib.nullcontext()
    if dist.fsdp:
        model.set_requires_gradient_sync(False)
        return _restore_gradient_sync(model)
    return model.no_sync()


@contextlib.contextmanager
def _restore_gradient_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


_FULL_STATE = dict(full_state_dict=True, cpu_offload=True)


def gather_model_state(model, dist: Distributed) -> dict | None:
    """The full weights of an FSDP model on rank 0 (a collective: every rank calls it); None without FSDP."""
    if not dist.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model, dist)
    return get_model_state_dict(model, options=StateDictOptions(**_FULL_STATE))


def gather_optimizer_state(model, optimizer, dist: Distributed) -> dict:
    if not dist.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL_STATE))
