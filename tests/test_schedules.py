from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.schedules import (
    Constant,
    Cubic,
    Iterative,
    Linear,
    OneShot,
    StepMap,
    make_schedule,
)

finite = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
epochs = st.floats(min_value=0.0, max_value=50.0, allow_nan=False)


def test_cubic_matches_zhu_gupta_formula() -> None:
    s = Cubic(initial=0.1, final=0.9, start=2, end=12)
    for t in [2, 3.5, 7, 11.9]:
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 2) / 10) ** 3
        assert s(t) == pytest.approx(expected)
    assert s(0) == pytest.approx(0.1) and s(12) == pytest.approx(0.9) and s(100) == pytest.approx(0.9)


@pytest.mark.parametrize("name", ["cubic", "linear", "one_shot", "iterative"])
def test_named_endpoints(name: str) -> None:
    s = make_schedule(name, initial=0.0, final=0.8, start=1.0, end=5.0, steps=4)
    assert s(0.0) == 0.0
    assert s(0.999) == 0.0
    assert s(5.0) == pytest.approx(0.8)
    assert s(9.0) == pytest.approx(0.8)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["cubic", "linear", "one_shot", "iterative"]),
    a=finite,
    b=finite,
    start=epochs,
    length=st.floats(min_value=0.0, max_value=30.0),
    ts=st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=2, max_size=20),
    steps=st.integers(min_value=1, max_value=10),
)
def test_monotone_and_bounded(name, a, b, start, length, ts, steps) -> None:
    lo, hi = min(a, b), max(a, b)
    s = make_schedule(name, initial=lo, final=hi, start=start, end=start + length, steps=steps)
    values = [s(t) for t in sorted(ts)]
    assert all(lo - 1e-9 <= v <= hi + 1e-9 for v in values)
    assert all(x <= y + 1e-12 for x, y in zip(values, values[1:]))
    assert s(start + length + 1e-6) == pytest.approx(hi)


@settings(max_examples=40, deadline=None)
@given(start=epochs, length=st.floats(min_value=0.01, max_value=30.0))
def test_decreasing_schedules_are_monotone_too(start: float, length: float) -> None:
    s = Linear(initial=8, final=4, start=start, end=start + length)
    ts = [start + length * i / 10 for i in range(11)]
    vals = [s(t) for t in ts]
    assert vals[0] == 8 and vals[-1] == pytest.approx(4)
    assert all(x >= y for x, y in zip(vals, vals[1:]))


def test_iterative_has_k_equal_steps() -> None:
    s = Iterative(initial=0.0, final=0.9, start=0, end=4, steps=3)
    assert s.milestones() == [0.0, 2.0, 4.0]
    assert [round(s(t), 6) for t in (0, 1, 2, 3, 4)] == [0.3, 0.3, 0.6, 0.6, 0.9]


def test_step_map_and_fractional_epochs() -> None:
    s = make_schedule({0: 8, "2.5": 6, 5: 4})
    assert isinstance(s, StepMap)
    assert (s(0), s(2.49), s(2.5), s(4.99), s(5), s(80)) == (8, 8, 6, 6, 4, 4)
    assert s.milestones() == [0.0, 2.5, 5.0]


def test_constant_and_numbers() -> None:
    assert make_schedule(0.3)(17) == 0.3
    assert make_schedule("constant", final=2.0)(5) == 2.0
    assert Constant(4)(0) == 4


def test_one_shot_jumps_at_start() -> None:
    s = OneShot(0.0, 0.5, start=3)
    assert (s(2.99), s(3), s(10)) == (0.0, 0.5, 0.5)


def test_schedule_given_as_object_passes_through() -> None:
    s = Linear(0, 1, 0, 2)
    assert make_schedule(s) is s


def test_unknown_name_lists_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'.*cubic.*iterative.*linear.*one_shot"):
        make_schedule("cosine")


def test_end_before_start_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"end \(2.0\) precedes its start \(5.0\)"):
        make_schedule("linear", start=5.0, end=2.0)
    with pytest.raises(ValueError, match="precedes"):
        Cubic(0, 1, start=3, end=1)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({}, r"needs at least one entry"),
        ({"x": 1}, r"needs numeric keys and values, got \{'x': 1\}"),
        ({-1: 0.5}, r"schedule epochs must be finite and >= 0, got -1"),
        (True, r"cannot be a boolean, got True"),
        ([1, 2], r"cannot build a schedule from \[1, 2\] \(type list\); give a name from \['constant', 'cubic'"),
    ],
)
def test_bad_specs(bad, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_schedule(bad)


def test_validate_against_max_epochs() -> None:
    s = Cubic(0, 0.9, 0, 10)
    s.validate(max_epochs=10)
    with pytest.raises(ValueError, match="after the run's max_epochs=5"):
        s.validate(max_epochs=5)


def test_iterative_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="steps >= 1"):
        Iterative(steps=0)
    assert not math.isnan(Iterative(steps=1)(0.5))


@pytest.mark.parametrize(
    ("options", "said"),
    [({"start_epoch": 1.5, "end_epoch": 3}, "start_epoch=1.5 fall"), ({"start_epoch": 1, "end_epoch": 2.5}, "end_epoch=2.5 fall"),
     ({"start_epoch": 1, "end_epoch": 3, "rewind_epoch": 0.5}, "rewind_epoch=0.5 fall")],
)
def test_a_fractional_epoch_without_step_updates_is_said_for_each_setting(tmp_path, options: dict, said: str) -> None:
    """Only a fractional end was said: start_epoch=1.5 and rewind_epoch=0.5 took effect at the next epoch in silence."""
    from lightning.pytorch import Trainer

    from conftest import trainer_kwargs
    from lightning_compress import ClassifierModule, DigitsDataModule, PruningCallback
    from lightning_compress.models import MLP

    prune = PruningCallback(0.5, verbose=False, **options)
    trainer = Trainer(max_epochs=4, callbacks=[prune], **trainer_kwargs(tmp_path, limit_train_batches=2, limit_val_batches=1))
    with pytest.warns(UserWarning, match=rf"PruningCallback: .*{said} within epochs, but masks are updated .*set update_every_n_steps"):
        trainer.fit(ClassifierModule(MLP(64, (16,), 10)), DigitsDataModule())
