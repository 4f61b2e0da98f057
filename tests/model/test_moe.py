"""Gated MoE: top-k gates, residual output, balance statistics, sparse and dense dispatch agree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnc_ad.losses import moe_balance_loss
from cnc_ad.model.moe import GatedMoE


@settings(max_examples=25, deadline=None)
@given(
    experts=st.integers(2, 6),
    data=st.data(),
    tokens=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_gates_sum_to_one_over_exactly_k_experts(experts, data, tokens, seed):
    k = data.draw(st.integers(1, experts))
    torch.manual_seed(seed)
    moe = GatedMoE(8, num_experts=experts, top_k=k, expert_ratio=2.0)
    out = moe(torch.randn(2, tokens, 8))
    assert out.gates.shape == (2, tokens, experts)
    assert torch.all((out.gates > 0).sum(-1) == k)
    assert torch.allclose(out.gates.sum(-1), torch.ones(2, tokens))
    assert torch.allclose(out.importance, out.gates.sum((0, 1)))
    assert torch.allclose(out.load.sum(), torch.tensor(1.0))


def test_gates_are_softmax_of_the_top_k_router_logits():
    torch.manual_seed(0)
    moe = GatedMoE(16, num_experts=5, top_k=2)
    x = torch.randn(7, 16)
    logits = moe.router(x)
    top, index = logits.topk(2, dim=-1)
    gates = moe.route(x)
    assert torch.allclose(gates.gather(-1, index), top.softmax(-1))


def test_residual_and_expert_mixture_by_hand():
    torch.manual_seed(0)
    moe = GatedMoE(8, num_experts=5, top_k=2, expert_ratio=4.0)
    assert moe.w1.shape == (5, 8, 32) and moe.w2.shape == (5, 32, 8)
    x = torch.randn(1, 3, 8)
    out = moe(x)
    expected = x.clone()
    for i in range(3):
        for e in range(5):
            g = out.gates[0, i, e]
            if g > 0:
                h = torch.nn.functional.gelu(x[0, i] @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]
                expected[0, i] += g * h
    assert torch.allclose(out.output, expected, atol=1e-6)


def test_sparse_and_dense_dispatch_agree_with_gradients():
    torch.manual_seed(0)
    moe = GatedMoE(16, num_experts=5, top_k=2)
    x = torch.randn(2, 10, 16, requires_grad=True)
    sparse, dense = moe(x, dense=False), moe(x, dense=True)
    assert torch.allclose(sparse.output, dense.output, atol=1e-6)
    (gs,) = torch.autograd.grad(sparse.output.square().sum(), x)
    (gd,) = torch.autograd.grad(dense.output.square().sum(), x)
    assert torch.allclose(gs, gd, atol=1e-5)


def test_balance_loss_zero_when_balanced_and_grows_with_imbalance():
    assert moe_balance_loss(torch.full((5,), 3.0)) == 0
    assert moe_balance_loss(torch.tensor([4.0, 0, 0, 0, 0])).item() == pytest.approx(4.0)  # var 2.56 / mean^2 0.64
    x = torch.randn(2, 10, 16)
    moe = GatedMoE(16)
    out = moe(x)
    out.balance_loss.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_sparse_and_dense_dispatch_give_the_same_parameter_gradients():
    torch.manual_seed(0)
    moe = GatedMoE(16, num_experts=5, top_k=2)
    x = torch.randn(3, 7, 16)
    grads = []
    for dense in (False, True):
        moe.zero_grad(set_to_none=True)
        moe(x, dense=dense).output.square().sum().backward()
        grads.append({name: p.grad.clone() for name, p in moe.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_sparse_dispatch_of_no_tokens():
    moe = GatedMoE(16, num_experts=5, top_k=2)
    out = moe(torch.randn(2, 0, 16), dense=False)
    assert out.output.shape == (2, 0, 16)
