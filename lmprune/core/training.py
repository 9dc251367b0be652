"""The training loop's parts that finetune, induce and relearn share: documents packed into
blocks, a seeded block order that makes the data position the step count, AdamW and its
schedule, one Accelerator per process, an optimizer step that holds a mask (and can distil a
teacher's next-token distribution), and atomic resumable checkpoints (weights, optimizer,
scheduler, per-process RNG)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmprune.core.errors import LmpruneError
from lmprune.core.masks import PruneMask

# --------------------------------------------------------------------------------------------
# Data


def pack_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate the documents (EOS between them) and cut into blocks [n_blocks, seq_len]."""
    return pack_documents(tokenizer, texts, seq_len)[0]


def pack_documents(tokenizer, texts: list[str], seq_len: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_blocks`, plus the index of the document each token came from [n_blocks, seq_len]
    (a document's closing EOS counts as its own)."""
    ids: list[int] = []
    owner: list[int] = []
    eos = tokenizer.eos_token_id
    for k, doc in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        doc = doc + ([eos] if eos is not None else [])
        ids.extend(doc)
        owner.extend([k] * len(doc))
    num_blocks = len(ids) // seq_len
    if num_blocks == 0:
        raise LmpruneError(f"the training corpus has {len(ids)} tokens, fewer than one block of "
                           f"--seq-len {seq_len}: use more data or a shorter --seq-len")
    keep = num_blocks * seq_len
    return (torch.tensor(ids[:keep], dtype=torch.long).view(num_blocks, seq_len),
            torch.tensor(owner[:keep], dtype=torch.long).view(num_blocks, seq_len))


class BlockOrder:
    """An endless stream of block indices: a fresh seeded permutation for every epoch."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks = num_blocks
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_blocks, generator=gen)
        return self._perms[epoch]

    def take(self, start: int, count: int) -> torch.Tensor:
        """Block indices at stream positions start .. start + count - 1."""
        return torch.stack([self._perm(i // self.num_blocks)[i % self.num_blocks]
                            for i in range(start, start + count)])


# --------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (biases and norm weights are 1-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps)


# --------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointStore:
    """`OUT/checkpoints/step-XXXXXXXX/`: weights, optimizer, scheduler, per-process RNG, state.

    Every process writes its RNG state into a temporary folder; the main process adds the rest
    and renames the folder into place, so a checkpoint folder is either complete or absent.
    """

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir) / "checkpoints"

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("step-*")) if self.root.is_dir() else []
        return found[-1] if found else None

    def save(self, step: int, accelerator, model: nn.Module, optimizer, scheduler,
             state: dict) -> Path:
        from safetensors.torch import save_model

        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        main = accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        if main:
            save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
            blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            if accelerator.scaler is not None:
                blob["scaler"] = accelerator.scaler.state_dict()
            torch.save(blob, tmp / "training.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
        accelerator.wait_for_everyone()
        if main:
            os.replace(tmp, final)
            for old in self.root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(path: Path, accelerator, model: nn.Module, optimizer, scheduler) -> dict:
        """Restore into the unprepared model and optimizer; returns the saved state."""
        from safetensors.torch import load_model

        device = accelerator.device
        load_model(model, str(path / "model.safetensors"), device=str(device))
        blob = torch.load(path / "training.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if "scaler" in blob and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(blob["scaler"])
        rng_file = path / f"rng-{accelerator.process_index}.pt"
        _set_rng_state(torch.load(rng_file, weights_only=True))
        return json.loads((path / "state.json").read_text())

    def resume(self, accelerator, model: nn.Module, optimizer, scheduler,
               fingerprint: dict) -> dict | None:
        """Load the latest checkpoint when there is one (None otherwise), refusing one that a
        run with another fingerprint (settings, data, process count) wrote."""
        latest = self.latest()
        if latest is None:
            return None
        state = self.load(latest, accelerator, model, optimizer, scheduler)
        if state["fingerprint"] != fingerprint:
            raise LmpruneError(f"{self.root} holds checkpoints of a different run (settings, "
                               f"data or process count differ): use another --out or delete it")
        if accelerator.is_main_process:
            print(f"resuming from {latest} (step {state['step']})")
        return state


def fresh_unless_resumed(run):
    """A runner's step for a training stage: a killed run with the same stage key resumes from
    its checkpoints; with other settings it starts over."""

    def step(config, resume: bool):
        if not resume:
            shutil.rmtree(CheckpointStore(config.out).root, ignore_errors=True)
        return run(config)

    return step


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Accelerate


def start_accelerator(device: str, seed: int, mixed_precision: str = "no"):
    """One Accelerator per process (CPU, or one device each), seeded per process: dropout
    differs between processes, reproducibly."""
    from accelerate import Accelerator

    from lmprune.core.models import resolve_device

    accelerator = Accelerator(cpu=resolve_device(device) == "cpu",
                              mixed_precision=mixed_precision)
    torch.manual_seed(seed + accelerator.process_index)
    return accelerator


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, averaged over every position:
    both [batch, pos, vocab]."""
    log_q = F.log_softmax(logits.float().flatten(0, 1), dim=-1)  # [batch * pos, vocab]
    log_p = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


@dataclass
class Distillation:
    """A frozen teacher the model is trained towards: loss = weight x KL(teacher || model) +
    (1 - weight) x the corpus's next-token cross-entropy."""

    teacher: nn.Module
    weight: float

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=batch, labels=batch if self.weight < 1 else None, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
        kl = distillation_loss(out.logits, teacher_logits)
        return kl if self.weight == 1 else self.weight * kl + (1 - self.weight) * out.loss


def train_step(accelerator, model: nn.Module, optimizer, scheduler,
               micro_batches: list[torch.Tensor], mask: PruneMask | None,
               max_grad_norm: float, distill: Distillation | None = None) -> float:
    """One optimizer step over micro-batches [batch, seq_len]; returns the sum of their losses
    (the corpus's cross-entropy, or with `distill` its blend with the KL to the teacher).

    Masked gradients keep AdamW's moments of pruned weights at zero; re-zeroing after the step
    undoes whatever weight decay or stale momentum would still write into them.
    """
    unwrapped = accelerator.unwrap_model(model)
    total = 0.0
    for k, batch in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss \
                if distill is None else distill.loss(model, batch)
            accelerator.backward(loss / len(micro_batches))
        total += loss.item()
    if mask is not None:
        mask.mask_gradients(unwrapped)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if mask is not None:
        mask.apply(unwrapped)
    return total
