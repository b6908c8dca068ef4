"""Tests of revlib.blocks' transformer pieces: GPT-2's sublayers and block, written out by hand, and the
chains of them (the GPT-2 classifier split into sublayers, and its Reformer-style counterpart)."""

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
    gpt2_chain,
    transformer_residual,
)
from revlib.reversible import ReversibleBlock, reformer_chain


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
    (lambda: gpt2_chain(16, 0), "depth"),
    (lambda: reformer_chain(0, 2), "width"),
])
def test_bad_sizes_are_refused(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_gpt2_chain_is_gpt2_blocks_split_into_sublayers() -> None:
    """Embedding, attention and feed-forward sublayers alternating, head; x + F(x) per sublayer, so each pair
    is a GPT-2 block; its weights drawn embedding, head, then sublayers (what chapter 07 built by hand)."""
    torch.manual_seed(0)
    chain = gpt2_chain(32, 3).double()
    assert len(chain) == 2 * 3 + 2
    x = torch.randn(5, 8, 8, dtype=torch.float64)
    h = chain[0](x)
    for attention, feedforward in zip(chain[1:-1:2], chain[2:-1:2]):
        block = transformer_residual(32, 2)
        block.attention, block.feedforward = attention.f, feedforward.f
        h = ResidualBlock(block)(h)
    assert torch.allclose(chain(x), chain[-1](h), atol=1e-12)
    assert chain[1].f[1].heads == 2 and chain[2].f[1].out_features == 4 * 32
    torch.manual_seed(0)
    by_hand = [nn.Linear(8, 32), nn.Sequential(nn.LayerNorm(32), nn.Flatten(), nn.Linear(8 * 32, 10))]
    by_hand[1:1] = [ResidualBlock(f) for _ in range(3) for f in (attention_residual(32, 2), feedforward_residual(32))]
    torch.manual_seed(0)
    drawn = gpt2_chain(32, 3)
    assert all(torch.equal(a, b) for a, b in zip(drawn.parameters(), nn.Sequential(*by_hand).parameters()))


def test_reformer_chain_holds_a_gpt2_block_per_coupling() -> None:
    """Each coupling is y1 = x1 + A(x2), y2 = x2 + m(y1) on two streams of the full width, invertible, with
    one GPT-2 block's weights (attention and feed-forward sublayers of that width)."""
    torch.manual_seed(0)
    chain = reformer_chain(32, 2).double()
    gpt2 = gpt2_chain(32, 2)
    assert len(chain) == 2 + 2 and all(isinstance(block, ReversibleBlock) for block in chain[1:-1])
    in_couplings = sum(p.numel() for block in chain[1:-1] for p in block.parameters())
    assert in_couplings == sum(p.numel() for block in gpt2[1:-1] for p in block.parameters())
    x = chain[0](torch.randn(4, 8, 8, dtype=torch.float64))
    assert x.shape == (4, 8, 64)
    coupling = chain[1]
    x1, x2 = x.chunk(2, dim=-1)
    y1 = x1 + coupling.f(x2)
    assert torch.allclose(coupling(x), torch.cat((y1, x2 + coupling.g(y1)), dim=-1), atol=1e-12)
    assert torch.allclose(coupling.inverse(coupling(x)), x, atol=1e-12)
    assert chain(torch.randn(4, 8, 8, dtype=torch.float64)).shape == (4, 10)
