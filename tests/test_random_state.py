"""The library's own batch runs (finding an input, calibration, BatchNorm re-estimation, scoring) leave the fit's data
and random draws as they would be without it: the loader's own generator, a persistent-workers loader's iterator, the
user's train_dataloader() and a model that samples in eval mode."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from conftest import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_compress import CompressionReport, PruningCallback

_G = torch.Generator().manual_seed(0)
X, Y = torch.randn(256, 16, generator=_G), torch.randint(0, 4, (256,), generator=_G)


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
        self.steps: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if torch.is_grad_enabled():  # the training steps, not the library's batch runs
            self.steps[self.current_epoch] = self.steps.get(self.current_epoch, 0) + 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks: list, data: Any, epochs: int = 2) -> _Net:
    L.seed_everything(0, verbose=False)
    module = _Net()
    L.Trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs(tmp_path, num_sanity_val_steps=0)).fit(module, data())
    return module


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _report(tmp_path) -> CompressionReport:
    return CompressionReport(print_table=False, plot=False, repeats=2, warmup=0, dirpath=str(tmp_path / "report"))


def test_a_loaders_own_generator_is_left_where_the_fit_left_it(tmp_path) -> None:
    """DataLoader(shuffle=True, generator=g), the documented way to a reproducible order: the report's batch read in
    setup advanced g, and every epoch trained on another order."""
    loader = lambda: DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert _same(_fit(tmp_path, [], loader), _fit(tmp_path, [_report(tmp_path)], loader))


def test_a_persistent_workers_loader_keeps_its_iterator(tmp_path) -> None:
    """persistent_workers=True: the loader hands out one iterator, the fit loop's; wanda's batch run at epoch 0 read it
    empty (epoch 0 trained on no batch), and the report's batch read in setup shifted the workers' seeds."""
    loader = lambda: DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True, num_workers=1, persistent_workers=True)
    plain = _fit(tmp_path, [], loader)
    wanda = _fit(tmp_path, [PruningCallback(0.5, schedule="one_shot", start_epoch=0, criterion="wanda", verbose=False)], loader)
    assert wanda.steps == plain.steps == {0: 8, 1: 8}
    assert _same(plain, _fit(tmp_path, [_report(tmp_path)], loader))


def test_a_train_dataloader_that_draws_and_a_model_that_samples_leave_the_fit_alone(tmp_path) -> None:
    """A train_dataloader() drawing a random subset was called once more outside the guard; a model sampling in eval
    mode (a VAE's reparameterisation) was run once more, outside it too, to try it without its labels."""

    class Subsets(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(Subset(TensorDataset(X, Y), torch.randperm(len(X))[:200].tolist()), batch_size=32, shuffle=True)

    assert _same(_fit(tmp_path, [], Subsets), _fit(tmp_path, [_report(tmp_path)], Subsets))

    class Sampling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.cls = nn.Linear(16, 8), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            mu, logvar = self.enc(x).chunk(2, dim=-1)
            out = self.cls(mu + torch.randn_like(mu) * (0.5 * logvar).exp())
            return out if labels is None else nn.functional.cross_entropy(out, labels)

    class WithLabels(_Net):
        def __init__(self) -> None:
            super().__init__()
            self.model = Sampling()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.model(batch[0], labels=batch[1])

    def fit(callbacks: list) -> nn.Module:
        L.seed_everything(0, verbose=False)
        module = WithLabels()
        L.Trainer(max_epochs=1, callbacks=callbacks, **trainer_kwargs(tmp_path)).fit(module, DataLoader(TensorDataset(X, Y), batch_size=32))
        return module

    assert _same(fit([]), fit([_report(tmp_path)]))


def test_a_batch_samplers_own_generator_is_left_where_the_fit_left_it(tmp_path) -> None:
    """A bucketing batch sampler drawing from a generator of its own (not its sampler's) was advanced too."""

    class Buckets(torch.utils.data.Sampler):
        def __init__(self, n: int, size: int) -> None:
            self.n, self.size, self.generator = n, size, torch.Generator().manual_seed(1)

        def __iter__(self):
            order = torch.randperm(self.n, generator=self.generator).tolist()
            return iter([order[i : i + self.size] for i in range(0, self.n, self.size)])

        def __len__(self) -> int:
            return self.n // self.size

    loader = lambda: DataLoader(TensorDataset(X, Y), batch_sampler=Buckets(len(X), 32))
    assert _same(_fit(tmp_path, [], loader), _fit(tmp_path, [_report(tmp_path)], loader))
