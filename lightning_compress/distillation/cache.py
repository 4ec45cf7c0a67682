r"""The teacher-output cache: teacher logits kept on the CPU, found again from the content of each input.

A training input is recognised by a 128-bit key computed from its bytes on its own device (two
hashes, so only two ``int64`` per sample reach the host). A plain dict on the CPU maps the key to a
row of a logits store. No sample index is needed, so any ``DataLoader`` works, shuffled or not, with
tuple, tensor or dict batches, and under DDP each rank keeps the samples it sees.

Keys. A sample's bytes are read as 16-bit words :math:`v_1 \dots v_M` (8-bit for one-byte dtypes)
and hashed twice, :math:`h(v) = \sum_j w_j v_j \bmod 2^{64}`, with two vectors of ``int64`` weights
drawn once from a fixed seed. For two different inputs of the same shape and dtype, some word
differs by :math:`d = 2^k u` with :math:`u` odd and :math:`k \le 15`, and :math:`w d \bmod 2^{64}`
is uniform over :math:`2^{64-k}` values, so one hash collides with probability at most
:math:`2^{-49}` and the pair at most :math:`2^{-98}`. A fit with :math:`L` lookups against
:math:`S` stored inputs collides with probability at most :math:`L S\,2^{-98}` (ImageNet, 100 epochs:
about :math:`2^{-51}`). That bound is why no second check is made on a hit; it does not hold for
inputs crafted by someone who knows the seed.

Augmentation. Random augmentation gives new inputs every epoch, which simply miss: the teacher runs
and the result is right. The cache then only costs memory, so :meth:`TeacherCache.check_repeats`
compares the hit rate of a later epoch with the rate data that repeats would give, and switches the
cache off (entries freed) when it is near zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["IndexedDataset", "TeacherCache", "input_keys"]

_SEED = 0x5EED_CAC4E  # fixed: an input has the same key in every run and on every rank
_BLOCK = 1 << 16  # weights are drawn in blocks, so a longer input extends the weights of a shorter one
_CHUNK = 1 << 22  # words hashed at a time (bounds the int64 temporaries to 32 MiB)
_weights: dict[torch.device, Tensor] = {}


def _hash_weights(num_words: int, device: torch.device) -> Tensor:
    """``(2, >= num_words)`` int64 weights, the same on every device and in every run."""
    have = _weights.get(device)
    if have is None or have.shape[1] < num_words:
        blocks = []
        for b in range(-(-max(num_words, 1) // _BLOCK)):
            gen = torch.Generator().manual_seed(_SEED + b)  # private generators: the global RNG is untouched
            blocks.append(torch.randint(-(2**63), 2**63 - 1, (2, _BLOCK), dtype=torch.int64, generator=gen))
        _weights[device] = have = torch.cat(blocks, 1).to(device)
    return have


def _words(x: Tensor) -> Tensor:
    """Each sample's bytes as ``(N, M)`` int64 words of at most 16 bits (a view where possible)."""
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(x.shape[0], -1)
    flat = flat.contiguous()
    if flat.element_size() == 1:
        return flat.view(torch.uint8)
    return flat.view(torch.int16)


def input_keys(x: Tensor) -> Tensor:
    """Two 64-bit hashes of every sample of ``x`` (first dimension = samples), computed on ``x``'s device.

    Equal inputs (bit for bit) give equal keys; different inputs of the same shape and dtype collide
    with probability at most :math:`2^{-98}` (see the module docstring). ``0.0`` and ``-0.0`` differ.

    Example:
        >>> x = torch.zeros(3, 4)
        >>> x[1, 2] = 1.0
        >>> k = input_keys(x)
        >>> k.shape, k.dtype, bool((k[0] == k[2]).all()), bool((k[0] == k[1]).all())
        (torch.Size([3, 2]), torch.int64, True, False)
    """
    words = _words(x)
    n, m = words.shape
    w = _hash_weights(m, words.device)
    keys = torch.zeros(n, 2, dtype=torch.int64, device=words.device)
    step = max(1, _CHUNK // max(n, 1))
    for start in range(0, m, step):
        end = min(start + step, m)
        part = words[:, start:end].to(torch.int64)
        for i in range(2):  # int64 products and sums wrap around: arithmetic modulo 2**64
            keys[:, i] += (part * w[i, start:end]).sum(1)
    return keys


class _Table:
    """Logits of one input signature: a key -> row dict and a ``(rows, *logit_shape)`` CPU store."""

    def __init__(self, logits: Tensor) -> None:
        self.rows: dict[tuple[int, int], int] = {}
        self.store = torch.empty(1024, *logits.shape[1:], dtype=logits.dtype)

    def add(self, keys: list[tuple[int, int]], logits: Tensor) -> None:
        if logits.shape[1:] != self.store.shape[1:] or logits.dtype != self.store.dtype:
            raise RuntimeError(
                f"teacher cache: the teacher returned {tuple(logits.shape[1:])} {logits.dtype} per sample for inputs "
                f"that gave {tuple(self.store.shape[1:])} {self.store.dtype} before; its outputs must not change "
                "during a fit (set cache_teacher_outputs=False)"
            )
        new = [i for i, k in enumerate(keys) if k not in self.rows]
        if not new:
            return
        used = len(self.rows)
        if used + len(new) > self.store.shape[0]:
            grown = torch.empty(max(2 * self.store.shape[0], used + len(new)), *self.store.shape[1:], dtype=self.store.dtype)
            grown[:used] = self.store[:used]
            self.store = grown
        rows = [self.rows.setdefault(keys[i], len(self.rows)) for i in new]  # an input twice in a batch: one row
        self.store[rows] = logits[new]


class TeacherCache:
    """Teacher logits of training inputs, on the CPU in the teacher's output dtype, keyed by content.

    Call it with a batch of inputs and the teacher: the inputs seen before get their stored logits
    back (moved to the inputs' device), the others go through the teacher in one call and are
    stored. Counts ``hits`` and ``misses`` in samples. Entries live for one fit: the module empties
    the cache when training starts, and it is never written to checkpoints (a resumed run refills it).

    Correct for any data, only worth its memory when inputs repeat between epochs; see
    :meth:`check_repeats` for the switch-off under random augmentation.

    Example:
        >>> cache = TeacherCache()
        >>> teacher = torch.nn.Linear(4, 2)
        >>> x = torch.randn(8, 4)
        >>> with torch.no_grad():
        ...     a = cache(x, teacher)  # all misses: the teacher runs
        ...     b = cache(x.flip(0), teacher)  # the same samples, shuffled: all hits
        >>> torch.equal(b, a.flip(0)), cache.hits, cache.misses, len(cache)
        (True, 8, 8, 8)
    """

    def __init__(self) -> None:
        self.reset()

    def __len__(self) -> int:
        return sum(len(t.rows) for t in self.tables.values())

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles start empty (the entries are a per-fit memo, not state)."""
        return vars(TeacherCache())

    def reset(self) -> None:
        """Forget every entry and count, and switch the cache back on (a new fit)."""
        self.tables: dict[tuple[Any, ...], _Table] = {}
        self.enabled = True
        self.hits = self.misses = 0
        self.epoch_hits = self.epoch_lookups = 0
        self.first_epoch_lookups = self.fill_epochs = 0
        self.judged = False

    def __call__(self, x: Tensor, teacher: Callable[[Tensor], Tensor]) -> Tensor:
        """The teacher's outputs for ``x``: stored rows for inputs seen before, ``teacher(misses)`` for the rest."""
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError(f"teacher cache: inputs must be a batched tensor, got {type(x).__name__}")
        if not self.enabled:
            return teacher(x)
        keys = [(int(a), int(b)) for a, b in input_keys(x).cpu().tolist()]
        table = self.tables.get((tuple(x.shape[1:]), x.dtype))
        found = [table.rows.get(k) for k in keys] if table is not None else [None] * len(keys)
        miss = [i for i, row in enumerate(found) if row is None]
        n_hit = len(keys) - len(miss)
        self.hits += n_hit
        self.misses += len(miss)
        self.epoch_hits += n_hit
        self.epoch_lookups += len(keys)
        if not miss:
            assert table is not None
            return table.store[torch.tensor(found)].to(x.device)
        fresh = teacher(x if n_hit == 0 else x[torch.tensor(miss, device=x.device)])
        if table is None:
            table = self.tables.setdefault((tuple(x.shape[1:]), x.dtype), _Table(fresh))
        table.add([keys[i] for i in miss], fresh.detach().cpu())
        if n_hit == 0:
            return fresh
        out = torch.empty((len(keys), *fresh.shape[1:]), dtype=fresh.dtype, device=fresh.device)
        hit = [i for i, row in enumerate(found) if row is not None]
        out[torch.tensor(hit, device=out.device)] = table.store[torch.tensor([found[i] for i in hit])].to(out.device)
        out[torch.tensor(miss, device=out.device)] = fresh
        return out

    def end_epoch(self) -> None:
        """Close a training epoch: it counts as a filling epoch for the expected hit rate."""
        if self.enabled:
            if self.fill_epochs == 0:
                self.first_epoch_lookups = self.epoch_lookups
            self.fill_epochs += 1
        self.epoch_hits = self.epoch_lookups = 0
        self.judged = False

    def due(self, batch_idx: int | None = None) -> bool:
        """Whether to judge the hit rate now: after 8, 16, 32... batches of a later epoch, or at its end (``None``)."""
        if not self.enabled or self.judged or self.fill_epochs == 0:
            return False
        return batch_idx is None or (batch_idx + 1 >= 8 and (batch_idx + 1) & batch_idx == 0)

    def check_repeats(
        self, total: Callable[[Sequence[int]], Sequence[int]], dataset_size: int | None, world_size: int = 1
    ) -> str | None:
        """Switch the cache off when the inputs do not repeat; return the reason then, else ``None``.

        ``total`` sums counts over the processes (identity on one). With :math:`f` the share of the
        dataset one process saw in the first epoch (``1 / world_size`` when the size is unknown) and
        :math:`e` the epochs filled so far, inputs that repeat are found again at a rate of at least
        :math:`1 - (1 - f)^e` (a shuffled ``DistributedSampler`` gives each rank a new share every
        epoch). Below a tenth of that rate, with at least 32 hits expected, the inputs are taken to
        change between epochs. Every process must call it at the same point (it reduces counts).

        Example:
            >>> cache = TeacherCache()
            >>> cache.fill_epochs, cache.first_epoch_lookups, cache.epoch_lookups = 1, 1000, 500
            >>> print(cache.check_repeats(lambda c: c, dataset_size=1000))  # doctest: +ELLIPSIS
            cache_teacher_outputs: 0.0% of the training inputs of this epoch were seen in earlier epochs...
            >>> cache.enabled
            False
        """
        hits, lookups, first = (int(v) for v in total([self.epoch_hits, self.epoch_lookups, self.first_epoch_lookups]))
        share = first / (world_size * dataset_size) if dataset_size else 1.0 / world_size
        expected = 1.0 - (1.0 - min(max(share, 0.0), 1.0)) ** self.fill_epochs
        if expected * lookups < 32:
            return None  # too few lookups to tell yet
        self.judged = True
        rate = hits / lookups
        if rate >= 0.1 * expected:
            return None
        entries = len(self)
        self.tables.clear()
        self.enabled = False
        return (
            f"cache_teacher_outputs: {rate:.1%} of the training inputs of this epoch were seen in earlier epochs, where "
            f"inputs that repeat would give at least {expected:.0%}. The inputs change between epochs, most likely "
            f"random augmentation. The cache is switched off for the rest of this fit and its {entries} entries freed; "
            "the teacher runs on every batch, so training stays correct. Set cache_teacher_outputs=False to skip "
            "the first epoch's storing."
        )


    def check_fit(self, trainer: Any, device: torch.device) -> None:
        """:meth:`check_repeats` in a Lightning fit: counts summed over the ranks, the training dataset's
        size, a warning (rank 0) when the cache switches itself off."""

        def total(counts: Sequence[int]) -> list[int]:
            return trainer.strategy.reduce(torch.tensor(list(counts), device=device), reduce_op="sum").tolist()

        try:
            size: int | None = len(trainer.train_dataloader.dataset)
        except (AttributeError, TypeError):  # no single map-style dataset (an iterable one, several loaders)
            size = None
        reason = self.check_repeats(total, size, trainer.world_size)
        if reason:
            rank_zero_warn(reason)


class IndexedDataset(Dataset):
    """Wrap a dataset so each sample carries its index: ``{"x": x, "y": y, "index": i}``.

    The teacher cache does not need the index any more (it recognises inputs by content); the
    wrapper stays for code that wants indices in its batches. Samples that are tuples ``(x, y)`` or
    ``(x,)`` (unlabeled) or single tensors are understood.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.arange(4.0), torch.arange(4)))
        >>> ds[2]
        {'x': tensor(2.), 'y': tensor(2), 'index': 2}
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            out = {"x": item[0]}
            if len(item) > 1:
                out["y"] = item[1]
        else:
            out = {"x": item}
        out["index"] = index
        return out
