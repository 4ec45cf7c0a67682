"""Distillation losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_compress.distillation import (
    AttentionTransferLoss,
    CosineDistillLoss,
    HintLoss,
    KLDivDistillLoss,
    MSEDistillLoss,
    TokenCrossEntropy,
    attention_map,
    attention_transfer_loss,
    cosine_distill,
    hint_loss,
    kl_div_distill,
    mse_distill,
    resolve_distill_loss,
)


def _manual_kl(s: list[list[float]], t: list[list[float]], temp: float) -> float:
    """Pure-Python KL(p_t || p_s) at temperature ``temp``, times temp², averaged over rows."""
    total = 0.0
    for zs, zt in zip(s, t):
        es = [math.exp(v / temp) for v in zs]
        et = [math.exp(v / temp) for v in zt]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    return temp**2 * total / len(s)


S = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
TT = [[2.0, 0.0, 1.0], [-1.0, 1.0, 4.0]]


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 20.0])
def test_kl_matches_hand_computation_with_t_squared(temp: float) -> None:
    got = float(kl_div_distill(torch.tensor(S), torch.tensor(TT), temperature=temp))
    assert got == pytest.approx(_manual_kl(S, TT, temp), rel=1e-4)
    # also equal to torch's batchmean KL times T²
    ref = F.kl_div(F.log_softmax(torch.tensor(S) / temp, -1), F.softmax(torch.tensor(TT) / temp, -1), reduction="batchmean")
    assert got == pytest.approx(float(ref) * temp**2, rel=1e-4)


def test_kl_of_a_masked_vocabulary_entry_is_finite() -> None:
    """A teacher logit of -inf (a masked vocabulary entry) made the loss NaN (0 * log 0 computed as 0 * -inf), whether
    or not the student masked it too; the entry adds nothing to the divergence."""
    t = torch.tensor([[2.0, 1.0, float("-inf"), 0.5]])
    for masked_in_student in (False, True):
        s = torch.tensor([[1.0, 1.5, 0.3, 0.2]])
        if masked_in_student:
            s[0, 2] = float("-inf")
        s.requires_grad_()
        p_t = torch.softmax(t.double() / 2.0, -1)
        log_ps = torch.log_softmax(s.detach().double() / 2.0, -1)
        keep = p_t > 0
        ref = 4.0 * (p_t[keep] * (p_t[keep].log() - log_ps[keep])).sum()
        got = kl_div_distill(s, t, temperature=2.0)
        assert float(got) == pytest.approx(float(ref), rel=1e-5)
        got.backward()
        assert torch.isfinite(s.grad).all()


def test_reductions_over_batch() -> None:
    s, t = torch.tensor(S), torch.tensor(TT)
    per_row = kl_div_distill(s, t, 2.0, reduction="none")
    assert per_row.shape == (2,)
    assert float(kl_div_distill(s, t, 2.0, reduction="sum")) == pytest.approx(float(per_row.sum()))
    assert float(kl_div_distill(s, t, 2.0)) == pytest.approx(float(per_row.mean()))
    assert float(per_row[0]) == pytest.approx(_manual_kl(S[:1], TT[:1], 2.0), rel=1e-5)


def test_mask_excludes_padded_positions() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)  # (N, L, C) sequence logits
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    for fn in (kl_div_distill, mse_distill, cosine_distill):
        got = fn(s, t, 3.0, mask=mask)
        ref = fn(s[mask], t[mask], 3.0)  # only the valid positions, flattened
        assert float(got) == pytest.approx(float(ref), rel=1e-5), fn.__name__
        # padding values do not matter
        s2 = s.clone()
        s2[~mask] = 1e4
        assert float(fn(s2, t, 3.0, mask=mask)) == pytest.approx(float(got), rel=1e-5)


def test_mse_and_cosine_by_hand() -> None:
    s, t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    assert float(mse_distill(s, t)) == pytest.approx(((1 + 0) / 2 + (0 + 16) / 2) / 2)
    cos = [(1 * 0 + 2 * 2) / (math.sqrt(5) * 2), (9 + 0) / (5 * 3)]
    assert float(cosine_distill(s, t)) == pytest.approx(sum(1 - c for c in cos) / 2, rel=1e-6)
    assert float(mse_distill(s, t, temperature=10.0)) == float(mse_distill(s, t))  # T ignored


def test_modules_match_functions() -> None:
    s, t = torch.tensor(S), torch.tensor(TT)
    assert float(KLDivDistillLoss(4.0)(s, t)) == pytest.approx(float(kl_div_distill(s, t, 4.0)))
    assert float(KLDivDistillLoss(4.0)(s, t, temperature=2.0)) == pytest.approx(float(kl_div_distill(s, t, 2.0)))
    assert float(MSEDistillLoss()(s, t)) == pytest.approx(float(mse_distill(s, t)))
    assert float(CosineDistillLoss()(s, t)) == pytest.approx(float(cosine_distill(s, t)))
    assert float(HintLoss()(s, t)) == pytest.approx(float(F.mse_loss(s, t)))
    f1, f2 = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 4, 4)
    assert float(AttentionTransferLoss()(f1, f2)) == pytest.approx(float(attention_transfer_loss(f1, f2)))


def test_attention_transfer_by_hand() -> None:
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one channel, 2x2
    ft = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[1.0, 1.0], [1.0, 1.0]]]]).reshape(1, 2, 2, 2)
    a_s = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a_t = torch.full((4,), 0.5)
    assert torch.allclose(attention_map(fs)[0], a_s)
    assert torch.allclose(attention_map(ft)[0], a_t)
    assert float(attention_transfer_loss(fs, ft)) == pytest.approx(float((a_s - a_t).norm()), rel=1e-6)
    # spatial sizes differ: the student's map is resized first, no error
    assert attention_transfer_loss(torch.rand(2, 3, 4, 4), torch.rand(2, 6, 2, 2)).shape == ()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"student \(2, 3\) and teacher \(2, 4\)"):
        kl_div_distill(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kl_div_distill(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        KLDivDistillLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        mse_distill(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features"):
        hint_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        attention_transfer_loss(torch.zeros(2, 3), torch.zeros(2, 3, 1, 1))
    # an infinite temperature gave NaN, p <= 0 a meaningless map, a string a bare TypeError
    for make in (lambda: KLDivDistillLoss(temperature=float("inf")), lambda: KLDivDistillLoss(temperature=True),
                 lambda: kl_div_distill(torch.zeros(2, 3), torch.zeros(2, 3), temperature=float("inf")),
                 lambda: KLDivDistillLoss(temperature="2"),
                 lambda: kl_div_distill(torch.zeros(2, 3), torch.zeros(2, 3), temperature=torch.tensor(0.0)),
                 lambda: KLDivDistillLoss(temperature=torch.tensor(-1.0))):
        with pytest.raises(ValueError, match=r"temperature must be > 0 and finite \(a number\), got"):
            make()
    for fine in (torch.tensor(2.0), torch.tensor(4)):  # tensors T > 0, an integer one too
        assert float(kl_div_distill(torch.zeros(2, 3), torch.ones(2, 3), temperature=fine)) == 0.0
    with pytest.raises(ValueError, match=r"temperature must be > 0 and finite, got tensor"):
        kl_div_distill(torch.zeros(2, 3), torch.zeros(2, 3), temperature=torch.tensor([2.0, 0.0]))
    for p in (0, -1, float("nan")):
        with pytest.raises(ValueError, match=rf"p must be > 0 and finite \(a number\), got {p!r}"):
            AttentionTransferLoss(p=p)
    with pytest.raises(ValueError, match=r"ignore_index must be an integer .* got '-100'"):
        TokenCrossEntropy(ignore_index="-100")


def _two_arg_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (student - teacher).abs().mean()


def _temp_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    return (student - teacher).abs().mean() * temperature


def test_resolve_distill_loss() -> None:
    s, t = torch.zeros(2, 3), torch.ones(2, 3)
    for name in ("kl", "mse", "cosine", "KL"):
        fn, label = resolve_distill_loss(name)
        assert label == name.lower()
    fn, label = resolve_distill_loss(_two_arg_loss)
    assert float(fn(s, t, temperature=5.0)) == 1.0
    fn, _ = resolve_distill_loss(_temp_loss)
    assert float(fn(s, t, temperature=5.0)) == 5.0
    fn, label = resolve_distill_loss("lightning_compress.distillation.MSEDistillLoss")  # class path: instantiated
    assert label.endswith("MSEDistillLoss") and float(fn(s, t, temperature=3.0)) == 1.0
    fn, _ = resolve_distill_loss(f"{__name__}._two_arg_loss")
    assert float(fn(s, t, temperature=3.0)) == 1.0
    with pytest.raises(ValueError, match=r"valid names: \['cosine', 'kl', 'mse'\]"):
        resolve_distill_loss("kld")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_distill_loss("no_such_package.loss")


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=3, max_size=3),
    st.lists(st.floats(-5, 5), min_size=3, max_size=3),
    st.floats(0.5, 30.0),
)
def test_kl_nonnegative_and_zero_on_equal(s: list[float], t: list[float], temp: float) -> None:
    st_, tt = torch.tensor([s]), torch.tensor([t])
    # float32 rounding of the log-probabilities (about 1e-7 each), scaled by T^2 like the loss
    assert float(kl_div_distill(st_, tt, temp)) >= -1e-6 * temp**2
    assert abs(float(kl_div_distill(tt, tt, temp))) < 1e-4
