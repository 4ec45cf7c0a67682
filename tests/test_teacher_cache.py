"""The teacher-output cache: content keys, shuffled loaders, dict batches, augmentation, resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import trainer_kwargs
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_compress import DigitsDataModule
from lightning_compress.distillation import DistillationModule, IndexedDataset, TeacherCache
from lightning_compress.distillation.cache import input_keys
from lightning_compress.models import MLP, LeNet5


pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


def make_module(cache: bool) -> DistillationModule:
    seed_everything(0)
    return DistillationModule(MLP(64, (16,), 10), LeNet5(image_size=8), temperature=4.0, alpha=0.7, cache_teacher_outputs=cache)


def make_trainer(tmp_path: Path, epochs: int, **kwargs: Any) -> Trainer:
    return Trainer(max_epochs=epochs, **trainer_kwargs(tmp_path, **{"limit_val_batches": 0, **kwargs}))


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    return dm


class _Dicts(Dataset):
    """Samples as ``{"image": x, "label": y}`` dicts, no index."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"image": x, "label": y}


class _Augmented(Dataset):
    """Random noise on every access (global RNG, so two runs with one seed see the same noise)."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base[i]
        return x + 0.1 * torch.randn_like(x), y


def shuffled(dataset: Dataset, batch_size: int = 128) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1))


def fit_weights(tmp_path: Path, dataset: Dataset, cache: bool, epochs: int = 3, batch_size: int = 128) -> tuple[dict, DistillationModule]:
    module = make_module(cache)
    make_trainer(tmp_path, epochs).fit(module, shuffled(dataset, batch_size))
    return module.student_state_dict(), module


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------------
# a shuffled DataLoader without indices: hits from the second epoch, same training as without the cache
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batches", ["tuples", "dicts", "indexed"])
def test_shuffled_loader_hits_and_trains_like_no_cache(tmp_path: Path, digits: DigitsDataModule, batches: str) -> None:
    assert digits.train_set is not None
    n = len(digits.train_set)
    wrap = {"tuples": lambda d: d, "dicts": _Dicts, "indexed": IndexedDataset}[batches]
    cached, module = fit_weights(tmp_path, wrap(digits.train_set), cache=True)
    plain, _ = fit_weights(tmp_path, wrap(digits.train_set), cache=False)
    cache = module.teacher_cache
    assert cache.enabled and len(cache) == n  # every training image stored once
    assert cache.misses == n and cache.hits == 2 * n  # epoch 1 fills, epochs 2 and 3 only hit
    assert_same_weights(cached, plain)
    assert module.compression_summary()["teacher_cache"] == {"entries": n, "hits": 2 * n, "misses": n, "on": True}


def test_cached_logits_are_the_teachers(digits: DigitsDataModule) -> None:
    """Hits, misses and mixed batches give what the teacher gives, in the teacher's dtype."""
    assert digits.train_set is not None
    x = digits.train_set.tensors[0][:96]
    teacher = LeNet5(image_size=8).eval().to(torch.float64)
    cache = TeacherCache()
    run = lambda t: teacher(t)  # noqa: E731
    with torch.no_grad():
        expected = teacher(x.double())
        first = cache(x[:64].double(), run)  # all misses
        mixed = cache(x[32:].double(), run)  # 32 hits, 32 misses, in one call of the teacher
        again = cache(x.double().flip(0), run)  # all hits, another order
    assert first.dtype == torch.float64 and cache.hits == 32 + 96 and cache.misses == 64 + 32
    torch.testing.assert_close(first, expected[:64])
    torch.testing.assert_close(mixed, expected[32:])
    torch.testing.assert_close(again, expected.flip(0))


def test_an_input_twice_in_a_batch_takes_one_row() -> None:
    torch.manual_seed(0)
    x, more = torch.randn(6, 3), torch.randn(2, 3)
    cache = TeacherCache()
    double = lambda t: 2 * t  # noqa: E731
    cache(torch.cat([x[:2], x[:2], x[2:]]), double)
    assert len(cache) == 6 and cache.misses == 8
    out = cache(torch.cat([more, x.flip(0)]), double)  # new rows must not overwrite the stored ones
    torch.testing.assert_close(out, 2 * torch.cat([more, x.flip(0)]))
    torch.testing.assert_close(cache(x, double), 2 * x)
    assert len(cache) == 8 and cache.hits == 6 + 6


# --------------------------------------------------------------------------------------------------
# random augmentation: detected, the cache stops, training goes on with the right targets
# --------------------------------------------------------------------------------------------------
def test_random_augmentation_switches_the_cache_off(tmp_path: Path, digits: DigitsDataModule) -> None:
    assert digits.train_set is not None
    n = len(digits.train_set)
    with pytest.warns(UserWarning, match=r"0\.0% of the training inputs.*random augmentation.*switched off"):
        cached, module = fit_weights(tmp_path, _Augmented(digits.train_set), cache=True, batch_size=64)
    plain, _ = fit_weights(tmp_path, _Augmented(digits.train_set), cache=False, batch_size=64)
    cache = module.teacher_cache
    assert not cache.enabled and len(cache) == 0  # entries freed
    assert cache.hits == 0 and cache.misses == n + 8 * 64  # judged after 8 batches of the second epoch
    assert_same_weights(cached, plain)  # the teacher ran on every (new) input: same training as without a cache


@pytest.mark.parametrize(
    ("world", "epochs", "rate", "off"),
    [
        (1, 1, 0.02, True),  # augmented: nothing repeats
        (1, 1, 0.5, False),  # a flip with p=0.5: half the inputs repeat, worth keeping
        (4, 1, 0.2, False),  # DDP, shuffled DistributedSampler: each rank saw a quarter before
        (4, 1, 0.01, True),
        (4, 3, 0.05, True),  # expected 1 - 0.75**3 = 58% by the fourth epoch
    ],
)
def test_check_repeats_expects_the_ranks_share(world: int, epochs: int, rate: float, off: bool) -> None:
    cache = TeacherCache()
    cache.fill_epochs, cache.first_epoch_lookups = epochs, 1000
    cache.epoch_lookups, cache.epoch_hits = 1000, int(rate * 1000)
    summed = lambda c: [v * world for v in c]  # noqa: E731 - every rank counted the same
    reason = cache.check_repeats(summed, dataset_size=1000 * world, world_size=world)
    assert (reason is not None) is off and cache.enabled is not off and cache.judged


def test_check_repeats_waits_for_enough_lookups() -> None:
    cache = TeacherCache()
    cache.fill_epochs, cache.first_epoch_lookups, cache.epoch_lookups = 1, 1000, 20
    assert cache.check_repeats(lambda c: c, dataset_size=1000) is None and cache.enabled and not cache.judged
    assert [b for b in range(100) if cache.due(b)] == [7, 15, 31, 63]


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.uint8, torch.int64])
def test_inputs_differing_in_one_element_get_distinct_keys(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = (torch.rand(64) * 100).to(dtype)
    bits = 8 * base.element_size()
    variants = []
    for j in range(base.numel()):  # every single-bit change of every element: a single word differs by 2^k
        for b in range(bits):
            v = base.clone()
            word = v.view(torch.uint8)[j * base.element_size() + b // 8 : j * base.element_size() + b // 8 + 1]
            word ^= 1 << (b % 8)
            variants.append(v)
    x = torch.stack([base, *variants])
    keys = {tuple(k) for k in input_keys(x).tolist()}
    assert len(keys) == len(x)


def test_keys_are_content_only() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 3, 5, 5)
    k = input_keys(x)
    assert len({tuple(r) for r in k.tolist()}) == 512
    torch.manual_seed(123)  # no dependence on the global RNG, the batch or the memory layout
    assert torch.equal(input_keys(x[100:200]), k[100:200])
    assert torch.equal(input_keys(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)), k)
    assert torch.equal(input_keys(x.flip(0)), k.flip(0))
    z = torch.zeros(2, 4)
    z[1, 0] = -0.0
    assert not torch.equal(input_keys(z)[0], input_keys(z)[1])  # 0.0 and -0.0 are different inputs


# --------------------------------------------------------------------------------------------------
# resume: the cache is not saved; fit(ckpt_path=...) refills it and trains as without interruption
# --------------------------------------------------------------------------------------------------
def test_resume_refills_the_cache(tmp_path: Path, digits: DigitsDataModule) -> None:
    assert digits.train_set is not None
    n = len(digits.train_set)
    dm = DigitsDataModule(batch_size=64)  # shuffled by (seed, epoch): a resumed run sees the same batches
    straight = make_module(cache=True)
    make_trainer(tmp_path / "a", 4).fit(straight, dm)

    first = make_module(cache=True)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    make_trainer(tmp_path / "b", 2, callbacks=[ckpt_cb], enable_checkpointing=True).fit(first, dm)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not any("cache" in k for k in [*saved, *saved["state_dict"]])
    resumed = make_module(cache=True)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    make_trainer(tmp_path / "b", 4, callbacks=[ckpt_cb], enable_checkpointing=True).fit(
        resumed, dm, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )

    assert resumed.teacher_cache.misses == n and resumed.teacher_cache.hits == n  # epoch 3 refills, epoch 4 hits
    assert_same_weights(resumed.student_state_dict(), straight.student_state_dict())


# --------------------------------------------------------------------------------------------------
# DDP: each rank caches what it sees; the hit-rate check reduces counts over the ranks without hanging
# --------------------------------------------------------------------------------------------------
DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader
    from lightning_compress import DigitsDataModule
    from lightning_compress.distillation import DistillationModule
    from lightning_compress.models import MLP, LeNet5

    out = sys.argv[1]
    seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    module = DistillationModule(MLP(64, (16,), 10), LeNet5(image_size=8), cache_teacher_outputs=True)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=False, process_group_backend="gloo"),
        max_epochs=3, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=out + ".root",
    )
    trainer.fit(module, DataLoader(dm.train_set, batch_size=32, shuffle=True))
    cache = module.teacher_cache
    x = dm.train_set.tensors[0]
    stored = [t for t in cache.tables.values()][0]
    keys = [tuple(k) for k in __import__("lightning_compress.distillation.cache", fromlist=["x"]).input_keys(x).tolist()]
    with torch.no_grad():
        want = module.teacher(x)
    rows = [(i, stored.rows[k]) for i, k in enumerate(keys) if k in stored.rows]
    exact = all(torch.equal(stored.store[r], want[i]) or torch.allclose(stored.store[r], want[i], atol=1e-6) for i, r in rows)
    flat = torch.cat([p.detach().flatten() for p in module.student.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    result = {"hits": cache.hits, "misses": cache.misses, "entries": len(cache), "on": cache.enabled,
              "exact": exact, "in_sync": bool(torch.equal(gathered[0], gathered[1])), "n": len(x)}
    with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
@pytest.mark.slow  # 10 s of two processes; test_ddp_more's teacher-cache test covers DDP by default: run with -m slow
def test_ddp_each_rank_caches_its_samples(tmp_path: Path) -> None:
    script = tmp_path / "ddp_cache.py"
    script.write_text(DDP_SCRIPT)
    out = str(tmp_path / "res")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), out], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        assert r["on"] and r["exact"] and r["in_sync"], r
        assert r["entries"] == r["misses"] < r["n"]  # each rank stores only the samples it saw
        assert r["hits"] > 0 and r["hits"] + r["misses"] == 3 * (r["n"] + 1) // 2, r



@pytest.mark.parametrize("plugin", ["quantize_teacher", "prune_teacher"])
def test_a_plugin_changing_the_cached_teacher_is_refused_before_training(tmp_path: Path, digits: DigitsDataModule, plugin: str) -> None:
    """A quantised (or pruned) teacher's outputs change, and the cache served each sample's first ones every epoch
    after; under DDP only the ranks missing the cache ran the teacher, whose observers' all-reduce then met the other
    ranks' gradient all-reduce (gloo: 'Received data size doesn't match expected size')."""
    from lightning_compress import PruningCallback, QuantizeCallback

    def callback() -> Any:
        if plugin == "quantize_teacher":
            return QuantizeCallback(quantize_teacher=True, convert_on_fit_end=False, latency="none")
        return PruningCallback(0.5, include=["teacher"], verbose=False)

    module = make_module(cache=True)
    before = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
    with pytest.raises(ValueError, match=r"changes the teacher's .*, but cache_teacher_outputs=True serves each sample's"):
        make_trainer(tmp_path, 1, callbacks=[callback()]).fit(module, digits)
    assert module.global_step == 0 and all(torch.equal(p, before[n]) for n, p in module.teacher.named_parameters())
    assert not any(hasattr(m, "quantizer") for m in module.modules())
    # without the cache, the same plugin changes the teacher as asked
    module = make_module(cache=False)
    make_trainer(tmp_path, 1, callbacks=[callback()], limit_train_batches=2).fit(module, digits)
    if plugin == "quantize_teacher":
        assert any(hasattr(m, "quantizer") for m in module.teacher.modules())
    else:
        assert any(not torch.equal(p, before[n]) for n, p in module.teacher.named_parameters())
