"""Sparse24Weight: round trips, padding of in_features that are not a multiple of 4, state dicts
of plain tensors, device/dtype moves, and clear errors for malformed input."""

from __future__ import annotations

import logging

import pytest
import torch

from pysparse import Sparse24Weight
from pysparse.kernels import ops


def test_round_trip_and_linear_match_dense():
    w = ops.prune24(torch.randn(9, 40))
    sw = Sparse24Weight.from_dense(w)
    assert sw.shape == (9, 40) and sw.layout == "pysparse24"
    assert torch.equal(sw.to_dense(), w)
    x = torch.randn(3, 40)
    b = torch.randn(9)
    torch.testing.assert_close(
        sw.linear(x, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5
    )
    assert sw.nbytes() == 9 * 20 * 4 + 9 * 5


def test_pads_in_features_with_a_warning(caplog):
    w = ops.prune24(torch.nn.functional.pad(torch.randn(5, 10), (0, 2)))[:, :10].contiguous()
    with caplog.at_level(logging.WARNING, logger="pysparse.kernels.formats"):
        sw = Sparse24Weight.from_dense(w)
    assert "not a multiple of 4" in caplog.text
    assert sw.in_features == 10 and sw.padded_in_features == 12
    assert torch.equal(sw.to_dense(), w)
    x = torch.randn(2, 10)
    torch.testing.assert_close(sw.linear(x), x @ w.T, rtol=1e-5, atol=1e-5)


def test_prune_option_and_refusal_without_it():
    w = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="nonzeros"):
        Sparse24Weight.from_dense(w)
    sw = Sparse24Weight.from_dense(w, prune=True)
    assert torch.equal(sw.to_dense(), ops.prune24(w))


def test_state_dict_round_trip_and_to():
    sw = Sparse24Weight.from_dense(ops.prune24(torch.randn(6, 16)))
    state = sw.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    back = Sparse24Weight.from_state_dict(state)
    assert torch.equal(back.to_dense(), sw.to_dense())
    bf = sw.to(dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.meta.dtype == torch.uint8
    assert torch.equal(bf.to_dense(), sw.to_dense().to(torch.bfloat16))
    assert "Sparse24Weight(shape=(6, 16)" in repr(sw)


def test_from_state_dict_errors_name_the_problem():
    sw = Sparse24Weight.from_dense(ops.prune24(torch.randn(6, 16)))
    state = sw.state_dict()
    with pytest.raises(KeyError, match="meta"):
        Sparse24Weight.from_state_dict({k: v for k, v in state.items() if k != "meta"})
    with pytest.raises(ValueError, match="meta must be uint8"):
        Sparse24Weight.from_state_dict({**state, "meta": state["meta"].int()})
    with pytest.raises(ValueError, match="does not fit"):
        Sparse24Weight.from_state_dict({**state, "in_features": torch.tensor(3)})
    with pytest.raises(ValueError, match="2-D"):
        Sparse24Weight.from_dense(torch.zeros(8))
