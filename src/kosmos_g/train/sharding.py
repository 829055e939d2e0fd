"""Fully sharded data parallelism (torch's FSDP2, ``fully_shard``) for the trainer, on CPU and GPU alike.

accelerate sets FSDP up only on accelerators (on CPU, ``accelerate launch --use_fsdp`` leaves every
process unwrapped and alone, and ``cpu=True`` falls back to DDP), so the trainer shards the stage's
module itself when the recipe asks for it (``train.sharding: fsdp``), through one code path for
gloo and NCCL process groups:

- every block of a ``nn.ModuleList`` that holds trained weights becomes its own FSDP unit (its
  parameters are gathered for its forward and freed after), then the stage's module as a whole.
  Every process must gather the units in the same order, so the vision tower stays in the whole
  module's unit: a batch without images runs it at another point of the forward (after the LM,
  to keep its weights in the graph) than a batch with images;
- only the module is sharded: the frozen U-Net, VAE and CLIP text encoder are not submodules of it,
  so they stay whole on every process, in their own precision, and never reach the optimizer;
- with ``train.precision=bf16`` parameters are gathered in bfloat16 and gradients reduced in
  float32 (the sharded master weights stay float32);
- checkpoints are written with ``torch.distributed.checkpoint``: each process writes its own shard
  of the weights and of the optimizer state, and reads it back on resume;
- the export gathers every weight (:func:`gather_full_state`) into a plain copy of the model
  (:func:`meta_twin`), which is then saved as any ``from_pretrained`` folder.

Example:
    >>> from kosmos_g.train import load_recipe, Trainer  # doctest: +SKIP
    >>> Trainer(load_recipe("tiny-stage1", ["train.sharding=fsdp"]), "stage1").run()  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDED_DIR = "sharded"


def shard_module(module: nn.Module, *, device_type: str, precision: str | None,
                 whole: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Apply ``fully_shard`` to the trained blocks of ``module`` and to ``module`` itself (in place).

    Needs an initialised process group; ``precision`` is the run's ``train.precision``; the blocks
    under ``whole`` (modules that run at a data-dependent point of the forward) stay in the unit
    of ``module`` itself.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise ValueError("train.sharding=fsdp does not support train.precision=fp16 (it needs a sharded "
                         "gradient scaler); use train.precision=bf16 or no.")
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    skip = {id(m) for w in whole for m in w.modules()}
    for blocks in [m for m in module.modules() if isinstance(m, nn.ModuleList) and id(m) not in skip]:
        for block in blocks:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a sharded ``DTensor``."""
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients of (sharded) ``params`` to a total norm of ``max_norm``; returns the norm
    before clipping, summed over every process's shard."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if is_sharded(norm):
        norm = norm.full_tensor()
    return float(norm)


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters are on the meta device (no memory), made before sharding so
    that the export can fill it with the gathered weights. Buffers (never sharded, small) are copied."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def gather_full_state(model: nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    """Every weight of ``model`` in full, on the CPU. Every process must call it (sharded weights are
    all-gathered one by one); only those with ``keep`` hold the result, the others get ``{}``."""
    out = {}
    for name, t in model.state_dict().items():
        if is_sharded(t):
            t = t.full_tensor()
        if keep:
            out[name] = t.detach().cpu().clone()
    return out


def fill_twin(twin: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load the gathered ``state`` into the :func:`meta_twin` ``twin`` (strict) and re-tie shared weights."""
    wanted = set(twin.state_dict())
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or extra:
        raise ValueError(f"Gathered weights do not fit the model (missing {missing[:5]}, extra {extra[:5]}).")
    twin.load_state_dict(state, assign=True)
    if hasattr(twin, "tie_weights"):
        twin.tie_weights()
    return twin


def save_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shard of the weights and optimizer state to ``folder/sharded``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / SHARDED_DIR))


def load_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process reads its shard back from ``folder/sharded`` (written by :func:`save_sharded`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = folder / SHARDED_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint {folder} has no {SHARDED_DIR}/ folder: it was not written with "
                                "train.sharding=fsdp; resume it without sharding.")
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
