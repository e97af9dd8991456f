"""Batches for training and evaluation, as uint8 N x C x H x W tensors plus labels.

In-memory data (MNIST-sized) is indexed a batch at a time on the training device, no
DataLoader. Files stream through a DataLoader whose workers decode with the one safe decoder;
an unreadable file is skipped, counted and reported, never fatal.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..contract import Preprocess, fit_arrays, load_input
from ..data.datasets import Split
from ..errors import UnreadableImage
from .distributed import SINGLE, World, eval_indices, shard_batches, steps_per_epoch, train_sampler


def ignore_stop_signals(_: int = 0) -> None:
    """In a DataLoader worker: SIGTERM and SIGINT are the main process's to handle. A signal
    sent to the whole process group (`timeout`, `kill -- -PGID`, systemd, Ctrl-C in a
    terminal) killed the workers too, and the run died of "DataLoader worker is killed by
    signal" instead of saving the best model so far; the main process ends them itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class FileImages(TorchDataset):
    """(uint8 C x H x W tensor, label), or (None, label, path, reason) for a bad file."""

    def __init__(self, paths: list[str], labels: np.ndarray, contract: Preprocess):
        self.paths, self.labels, self.contract = paths, labels, contract

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            pixels = load_input(self.paths[i], self.contract, invert="no")
            return torch.from_numpy(pixels), int(self.labels[i]), None
        except UnreadableImage as e:
            return None, int(self.labels[i]), (self.paths[i], e.message)


def _collate(items):
    good = [(x, y) for x, y, bad in items if bad is None]
    skipped = [bad for _, _, bad in items if bad is not None]
    if good:
        x = torch.stack([g[0] for g in good])
        y = torch.tensor([g[1] for g in good], dtype=torch.long)
    else:
        x, y = None, None
    return x, y, skipped


class Batches:
    """An iterable of (x uint8, y, skipped) batches over one split. Under torchrun (`world`)
    each process gets its own shard: of each global batch for training (shuffle), of the
    split for validation."""

    def __init__(self, split: Split, contract: Preprocess, batch_size: int, shuffle: bool,
                 device: torch.device, seed: int = 0, workers: int | None = None,
                 world: World = SINGLE):
        self.split, self.batch_size, self.shuffle, self.device = split, batch_size, shuffle, device
        self.world, self.epoch = world, 0
        self.generator = torch.Generator().manual_seed(seed)
        self.in_memory = split.images is not None
        if self.in_memory:
            images = fit_arrays(split.images, contract)
            self.x = torch.from_numpy(images).to(device)
            self.y = torch.from_numpy(split.labels).to(device)
        else:
            if workers is None:
                workers = min(4, os.cpu_count() or 1) if len(split) >= 64 else 0
            files = FileImages(split.paths, split.labels, contract)
            self.sampler = None
            if world.active:
                self.sampler = (train_sampler(files, world, shuffle, seed) if shuffle
                                else eval_indices(len(files), world))
            self.loader = DataLoader(
                files, batch_size=batch_size, shuffle=shuffle and self.sampler is None,
                sampler=self.sampler, num_workers=workers, collate_fn=_collate,
                generator=self.generator, persistent_workers=workers > 0,
                pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                worker_init_fn=ignore_stop_signals if workers else None,
            )

    def state_dict(self) -> dict:
        """Where the shuffling stands (a checkpoint's): a resumed run draws the next epoch's
        order, not the first epoch's again."""
        return {"generator": self.generator.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        if not self.in_memory and self.loader.persistent_workers:
            # the workers' iterator draws its seed from the generator when it is made: made
            # now, as the first epoch made it, so the next epochs draw the saved orders
            iter(self.loader)  # (kept by the loader, as persistent workers are)
        self.generator.set_state(state["generator"].cpu())
        self.epoch = int(state["epoch"])

    def __len__(self) -> int:
        if self.world.active:
            if self.in_memory and self.shuffle:
                return steps_per_epoch(len(self.split), self.batch_size, self.world)
            return len(self.loader) if not self.in_memory else \
                -(-len(eval_indices(len(self.split), self.world)) // self.batch_size)
        return (len(self.split) + self.batch_size - 1) // self.batch_size

    @property
    def padding(self) -> int:
        """Images repeated at the end of this process's share of a training split so every
        rank runs the same steps (DistributedSampler's padding, shard_batches'): the last
        rows of its last batch, which the split's figures must not count twice."""
        if not (self.world.active and self.shuffle):
            return 0
        n, size = len(self.split), self.world.size
        return -(-n // size) - len(range(self.world.rank, n, size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
        self.epoch += 1
        if self.in_memory:
            n = len(self.y)
            order = (torch.randperm(n, generator=self.generator).to(self.device)
                     if self.shuffle else torch.arange(n, device=self.device))
            if self.world.active:
                yield from self._shards(order)
                return
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield self.x[idx], self.y[idx], []
            return
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        for x, y, skipped in self.loader:
            if x is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            yield x, y, skipped

    def _shards(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
        """This process's in-memory batches: its part of each global batch (training), or
        every world-th image (validation)."""
        if not self.shuffle:
            order = order[self.world.rank :: self.world.size]
            parts = (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
        else:
            parts = shard_batches(order, self.batch_size, self.world)
        for idx in parts:
            yield self.x[idx], self.y[idx], []
