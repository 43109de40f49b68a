"""The exp-based functions composed for x86 CPUs against torch (what NeMo computes with), over the whole
float32 range, and masked attention scores weighing exactly zero."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

from canary_convert.model.cpu.activations import _composed_exp, _composed_softmax, attention, sigmoid, silu, slow_cpu

# Every float32 exponent from e**-88 to e**88, densely, and the half-integers of x / ln 2 where rounding ties.
VALUES = np.concatenate([np.linspace(-88, 88, 400_001), (np.arange(-254, 254) + 0.5) * math.log(2) / 2]).astype(np.float32)


def test_composed_exp_is_float32_exact_up_to_its_input_rounding() -> None:
    got = np.array(mx.compile(_composed_exp)(mx.array(VALUES)))
    want = np.exp(VALUES.astype(np.float64))
    normal = VALUES > -87.0
    # x / ln 2 is rounded to float32 first: a relative error up to |x| * 2**-24 in the result, < 6e-6 here.
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 6e-6
    # Near the smallest normal float32 a value is either right or flushed to 0.
    tail, exact = got[~normal], want[~normal]
    assert np.all((tail == 0.0) | (np.abs(tail - exact) / exact < 6e-6))
    assert np.array_equal(np.array(mx.compile(_composed_exp)(mx.array([-88.0, -1e4, -1e30]))), [0.0, 0.0, 0.0])


@pytest.mark.parametrize(("ours", "theirs"), [(sigmoid, torch.sigmoid), (silu, torch.nn.functional.silu)])
def test_sigmoid_and_silu_match_torch(ours, theirs) -> None:
    got = np.array(ours(mx.array(VALUES)))
    want = theirs(torch.from_numpy(VALUES).double()).numpy()
    np.testing.assert_allclose(got, want, rtol=6e-6, atol=1e-37)


def test_softmax_matches_torch_and_masked_scores_weigh_zero() -> None:
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((4, 3, 5, 40)) * 20).astype(np.float32)
    scores[..., 30:] = -10000.0  # NeMo's fill for masked keys
    got = np.array(_composed_softmax(mx.array(scores)))
    want = torch.softmax(torch.from_numpy(scores).double(), dim=-1).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.all(got[..., 30:] == 0.0)


def test_attention_matches_torch_with_a_mask() -> None:
    assert slow_cpu()  # the composed path is the one under test on this machine
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 4, 6, 16)).astype(np.float32) for _ in range(3))
    mask = np.where(np.arange(6) < 4, 0.0, -10000.0).astype(np.float32)
    got = np.array(attention(mx.array(q), mx.array(k), mx.array(v), 0.25, mx.array(mask)))
    tq, tk, tv = (torch.from_numpy(a).double() for a in (q, k, v))
    want = torch.softmax(tq @ tk.transpose(-1, -2) * 0.25 + torch.from_numpy(mask).double(), dim=-1) @ tv
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
