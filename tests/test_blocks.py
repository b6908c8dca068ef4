"""Tests of revlib.blocks' transformer pieces: GPT-2's sublayers and block, written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from revlib.blocks import (
    CausalSelfAttention,
    ResidualBlock,
    attention_residual,
    feedforward_residual,
    transformer_residual,
)


def attention_by_hand(attention: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d + causal mask) v per head, from the module's weights, with plain tensor operations."""
    batch, tokens, width = x.shape
    heads = attention.heads
    q, k, v = (attention.qkv(x)).split(width, dim=-1)
    outputs = []
    for head in range(heads):
        part = slice(head * width // heads, (head + 1) * width // heads)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(width // heads)  # (B, T, T)
        future = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool), diagonal=1)
        outputs.append(scores.masked_fill(future, -math.inf).softmax(dim=-1) @ v[..., part])
    return attention.out(torch.cat(outputs, dim=-1))


def test_attention_is_causal_multi_head_attention_written_out() -> None:
    torch.manual_seed(0)
    attention = CausalSelfAttention(12, 3).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    assert torch.allclose(attention(x), attention_by_hand(attention, x), atol=1e-12)


def test_a_token_does_not_see_later_tokens() -> None:
    """Changing the last token changes only the last output (a mask on the wrong side would change all). One
    feature changes: LayerNorm would undo a shift of all of them."""
    torch.manual_seed(0)
    attention = attention_residual(8, 2)
    x = torch.randn(1, 4, 8)
    changed = x.clone()
    changed[:, -1, 0] += 1.0
    before, after = attention(x), attention(changed)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6) and not torch.allclose(before[:, -1], after[:, -1])


def test_transformer_residual_makes_the_gpt2_block() -> None:
    """x + F(x) is y = x + A(LN₁ x), then y + MLP(LN₂ y): GPT-2's pre-norm block."""
    torch.manual_seed(0)
    f = transformer_residual(8, 2, hidden=16).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    attention, feedforward = f.attention, f.feedforward
    y = x + attention[1](attention[0](x))
    expected = y + feedforward[3](feedforward[2](feedforward[1](feedforward[0](y))))
    assert torch.allclose(ResidualBlock(f)(x), expected, atol=1e-12)
    assert isinstance(feedforward[2], nn.GELU) and feedforward[1].out_features == 16
    assert feedforward_residual(8)[1].out_features == 32, "GPT-2's hidden width: four times the width"


@pytest.mark.parametrize(("build", "match"), [
    (lambda: CausalSelfAttention(10, 3), "heads must divide width"),
    (lambda: CausalSelfAttention(8, 0), "heads"),
    (lambda: feedforward_residual(8, hidden=0), "hidden"),
])
def test_bad_sizes_are_refused(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
