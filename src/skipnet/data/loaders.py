"""Loaders: :class:`TensorLoader` (decoded small images in memory, augmented batch-wise on tensors) and
:class:`FolderLoader` (large images through DataLoader workers and the standard ImageNet transforms, over a
:class:`SafeFolder` that steps over unreadable files). Both can be sharded across distributed ranks.

Two steps are public, each the one home of its job (``skipnet predict`` and the export graphs use them too):
:class:`Normalize` (``(x - mean) / std`` per channel) and :func:`eval_transform` (a large image's evaluation
transform: resize to S * 256 / 224, centre crop to S)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from skipnet.errors import SkipnetError

log = logging.getLogger(__name__)


class Normalize(torch.nn.Module):
    """``(x - mean) / std`` per channel, on float images in [0, 1], one (C, H, W) or a batch (B, C, H, W): the
    normalisation of every image skipnet feeds a network (the loaders' batches and transforms, ``skipnet predict``,
    and the export graphs, where ``mean`` and ``std`` are constants). ``stats`` ``None``: the identity.
    ``channels``: refuse (:class:`SkipnetError`) statistics of another number of channels."""

    def __init__(self, stats: tuple[Sequence[float], Sequence[float]] | None, channels: int | None = None) -> None:
        super().__init__()
        self.enabled = stats is not None
        mean, std = stats if stats is not None else ((0.0,) * (channels or 1), (1.0,) * (channels or 1))
        if channels is not None and (len(mean) != channels or len(std) != channels):
            raise SkipnetError(f"normalisation has {len(mean)} channels but the network takes {channels}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if x.dim() == 3:  # one image, as a transform gets it
            return (x - self.mean[0]) / self.std[0]
        return (x - self.mean) / self.std


class TensorLoader:
    """Batches from an in-memory uint8 image tensor (N, C, H, W), augmented on tensors.

    Yields ``(images, labels)`` with images float32, normalised, channels_last. Iteration order and
    augmentation are a function of ``(seed, epoch)`` only, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        *,
        train: bool = False,
        pad: int = 4,
        flip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.pad, self.flip = batch_size, train, pad, flip
        self.seed, self.epoch, self.rank, self.world = seed, 0, rank, world
        self._drop_last = drop_last
        self.norm = Normalize((mean, std))

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.labels)
        return n // self.world if self.train or self.world > 1 else n

    @property
    def drop_last(self) -> bool:
        """Training drops the last partial batch; evaluation (also of the train split) keeps it."""
        return self.train if self._drop_last is None else self._drop_last

    def __len__(self) -> int:
        n = self.num_samples
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        if batches == 0 and self.train:
            raise SkipnetError(
                f"training split has {n} images, fewer than one batch of {self.batch_size}; "
                "lower --batch-size or add images"
            )
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> Tensor:
        n = len(self.labels)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world > 1:  # equal shards: every rank runs the same number of steps
            per = n // self.world
            order = order[self.rank * per : (self.rank + 1) * per] if self.train else order[self.rank :: self.world]
        return order

    def normalize(self, x: Tensor) -> Tensor:
        """A uint8 batch as the network takes it: float in [0, 1], normalised."""
        return self.norm(x.float() / 255.0)

    def augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Padded random crop and horizontal flip, drawn per sample, on a uint8 batch."""
        b, _, h, w = x.shape
        if self.pad:
            p = self.pad
            xp = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
            rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, h, 1)
            cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, w)
            # (b, h, w, C) by advanced indexing, back to (b, C, h, w)
            x = xp.permute(0, 2, 3, 1)[torch.arange(b).view(b, 1, 1), rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
        return x

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank)
        n = len(order)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.train:
                x = self.augment(x, g)
            x = self.normalize(x).contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]


class KeyedSubset(torch.utils.data.Dataset):
    """``dataset[indices[i]]`` read for the key ``(epoch, i)`` (:class:`EpochKeys`), with torch's random stream
    seeded by ``(seed, epoch, i)`` around the read: an image's random crop and flip are the same whichever worker
    reads it and whenever (a run resumed inside an epoch replays the same ones), and reading leaves the reading
    process's own stream alone (with no workers, the training step's)."""

    def __init__(self, dataset, indices: list[int], seed: int) -> None:
        self.dataset, self.indices, self.seed = dataset, list(indices), int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + i) % (2**63))
            return self.dataset[self.indices[i]]


class EpochKeys(torch.utils.data.Sampler):
    """``(epoch, index)`` keys of a :class:`KeyedSubset`: the order of ``sampler`` when given (a
    ``DistributedSampler``, told the epoch), else all ``n`` indices, shuffled (training) by a generator seeded anew
    from ``(seed, epoch)`` at each pass: the same order for an epoch however the run got to it (a resumed run too)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, sampler=None) -> None:
        self.n, self.shuffle, self.seed, self.sampler, self.epoch = n, shuffle, seed, sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) if self.sampler is not None else self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.sampler is not None:
            order = list(self.sampler)
        elif self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = range(self.n)
        return ((self.epoch, int(i)) for i in order)


def usable_workers(requested: int) -> int:
    """``requested`` DataLoader workers, at most one per CPU this process may run on: more only contend for the
    same cores (each loader keeps its own persistent workers), and PyTorch warns of them. The images and their
    crops do not depend on the count (:class:`KeyedSubset`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    if requested > cpus:
        log.info("--workers %d: %d CPU%s here, so %d", requested, cpus, "" if cpus == 1 else "s", cpus)
        return cpus
    return requested


class FolderLoader:
    """DataLoader over an ImageFolder of large images (a :class:`KeyedSubset` of a :class:`SafeFolder`) with the
    standard ImageNet transforms. The rows of unreadable images are dropped: such an image is skipped, never
    counted."""

    MAX_UNREADABLE = 50  # a pass whose first this many images are all unreadable is refused

    def __init__(
        self, dataset: KeyedSubset, batch_size: int, *, train: bool, workers: int, seed: int, rank: int, world: int
    ):
        from torch.utils.data import DataLoader, DistributedSampler

        self.dataset, self.train, self.seed, self.epoch = dataset, train, seed, 0
        self.evaluation: FolderLoader | None = None  # of a training split: the same images, evaluated in order
        self.dropped: list[int] = []  # an evaluation pass's unreadable images: their positions in the split, in order
        self.sampler = None
        if world > 1:
            self.sampler = DistributedSampler(dataset, world, rank, shuffle=train, seed=seed, drop_last=train)
        # Its own generator, though no image depends on it (KeyedSubset): without one, each pass would draw the
        # workers' base seed from the process's random stream, which the training step's sampling then continues.
        gen = torch.Generator().manual_seed(seed)
        self.keys = EpochKeys(len(dataset), shuffle=train, seed=seed, sampler=self.sampler)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.keys,
            num_workers=workers,
            drop_last=train,
            persistent_workers=workers > 0,
            generator=gen,
        )

    @property
    def num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.keys.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        batches = self._readable()
        if self.train:  # exactly len(self) batches a pass: the training loop counts its steps by them
            batches = self._steps(batches)
        for x, y in batches:
            if len(y):  # a batch of unreadable images only: skipped
                yield x.contiguous(memory_format=torch.channels_last), y

    def _folder(self) -> SafeFolder | None:
        dataset = getattr(self.dataset, "dataset", None)
        return dataset if isinstance(dataset, SafeFolder) else None

    def _where(self, marker: int) -> str:
        """Under which folder, and which file, a marked row's image is."""
        folder = self._folder()
        return f"under {folder.folder.root} (e.g. {folder.path(marker)})" if folder else f"(e.g. image {-1 - marker})"

    def _readable(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The DataLoader's batches without the rows of unreadable images (:class:`SafeFolder`'s markers), some
        maybe empty; a pass whose first images (up to ``MAX_UNREADABLE``) are all unreadable is refused."""
        seen = readable = 0
        if not self.train:
            self.dropped = []
        for x, y in self.loader:
            keep = y >= 0
            if not self.train and not bool(keep.all()):  # in order: the rows' positions in the split
                self.dropped += [seen + int(j) for j in torch.nonzero(~keep).flatten()]
            seen, readable = seen + len(y), readable + int(keep.sum())
            if not readable and seen >= min(self.num_samples, self.MAX_UNREADABLE):
                raise SkipnetError(
                    f"{seen} consecutive images {self._where(int(y[0]))} could not be decoded; they are corrupt or "
                    "truncated: replace them"
                )
            yield (x, y) if bool(keep.all()) else (x[keep], y[keep])

    def _steps(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
        """Training batches, as many as the DataLoader's: a batch left with no readable image is made up for by
        splitting the readable batch before it (or, at the start, after it) in two or more; no image is dropped or
        repeated. A pass with fewer readable images than batches is refused (the training loop, which counts its
        steps by the batches, would never finish its epoch)."""
        owed, held = 0, None  # the last readable batch is held until the next one shows whether to split it

        def split(batch: tuple[Tensor, Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
            nonlocal owed
            parts = min(owed + 1, len(batch[1]))
            owed -= parts - 1
            return zip(batch[0].tensor_split(parts), batch[1].tensor_split(parts))

        for x, y in batches:
            if not len(y):
                owed += 1
                continue
            if held is not None:
                yield from split(held)
            held = (x, y)
        if held is not None:
            yield from split(held)
        if owed:
            where = f" under {self._folder().folder.root}" if self._folder() else ""
            raise SkipnetError(
                f"{owed} training batch(es) of an epoch{where} held no readable image and no later batch could make "
                "up for them; replace or remove the unreadable images the warnings name"
            )


class ImageList(torch.utils.data.Dataset):
    """``(image, label)`` of the listed ``samples`` (path, label): the image read by ``loader`` (PIL RGB), then
    ``transform`` when given. It raises what the loader raises on an unreadable file (:class:`SafeFolder` marks
    those). ``root``, ``classes`` and ``targets`` as torchvision's ImageFolder has them."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classes: list[str], transform, loader) -> None:
        self.root, self.samples, self.transform, self.loader = str(root), samples, transform, loader
        self.imgs, self.targets = samples, [t for _, t in samples]
        self.classes, self.class_to_idx = list(classes), {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        return (image if self.transform is None else self.transform(image)), target


class SafeFolder(torch.utils.data.Dataset):
    """An :class:`ImageList` whose unreadable images come back marked, with a warning (once per file): a zero image
    and the label ``-1 - index`` (negative), which :class:`FolderLoader` drops. A corrupt image is skipped, never
    replaced by another one (which an evaluation would count twice)."""

    def __init__(self, folder: ImageList) -> None:
        self.folder = folder
        self.classes = folder.classes
        self.bad: set[str] = set()
        self._blank: Tensor | None = None

    def __len__(self) -> int:
        return len(self.folder)

    def blank(self):
        """The zero image of a marked row: the transform's output shape (``None`` without a transform)."""
        if self.folder.transform is None:
            return None
        if self._blank is None:
            from PIL import Image

            with torch.random.fork_rng(devices=[]):  # a random crop's draw must not move anyone's stream
                self._blank = torch.zeros_like(self.folder.transform(Image.new("RGB", (256, 256))))
        return self._blank

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            return self.folder[index]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            path = self.folder.samples[index][0]
            if path not in self.bad:
                self.bad.add(path)
                log.warning("skipping unreadable image %s (%s)", path, type(exc).__name__)
            return self.blank(), -1 - index

    def path(self, marker: int) -> str:
        """The file of a marked row's label."""
        return self.folder.samples[-1 - marker][0]


def image_folder(
    split_dir: Path, transform, classes: list[str], listing: tuple[list[Path], list[int], list[str]] | None = None
) -> SafeFolder:
    """The images of ``split_dir`` as :func:`~skipnet.data.folders.list_folder` lists them (``listing``, when the
    caller has it), their labels indexing the training split's ``classes``, read by
    :func:`~skipnet.data.decode.pil_loader`: the same images as a small-image split of that folder would hold."""
    from skipnet.data.decode import pil_loader
    from skipnet.data.folders import list_folder

    files, labels, _ = listing if listing is not None else list_folder(split_dir, list(classes))
    samples = [(str(f), int(t)) for f, t in zip(files, labels)]
    return SafeFolder(ImageList(split_dir, samples, classes, transform, pil_loader))


def folder_transforms(size: int, train: bool, mean, std):
    """The transform of a large-image folder's images (PIL RGB) at ``size``: training's random resized crop and
    flip, or :func:`eval_transform`; normalised with ``mean`` and ``std``."""
    from torchvision import transforms as T

    if not train:
        return eval_transform(size, (mean, std))
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), Normalize((mean, std))])


def eval_transform(size: int, stats: tuple[Sequence[float], Sequence[float]] | None = None):
    """Evaluation's transform of a large image (PIL RGB): its short side resized to S * 256 / 224, centre-cropped
    to S x S, float32 (C, S, S) in [0, 1]; then normalised with ``stats`` (mean, std) when given (``skipnet
    predict`` leaves that to the model)."""
    from torchvision import transforms as T

    steps = [T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), T.ToTensor()]
    return T.Compose(steps if stats is None else [*steps, Normalize(stats)])
