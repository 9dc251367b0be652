"""The processes of a collection: one, or one of several started by torchrun (one Accelerator
each), with the barrier, sum and broadcast that the run needs (no-ops for one process).
"""

from __future__ import annotations

import os

import torch


class Processes:
    """One process, or one of several started by torchrun (an Accelerator, gloo on CPU)."""

    def __init__(self, device: str):
        self.accelerator = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=device == "cpu")
        self.rank = self.accelerator.process_index if self.accelerator else 0
        self.world = self.accelerator.num_processes if self.accelerator else 1
        self.main = self.rank == 0

    @property
    def device(self) -> str | None:
        return str(self.accelerator.device) if self.accelerator else None

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.accelerator:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.accelerator:
            return tensor
        from accelerate.utils import broadcast

        return broadcast(tensor.contiguous(), from_process=0)

    def close(self) -> None:
        if self.accelerator:
            self.accelerator.end_training()  # destroys the process group
