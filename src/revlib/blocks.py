r"""The building blocks several chapters share: activations, residual functions, residual blocks, small networks.

* :data:`ACTIVATIONS` — the elementwise non-linearities the book uses, each with its derivative written in
  terms of its output (the hand-written backward pass of chapter 01 needs it) and its ``nn.Module``;
  :func:`make_activation` makes a fresh module by name.
* Residual functions :math:`\mathcal F` that preserve their input's shape: :func:`mlp_residual`
  (linear → σ → linear, the ODE and frontier chapters), :func:`pre_activation_residual` and its
  convolutional case :func:`conv_residual` (He et al. 2016b: [norm →] σ → layer → [norm →] σ → layer);
  for token sequences, GPT-2's two sublayers, :func:`attention_residual` (causal self-attention,
  :class:`CausalSelfAttention`) and :func:`feedforward_residual`, and a whole GPT-2 block as one residual
  function, :func:`transformer_residual`; :func:`gpt2_chain`, a GPT-2-style classifier as a chain of its
  sublayers.
* :class:`ResidualBlock`, :math:`x \mapsto x + \mathcal F(x)`.
* :func:`small_cnn` and :func:`mlp`, the plain networks of the first chapters; :func:`staged_resnet`, a
  pre-activation ResNet whose stages halve the resolution, as a chain of blocks of unequal sizes.

Nothing here saves memory; the chapters' modules build their networks from these pieces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from revlib._checks import positive_integers
from revlib.runtime import resolve_device

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "CausalSelfAttention",
    "ResidualBlock",
    "TransformerResidual",
    "attention_residual",
    "make_activation",
    "conv_residual",
    "feedforward_residual",
    "gpt2_chain",
    "mlp",
    "mlp_residual",
    "pre_activation_residual",
    "small_cnn",
    "staged_resnet",
    "transformer_residual",
]


@dataclass(frozen=True)
class Activation:
    r"""An elementwise non-linearity :math:`\sigma` with its derivative written in terms of its output.

    Attributes:
        name: ``"relu"``, ``"sigmoid"``, ``"tanh"`` or ``"identity"``.
        forward: :math:`z \mapsto \sigma(z)`.
        derivative_from_output: :math:`h \mapsto \sigma'(z)` where :math:`h = \sigma(z)`.
        module: a factory of the equivalent ``nn.Module``.
    """

    name: str
    forward: Callable[[Tensor], Tensor]
    derivative_from_output: Callable[[Tensor], Tensor]
    module: Callable[[], nn.Module]


def _relu_derivative(h: Tensor) -> Tensor:
    return (h > 0).to(h.dtype)  # σ(z) = max(z, 0): σ'(z) = 1[z > 0] = 1[h > 0]


def _sigmoid_derivative(h: Tensor) -> Tensor:
    return h * (1 - h)  # σ(z) = 1 / (1 + e^{-z}): σ'(z) = σ(z)(1 - σ(z)) = h(1 - h)


def _tanh_derivative(h: Tensor) -> Tensor:
    return 1 - h * h  # σ'(z) = 1 - tanh²(z) = 1 - h²


def _identity(z: Tensor) -> Tensor:
    return z


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation("relu", torch.relu, _relu_derivative, nn.ReLU),
    "sigmoid": Activation("sigmoid", torch.sigmoid, _sigmoid_derivative, nn.Sigmoid),
    "tanh": Activation("tanh", torch.tanh, _tanh_derivative, nn.Tanh),
    "identity": Activation("identity", _identity, torch.ones_like, nn.Identity),  # a linear network: σ' = 1
}
"""The activations of the book's networks, by name."""


def make_activation(name: str) -> nn.Module:
    """A fresh module of the activation called ``name`` in :data:`ACTIVATIONS`.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name].module()


def mlp_residual(width: int, hidden: int | None = None, *, activation: str = "tanh") -> nn.Sequential:
    r"""The residual function :math:`\mathcal F(x) = W_2\,\sigma(W_1 x + b_1) + b_2` on ``(B, width)`` vectors.

    Args:
        width: features of :math:`x`, kept by the function.
        hidden: features between the two linear maps (``width`` when ``None``).
        activation: :math:`\sigma`, a name in :data:`ACTIVATIONS`.

    Raises:
        ValueError: a size that is not a positive integer, or an unknown activation.
    """
    hidden = width if hidden is None else hidden
    positive_integers(width=width, hidden=hidden)
    return nn.Sequential(nn.Linear(width, hidden), make_activation(activation), nn.Linear(hidden, width))


def pre_activation_residual(
    layer: Callable[[], nn.Module], *, activation: str = "relu", norm: Callable[[], nn.Module] | None = None
) -> nn.Sequential:
    r"""The residual function of pre-activation ResNets (He et al. 2016b),

    .. math:: \mathcal F(x) = L_2\Big(\sigma\big(N_2(L_1(\sigma(N_1(x))))\big)\Big),

    that is [norm →] σ → layer → [norm →] σ → layer, the modules created in that order. ``layer()`` and
    ``norm()`` make a fresh layer (a linear map or a convolution) and normalisation; with ``norm=None``
    there is none.

    Raises:
        ValueError: the activation is unknown.
    """

    def normalised_activation() -> list[nn.Module]:
        return [norm(), make_activation(activation)] if norm is not None else [make_activation(activation)]

    return nn.Sequential(*normalised_activation(), layer(), *normalised_activation(), layer())


def conv_residual(channels: int, hidden: int | None = None, *, norm: str = "batch") -> nn.Sequential:
    r"""The convolutional residual function of pre-activation ResNets (:func:`pre_activation_residual`) with
    a normalisation, ReLU and 3×3 convolutions without bias, preserving ``(B, channels, H, W)``: norm → ReLU →
    conv to ``hidden`` channels → norm → ReLU → conv back to ``channels`` (``hidden=None``: ``channels``).

    ``norm="batch"`` is BatchNorm, which normalises each channel over the batch (so an example's output
    depends on the others in its batch); ``norm="group"`` is GroupNorm (Wu and He 2018) with
    :math:`\gcd(8, C)` groups of a layer's C channels, which normalises each example on its own.

    Raises:
        ValueError: ``channels`` or ``hidden`` is not a positive integer, or ``norm`` is neither.
    """
    hidden = channels if hidden is None else hidden
    positive_integers(channels=channels, hidden=hidden)
    if norm not in ("batch", "group"):
        raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")

    def normalisation(width: int) -> nn.Module:
        return nn.BatchNorm2d(width) if norm == "batch" else nn.GroupNorm(math.gcd(8, width), width)

    return nn.Sequential(
        normalisation(channels), make_activation("relu"), nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
        normalisation(hidden), make_activation("relu"), nn.Conv2d(hidden, channels, 3, padding=1, bias=False),
    )


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention on token sequences ``(B, T, width)``, as in GPT-2 (Radford et al. 2019).

    One linear map to queries, keys and values, scaled dot-product attention in ``heads`` heads in which
    token :math:`t` attends to tokens :math:`\le t`, and a linear map back.

    Raises:
        ValueError: ``width`` or ``heads`` is not a positive integer, or ``heads`` does not divide ``width``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        positive_integers(width=width, heads=heads)
        if width % heads:
            raise ValueError(f"heads must divide width, got width={width} and heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        # (3, B, heads, T, width / heads): queries, keys and values
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, width / heads)
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, width))


def attention_residual(width: int, heads: int) -> nn.Sequential:
    """GPT-2's first sublayer as a residual function on ``(B, T, width)``, LayerNorm then causal self-attention.

    Raises:
        ValueError: as :class:`CausalSelfAttention`.
    """
    return nn.Sequential(nn.LayerNorm(width), CausalSelfAttention(width, heads))


def feedforward_residual(width: int, hidden: int | None = None) -> nn.Sequential:
    """GPT-2's second sublayer as a residual function on ``(B, T, width)``, LayerNorm → linear to ``hidden``
    features → GELU → linear back (``hidden=None`` gives ``4 * width``, GPT-2's).

    Raises:
        ValueError: ``width`` or ``hidden`` is not a positive integer.
    """
    hidden = 4 * width if hidden is None else hidden
    positive_integers(width=width, hidden=hidden)
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class TransformerResidual(nn.Module):
    r"""A GPT-2 block as one residual function, :math:`\mathcal F(x) = a + m(x + a)` with
    :math:`a = \mathcal A(x)` the attention sublayer and :math:`m` the feed-forward one, so that
    :math:`x + \mathcal F(x)` is the block, :math:`y = x + \mathcal A(x)`, then :math:`y + m(y)`.

    Args:
        attention: :math:`\mathcal A`, e.g. :func:`attention_residual`.
        feedforward: :math:`m`, e.g. :func:`feedforward_residual`.
    """

    def __init__(self, attention: nn.Module, feedforward: nn.Module) -> None:
        super().__init__()
        self.attention, self.feedforward = attention, feedforward

    def forward(self, x: Tensor) -> Tensor:
        attended = self.attention(x)
        return attended + self.feedforward(x + attended)


def transformer_residual(width: int, heads: int, hidden: int | None = None) -> TransformerResidual:
    """One GPT-2 block on ``(B, T, width)`` as a residual function, a :class:`TransformerResidual` of
    :func:`attention_residual` with ``heads`` heads and :func:`feedforward_residual` with ``hidden`` features.

    Raises:
        ValueError: as :func:`attention_residual` and :func:`feedforward_residual`.
    """
    return TransformerResidual(attention_residual(width, heads), feedforward_residual(width, hidden))


class ResidualBlock(nn.Module):
    r"""A residual block :math:`x \mapsto x + \mathcal F(x)` (He et al. 2016).

    Args:
        f: :math:`\mathcal F`, a module that preserves the shape of its input.

    Raises:
        TypeError: ``f`` is not an ``nn.Module``.
    """

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module, got {type(f).__name__}")
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


def small_cnn(
    feature_shape: Sequence[int], channels: tuple[int, int], classes: int, *, device: torch.device | str | None = None
) -> nn.Sequential:
    """Two 3×3 convolutions (the second with stride 2) and a linear read-out, for ``(B, C, H, W)`` images
    of ``feature_shape`` ``(C, H, W)``: the first chapter's network, on ``device`` (``None``:
    :func:`revlib.runtime.default_device`).

    Raises:
        ValueError: ``feature_shape`` is not ``(C, H, W)``, or a size is not a positive integer.
    """
    if len(feature_shape) != 3:
        raise ValueError(f"feature_shape must be (channels, height, width), got {tuple(feature_shape)}")
    in_channels, height, width = (int(size) for size in feature_shape)
    first, second = channels
    positive_integers(in_channels=in_channels, height=height, width=width, first=first, second=second, classes=classes)
    return nn.Sequential(
        nn.Conv2d(in_channels, first, kernel_size=3, padding=1), nn.ReLU(),  # (B, first, H, W)
        nn.Conv2d(first, second, kernel_size=3, padding=1, stride=2), nn.ReLU(),  # (B, second, H/2, W/2)
        nn.Flatten(), nn.Linear(second * ((height + 1) // 2) * ((width + 1) // 2), classes),  # (B, classes)
    ).to(resolve_device(device))


def staged_resnet(
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 3,
    *,
    in_channels: int = 1,
    classes: int = 10,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    r"""A pre-activation ResNet (He et al. 2016b) whose stages halve the resolution and widen the channels,
    as a chain of blocks :math:`x_{i+1} = F_i(x_i)` of unequal sizes: what :func:`revlib.plan <revlib.planner.plan>` is for.

    The blocks, in order: a 3×3 convolution to ``widths[0]`` channels (the stem); for each stage, after the
    first a transition (BatchNorm → ReLU → 3×3 convolution with stride 2 to the stage's width), then
    ``blocks_per_stage`` :class:`ResidualBlock` s of :func:`conv_residual`; the head (BatchNorm → ReLU →
    global average pooling → linear to ``classes``). On :math:`H \times W` inputs stage :math:`k` runs at
    :math:`\lceil H / 2^k \rceil \times \lceil W / 2^k \rceil`, so with widths doubling each stage's
    activations are half the previous stage's. The module's children are the blocks, on ``device``
    (``None``: :func:`revlib.runtime.default_device`).

    Raises:
        ValueError: ``widths`` is empty, or a width, ``blocks_per_stage``, ``in_channels`` or ``classes`` is
            not a positive integer.
    """
    widths = list(widths)
    if not widths:
        raise ValueError("widths must name at least one stage's number of channels, got none")
    positive_integers(blocks_per_stage=blocks_per_stage, in_channels=in_channels, classes=classes,
                      **{f"widths[{index}]": width for index, width in enumerate(widths)})
    blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
    for previous, width in zip([None, *widths], widths):
        if previous is not None:
            blocks.append(nn.Sequential(
                nn.BatchNorm2d(previous), make_activation("relu"),
                nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
            ))
        blocks += [ResidualBlock(conv_residual(width)) for _ in range(blocks_per_stage)]
    blocks.append(nn.Sequential(
        nn.BatchNorm2d(widths[-1]), make_activation("relu"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(widths[-1], classes),
    ))
    return nn.Sequential(*blocks).to(resolve_device(device))


def gpt2_chain(width: int, depth: int, *, tokens: int = 8, token_features: int = 8, classes: int = 10,
               device: torch.device | str | None = None) -> nn.Sequential:
    r"""A GPT-2-style classifier of sequences ``(B, tokens, token_features)`` (the digits' eight rows of eight
    pixels, say), as a chain of unequal blocks with each GPT-2 block split into its two residual sublayers.

    The blocks, in order: a linear embedding of each token to ``width`` features; ``depth`` times a
    :class:`ResidualBlock` of :func:`attention_residual` (one head per 16 features) and one of
    :func:`feedforward_residual` (``4 * width`` hidden features); the head (LayerNorm → flatten → linear to
    ``classes``). Pre-LayerNorm as in GPT-2 (Radford et al. 2019), without position embeddings (the causal
    mask tells the tokens' order). The module's children are the ``2 * depth + 2`` blocks, on ``device``
    (``None``: :func:`revlib.runtime.default_device`); their parameters are drawn embedding, head, then the
    sublayers in order.

    Raises:
        ValueError: a size is not a positive integer.
    """
    positive_integers(width=width, depth=depth, tokens=tokens, token_features=token_features, classes=classes)
    embedding = nn.Linear(token_features, width)
    head = nn.Sequential(nn.LayerNorm(width), nn.Flatten(), nn.Linear(tokens * width, classes))
    sublayers = [
        ResidualBlock(function)
        for _ in range(depth)
        for function in (attention_residual(width, max(1, width // 16)), feedforward_residual(width))
    ]
    return nn.Sequential(embedding, *sublayers, head).to(resolve_device(device))


def mlp(sizes: Sequence[int], activation: str = "relu", *, device: torch.device | str | None = None) -> nn.Sequential:
    """A multilayer perceptron ``Linear(n_0, n_1) → σ → … → Linear(n_{L−1}, n_L)`` (no activation at the end),
    on ``device`` (``None``: :func:`revlib.runtime.default_device`).

    Raises:
        ValueError: fewer than two sizes, a size that is not a positive integer, or an unknown activation.
    """
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least an input and an output size, got {list(sizes)}")
    positive_integers(**{f"sizes[{index}]": size for index, size in enumerate(sizes)})
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(sizes) - 2:
            layers.append(make_activation(activation))
    return nn.Sequential(*layers).to(resolve_device(device))
