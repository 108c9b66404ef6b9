"""Collectives across DDP ranks with their results on the CPU, for the few places that need every rank's values
(the confusion matrix of a split, the hard-example losses, the validation/test probabilities).

Every collective here follows the project's DDP rule (see ``CrackClassifier.on_train_epoch_end``): call it only where
every rank is at the same point with the same collectives behind it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["gather_to_cpu", "reduce_to_cpu"]


def gather_to_cpu(strategy: Any, *tensors: Any) -> tuple[Any, ...]:
    """Each tensor gathered from every rank (rank order), flattened, on the CPU.

    ``strategy`` is the trainer's (``trainer.strategy``). The tensors travel on its root device: NCCL gathers only
    tensors on the GPU (gloo on CPU: the CPU), and after ``trainer.validate``/``trainer.test`` a module and what it
    kept are back on the CPU. Every rank must pass tensors of the same shape (pad shorter shards first)."""
    device = strategy.root_device
    return tuple(strategy.all_gather(tensor.to(device)).reshape(-1).cpu() for tensor in tensors)


def reduce_to_cpu(strategy: Any, tensor: Any, reduce_op: str = "sum") -> Any:
    """``tensor`` reduced over the ranks (``sum``, ``mean``, ``max``, ``min``), on the CPU; computed on the strategy's
    root device for the same reason as :func:`gather_to_cpu`."""
    return strategy.reduce(tensor.to(strategy.root_device), reduce_op=reduce_op).cpu()
