"""Notes the library's functions give inside a fit are said once, by rank 0: under DDP each rank runs them."""

from __future__ import annotations

import warnings

import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from lightning_compress.pruning.masks import select_parameters
from lightning_compress.quantization import QuantSettings, convert_fake_quant, prepare_fake_quant

NOTES = ("which the teacher holds too", "in float", "never observed an input range")


def _notes() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head = nn.Linear(2, 2)  # a weight the student shares with its teacher
        pair = nn.ModuleDict({"student": nn.Sequential(nn.Linear(2, 2), head), "teacher": nn.Sequential(head)})
        select_parameters(pair)
        net = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4))  # a layer type left in float
        prepare_fake_quant(net, QuantSettings(activation_bits=8))
        convert_fake_quant(net)  # no input range observed
    return [str(w.message) for w in caught if any(note in str(w.message) for note in NOTES)]


def test_notes_are_said_by_rank_zero_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared-with-teacher note, the float-layers note and the unobserved-ranges note were plain warnings:
    every DDP rank repeated them."""
    said = _notes()
    assert all(any(note in s for s in said) for note in NOTES), said
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert _notes() == []
