import functools

import pytest
import torch
from torch import nn

from allocations import added_peak
from revlib.verify import finite_difference_gradient, relative_error
from revlib.measure import saved_tensor_bytes
from revlib.checkpoint import CheckpointedSequence
from revlib.measure import forward_backward, operator_profile
from revlib.reversible import (
    ResNet,
    ReversibleBlock,
    ReversibleSequence,
    ReversibleTransformer,
    RevNet,
    activation_norms,
    backprop_gradient_error,
    gradient_error_during_training,
    inverse_amplification,
    replace_modules,
)


every_block = functools.partial(CheckpointedSequence, schedule="every")


def mlp_half(features: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(features, features), nn.Tanh(), nn.Dropout(dropout))


def stack(blocks: int, features: int = 4, dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32) -> ReversibleSequence:
    torch.manual_seed(seed)
    made = [ReversibleBlock(mlp_half(features, dropout), mlp_half(features, dropout)) for _ in range(blocks)]
    return ReversibleSequence(*made).to(dtype)


def gradients(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    """Input and parameter gradients of a fixed random linear functional of the output."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    (model(x) * weight).sum().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


def test_block_inverse_undoes_forward() -> None:
    block = stack(1, dtype=torch.float64).blocks[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.allclose(block.inverse(block(x)), x, atol=1e-14)


def test_sequence_inverse_undoes_forward() -> None:
    sequence = stack(6, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(sequence.inverse(sequence(x)), x, atol=1e-12)


@pytest.mark.parametrize("blocks", [1, 3])
def test_gradcheck_with_respect_to_the_input(blocks: int) -> None:
    sequence = stack(blocks, features=3, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sequence, (x,))
    assert torch.autograd.gradcheck(sequence, (x.detach().requires_grad_(True),), fast_mode=True)


def test_parameter_gradients_match_finite_differences() -> None:
    sequence = stack(2, features=3, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    weight = torch.randn(4, 6, dtype=torch.float64)
    analytic = gradients(sequence, x, weight)[1:]
    with torch.no_grad():
        numeric = [finite_difference_gradient(lambda: (sequence(x) * weight).sum(), p) for p in sequence.parameters()]
    assert relative_error(analytic, numeric) < 1e-8


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gradients_equal_plain_autograd_on_the_same_blocks(dtype: torch.dtype, tolerance: float, device: torch.device) -> None:
    sequence = stack(8, features=16, dtype=dtype).to(device)
    plain = nn.Sequential(*sequence.blocks)
    x = torch.randn(32, 32, dtype=dtype, device=device)
    weight = torch.randn(32, 32, dtype=dtype, device=device)
    assert torch.equal(sequence(x), plain(x))
    assert relative_error(gradients(sequence, x, weight), gradients(plain, x, weight)) < tolerance


def test_parameters_shared_between_f_and_g_and_blocks_get_summed_gradients() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).double()
    sequence = ReversibleSequence(ReversibleBlock(shared, nn.Tanh()), ReversibleBlock(nn.Tanh(), shared), ReversibleBlock(shared, shared))
    x, weight = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert relative_error(gradients(sequence, x, weight), gradients(nn.Sequential(*sequence.blocks), x, weight)) < 1e-12


def test_input_without_grad_still_trains_the_parameters() -> None:
    sequence = stack(3)
    x = torch.randn(2, 8)
    sequence(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sequence.parameters())
    assert x.grad is None


def test_dropout_masks_are_replayed_and_the_caller_stream_is_untouched() -> None:
    sequence = stack(4, features=16, dropout=0.5, dtype=torch.float64)
    plain = nn.Sequential(*sequence.blocks)
    x, weight = torch.randn(16, 32, dtype=torch.float64), torch.randn(16, 32, dtype=torch.float64)
    torch.manual_seed(7)
    reversible_gradients = gradients(sequence, x, weight)
    after_reversible = torch.rand(3)
    torch.manual_seed(7)
    plain_gradients = gradients(plain, x, weight)
    after_plain = torch.rand(3)
    assert relative_error(reversible_gradients, plain_gradients) < 1e-12
    assert torch.equal(after_reversible, after_plain)
    without_replay = ReversibleSequence(*sequence.blocks, preserve_rng_state=False)
    torch.manual_seed(7)
    assert relative_error(gradients(without_replay, x, weight), plain_gradients) > 1e-2  # new masks: wrong gradients


def test_batchnorm_statistics_are_updated_once_per_forward() -> None:
    torch.manual_seed(0)
    blocks = [ReversibleBlock(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6)), nn.Sequential(nn.BatchNorm1d(6), nn.Tanh())) for _ in range(3)]
    sequence = ReversibleSequence(*blocks).double()
    twin = nn.Sequential(*[ReversibleBlock(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6)), nn.Sequential(nn.BatchNorm1d(6), nn.Tanh())) for _ in range(3)]).double()
    twin.load_state_dict(sequence.state_dict())
    x, weight = torch.randn(10, 12, dtype=torch.float64), torch.randn(10, 12, dtype=torch.float64)
    assert relative_error(gradients(sequence, x, weight), gradients(twin, x, weight)) < 1e-10
    for key, value in sequence.state_dict().items():
        assert torch.allclose(value, twin.state_dict()[key]), key
    assert all(int(module.num_batches_tracked) == 1 for module in sequence.modules() if isinstance(module, nn.BatchNorm1d))


def test_autocast_state_is_replayed_in_the_recomputation() -> None:
    sequence = stack(4, features=16)
    plain = nn.Sequential(*sequence.blocks)
    x, weight = torch.randn(32, 32), torch.randn(32, 32)

    def autocast_gradients(model: nn.Module) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        (out.float() * weight).sum().backward()
        return [p.grad for p in model.parameters()]

    reversible, reference = autocast_gradients(sequence), autocast_gradients(plain)
    full_precision = gradients(plain, x, weight)[1:]
    assert relative_error(reference, full_precision) > 1e-3  # bf16 really changes the numbers...
    assert relative_error(reversible, reference) < 1e-4  # ...and the recomputation reproduces them


def test_no_grad_runs_a_plain_forward() -> None:
    sequence = stack(3)
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = sequence(x)
    assert y.grad_fn is None and torch.equal(y, nn.Sequential(*sequence.blocks)(x))
    sequence.requires_grad_(False)
    assert sequence(x).grad_fn is None


def test_input_reused_by_the_caller_is_not_corrupted() -> None:
    sequence = stack(4)
    x = torch.randn(3, 8, requires_grad=True)
    original = x.detach().clone()
    y = sequence(x)
    y.sum().backward()
    assert torch.equal(x, original)
    assert torch.equal(sequence(x), y)


def test_memory_for_backward_does_not_grow_with_depth() -> None:
    x = torch.randn(64, 32)
    saved = {}
    for blocks in (1, 4, 16):
        sequence = stack(blocks, features=16)
        plain = nn.Sequential(*sequence.blocks)
        saved[blocks] = (
            saved_tensor_bytes(sequence, x, exclude=sequence.parameters()),
            saved_tensor_bytes(plain, x, exclude=sequence.parameters()),
        )
    assert saved[1][0] == saved[4][0] == saved[16][0] == 64 * 32 * 4  # only the output
    assert saved[16][1] > 10 * saved[1][1]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: stack(2)(torch.randn(2, 7)), "odd size 7"),
        (lambda: ReversibleSequence(ReversibleBlock(nn.Linear(4, 5), nn.Tanh()))(torch.randn(2, 8, requires_grad=True)), "block 0's f must preserve the shape of its input: it mapped \\(2, 4\\) to \\(2, 5\\)"),
        (lambda: ReversibleBlock(nn.Tanh(), nn.Linear(4, 2))(torch.randn(2, 8)), "g must preserve the shape"),
        (lambda: ReversibleBlock(nn.Tanh(), nn.Tanh(), dim=3)(torch.randn(2, 8)), "no dimension 3"),
        (lambda: ReversibleSequence(ReversibleBlock(nn.Tanh(), nn.Tanh()), ReversibleBlock(nn.Tanh(), nn.Tanh(), dim=-1)), "same dimension"),
    ],
)
def test_bad_shapes_get_clear_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types_get_clear_errors() -> None:
    with pytest.raises(TypeError, match="ReversibleBlock"):
        ReversibleSequence(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="f must be an nn.Module"):
        ReversibleBlock(lambda x: x, nn.Tanh())  # type: ignore[arg-type]


def test_second_backward_and_double_backward_are_refused() -> None:
    sequence = stack(2)
    y = sequence(torch.randn(2, 8, requires_grad=True)).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()
    x = torch.randn(2, 8, requires_grad=True)
    (gradient,) = torch.autograd.grad(sequence(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gradient.sum().backward()


def test_revnet_and_its_plain_and_checkpointed_twins_compute_the_same(device: torch.device) -> None:
    torch.manual_seed(0)
    reversible = RevNet((8, 16), 2, device=device, dtype=torch.float64)
    plain = RevNet((8, 16), 2, stage=nn.Sequential, device=device, dtype=torch.float64)
    checkpointed = RevNet((8, 16), 2, stage=every_block, device=device, dtype=torch.float64)
    plain.load_state_dict(reversible.state_dict())
    checkpointed.load_state_dict(reversible.state_dict())
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, device=device)
    weight = torch.randn(6, 10, dtype=torch.float64, device=device)
    expected = gradients(plain, x, weight)
    assert reversible(x).shape == (6, 10)
    assert relative_error(gradients(reversible, x, weight), expected) < 1e-9
    assert relative_error(gradients(checkpointed, x, weight), expected) < 1e-12


@pytest.mark.parametrize("widths", [(8, 16), (8, 16, 32)])
def test_checkpointed_revnet_checkpoints_its_blocks_only(widths: tuple[int, ...]) -> None:
    """A checkpointing stage recomputes the reversible blocks; the downsampling transitions run as ordinary layers."""
    model = RevNet(widths, 3, stage=every_block, device="cpu")
    checkpointed = [stage for stage in model.stages if isinstance(stage, CheckpointedSequence)]
    assert len(checkpointed) == len(widths) and all(len(stage) == 3 and stage.plan.schedule == "every" for stage in checkpointed)
    assert all(isinstance(block, ReversibleBlock) for stage in checkpointed for block in stage)
    assert len(model.stages) == 2 * len(widths) - 1, "the transitions are separate, ordinary stages"
    plain = RevNet(widths, 3, stage=nn.Sequential, device="cpu")
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 1, 8, 8)
    saved_checkpointed = saved_tensor_bytes(model, x, exclude=model.parameters())
    block_input = 4 * widths[0] * 8 * 8 * 4
    assert saved_checkpointed < saved_tensor_bytes(plain, x, exclude=plain.parameters())
    assert saved_checkpointed >= 3 * block_input, "each block of the first stage keeps its input"


def test_revnet_stores_only_transition_activations() -> None:
    x = torch.randn(16, 1, 8, 8)
    shallow, deep = RevNet((8, 16), 1), RevNet((8, 16), 8)
    plain_shallow, plain_deep = RevNet((8, 16), 1, stage=nn.Sequential), RevNet((8, 16), 8, stage=nn.Sequential)
    assert saved_tensor_bytes(deep, x, exclude=deep.parameters()) == saved_tensor_bytes(shallow, x, exclude=shallow.parameters())
    assert saved_tensor_bytes(plain_deep, x, exclude=plain_deep.parameters()) > 4 * saved_tensor_bytes(plain_shallow, x, exclude=plain_shallow.parameters())


def test_resnet_matches_revnet_parameter_count() -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    resnet, revnet = ResNet((16, 32), 2), RevNet((16, 32), 4)
    assert abs(count(resnet) - count(revnet)) / count(resnet) < 0.05
    assert resnet(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("kwargs, match", [({"widths": (7,)}, "even"), ({"widths": ()}, "even"), ({"blocks_per_stage": 0}, "blocks_per_stage")])
def test_convolutional_builders_validate(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RevNet(**kwargs)
    with pytest.raises(ValueError, match=match):
        ResNet(**kwargs)


def test_reversible_transformer_matches_plain_and_keeps_memory_flat() -> None:
    torch.manual_seed(0)
    reversible = ReversibleTransformer(8, 8, features=16, heads=2, layers=3).double()
    plain = ReversibleTransformer(8, 8, features=16, heads=2, layers=3, memory_saving=False).double()
    plain.load_state_dict(reversible.state_dict())
    tokens, weight = torch.randn(5, 8, 8, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    assert relative_error(gradients(reversible, tokens, weight), gradients(plain, tokens, weight)) < 1e-10
    deep = ReversibleTransformer(8, 8, features=16, heads=2, layers=12)
    shallow = ReversibleTransformer(8, 8, features=16, heads=2, layers=1)
    tokens = tokens.float()
    assert saved_tensor_bytes(deep, tokens, exclude=deep.parameters()) == saved_tensor_bytes(shallow, tokens, exclude=shallow.parameters())
    with pytest.raises(ValueError, match="heads must divide"):
        ReversibleTransformer(8, 8, features=10, heads=3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_is_replayed(dtype: torch.dtype) -> None:
    sequence = stack(4, features=64).cuda()
    plain = nn.Sequential(*sequence.blocks)
    x, weight = torch.randn(64, 128, device="cuda"), torch.randn(64, 128, device="cuda")

    def autocast_gradients(model: nn.Module) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            out = model(x)
        (out.float() * weight).sum().backward()
        return [p.grad for p in model.parameters()]

    assert relative_error(autocast_gradients(sequence), autocast_gradients(plain)) < 1e-2


def test_a_repeated_block_runs_each_time() -> None:
    """Weight tying: the same block twice is applied twice, as in nn.Sequential built by hand."""
    torch.manual_seed(0)
    block, other = stack(2, dtype=torch.float64).blocks
    sequence = ReversibleSequence(block, other, block)
    x, weight = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    by_hand = nn.Sequential(block, other, block)
    assert len(sequence) == 3 and list(sequence) == [block, other, block]
    with torch.no_grad():
        assert torch.equal(sequence(x), block(other(block(x))))
    assert relative_error(gradients(sequence, x, weight), gradients(by_hand, x, weight)) < 1e-12


def test_indexing_and_slicing_give_blocks_and_sequences() -> None:
    sequence = stack(4, dtype=torch.float64)
    blocks = sequence.blocks
    assert sequence[1] is blocks[1] and sequence[-1] is blocks[3]
    part = sequence[1:3]
    assert isinstance(part, ReversibleSequence) and part.blocks == blocks[1:3]
    x, weight = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert relative_error(gradients(part, x, weight), gradients(nn.Sequential(*blocks[1:3]), x, weight)) < 1e-12
    empty = sequence[4:]
    assert len(empty) == 0 and torch.equal(empty(x), x), "no block is the identity"


def test_a_half_that_changes_its_input_in_place_is_refused_by_name() -> None:
    sequence = ReversibleSequence(ReversibleBlock(nn.Tanh(), nn.Tanh()), ReversibleBlock(nn.ReLU(inplace=True), nn.Tanh()))
    with pytest.raises(ValueError, match="block 1's f changed its input in place"):
        sequence(torch.randn(2, 8, requires_grad=True))


def test_memory_held_during_backward_does_not_grow_with_depth() -> None:
    """Measured while backward runs, not counted after forward: the most bytes a step holds beyond its input
    is the same at 2 and at 32 blocks (parameters frozen, so that no gradient of theirs is allocated)."""
    x = torch.randn(64, 32, requires_grad=True)
    peaks = [added_peak(lambda: sequence(x).sum().backward()) for sequence in (stack(blocks, features=16).requires_grad_(False) for blocks in (2, 32))]
    assert peaks[0] == peaks[1] > 0


def test_parameter_gradients_are_not_all_held_until_backward_ends() -> None:
    """In backward() each piece's parameter gradients go to .grad as soon as they are computed: with trainable
    parameters (whose .grad exist after the warm-up step) the most a step holds is the same at 2 and 32 blocks."""
    x = torch.randn(64, 32, requires_grad=True)
    peaks = [added_peak(lambda: sequence(x).sum().backward()) for sequence in (stack(blocks, features=16) for blocks in (2, 32))]
    assert peaks[0] == peaks[1] > 0


def test_autograd_grad_and_backward_give_the_same_parameter_gradients() -> None:
    """backward() hands each piece's parameter gradients to their accumulators (their hooks run, once per use);
    torch.autograd.grad gets them returned by the Function, and leaves .grad alone."""
    sequence = stack(4, dtype=torch.float64)
    x, weight = torch.randn(3, 8, dtype=torch.float64, requires_grad=True), torch.randn(3, 8, dtype=torch.float64)
    parameters = list(sequence.parameters())
    seen = []
    handles = [p.register_post_accumulate_grad_hook(lambda p: seen.append(p)) for p in parameters]
    by_backward = gradients(sequence, x, weight)
    assert len(seen) == len(parameters) and all(a is b for a, b in zip(sorted(seen, key=id), sorted(parameters, key=id)))
    for handle in handles:
        handle.remove()
    sequence.zero_grad(set_to_none=True)
    by_grad = torch.autograd.grad((sequence(x) * weight).sum(), [x, *parameters])
    assert all(p.grad is None for p in parameters)
    assert relative_error(list(by_grad), by_backward) < 1e-12
    assert relative_error(list(by_grad), gradients(nn.Sequential(*sequence.blocks), x, weight)) < 1e-12


def test_dropout_in_some_blocks_only_is_replayed_exactly() -> None:
    """Pieces without randomness keep no generator state and pieces with dropout keep their own; each
    recomputation replays the masks of its own first run, and the caller's stream is left where it was."""
    torch.manual_seed(0)
    halves = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.0), (0.0, 0.3), (0.0, 0.0)]  # dropout in block 1's f and block 3's g
    sequence = ReversibleSequence(*[ReversibleBlock(mlp_half(16, p), mlp_half(16, q)) for p, q in halves]).double()
    plain = nn.Sequential(*sequence.blocks)
    x, weight = torch.randn(8, 32, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64)
    torch.manual_seed(3)
    reversible_gradients = gradients(sequence, x, weight)
    after_reversible = torch.rand(3)
    torch.manual_seed(3)
    plain_gradients = gradients(plain, x, weight)
    after_plain = torch.rand(3)
    assert relative_error(reversible_gradients, plain_gradients) < 1e-12
    assert torch.equal(after_reversible, after_plain)
    torch.manual_seed(3)
    states = [state for pair in sequence(x.requires_grad_(True)).grad_fn.states for state in pair]
    kept = [index for index, state in enumerate(states) if state.cpu_rng is not None]
    assert kept == [2, 7], f"a state for block 1's f and block 3's g only: got pieces {kept}"


def test_backprop_gradient_error_is_rounding_in_float64_and_leaves_the_model_as_found() -> None:
    torch.manual_seed(0)
    model = RevNet((4,), 3, in_channels=1, classes=3, dtype=torch.float64)
    x, t = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    buffers = [b.clone() for b in model.buffers()]
    state = torch.get_rng_state()
    assert backprop_gradient_error(model, x, t) < 1e-12
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(state, torch.get_rng_state())
    assert all(s.memory_saving for s in model.modules() if isinstance(s, ReversibleSequence))


def test_backprop_gradient_error_detects_a_wrong_recomputation() -> None:
    # fresh dropout masks in the recomputation: a wrong gradient, which the measurement must see
    torch.manual_seed(0)
    blocks = [ReversibleBlock(mlp_half(8, 0.3), mlp_half(8, 0.3)) for _ in range(4)]
    model = nn.Sequential(ReversibleSequence(*blocks, preserve_rng_state=False), nn.Linear(16, 3)).double()
    x, t = torch.randn(32, 16, dtype=torch.float64), torch.randint(0, 3, (32,))
    assert backprop_gradient_error(model, x, t) > 1e-2
    replayed = nn.Sequential(ReversibleSequence(*blocks), model[1])
    assert backprop_gradient_error(replayed, x, t) < 1e-12
    # any loss, e.g. mean squared error
    mse = lambda out, target: (out - target).pow(2).mean()  # noqa: E731
    assert backprop_gradient_error(replayed, x, torch.randn(32, 3, dtype=torch.float64), loss=mse) < 1e-12


def test_backprop_gradient_error_rejects_bad_input() -> None:
    x, t = torch.randn(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="no ReversibleSequence"):
        backprop_gradient_error(nn.Linear(4, 2), x, t)
    with pytest.raises(TypeError, match="nn.Module"):
        backprop_gradient_error("model", x, t)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensors"):
        backprop_gradient_error(stack(1, 2), [1.0], t)  # type: ignore[arg-type]
    frozen = stack(1, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        backprop_gradient_error(frozen, x, t)


def test_activation_norms_follow_the_blocks() -> None:
    sequence = stack(3, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    norms = activation_norms(sequence, x)
    assert len(norms) == 4 and norms[0] == pytest.approx(float(x.norm()))
    with torch.no_grad():
        assert norms[-1] == pytest.approx(float(sequence(x).norm()))
    with pytest.raises(TypeError, match="ReversibleSequence"):
        activation_norms(nn.Sequential(*sequence.blocks), x)  # type: ignore[arg-type]


def test_inverse_amplification_of_identity_like_and_scaled_blocks() -> None:
    # F = G = 0: the inverse is the identity, so a perturbation comes back unchanged
    zero = nn.Linear(4, 4)
    nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
    identity = ReversibleSequence(ReversibleBlock(zero, zero))
    x = torch.randn(6, 8)
    assert inverse_amplification(identity, x) == pytest.approx(1.0, rel=1e-6)
    # F(x2) = a x2, G = 0: x1 = y1 - a x2 and x2 = y2, so a perturbation (0, d) comes back as (-a d, d);
    # for a random perturbation the growth lies between 1 and sqrt(1 + a^2) + 1, and grows with a
    growth = []
    for a in (1.0, 10.0):
        f = nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            f.weight.copy_(a * torch.eye(4))
        growth.append(inverse_amplification(ReversibleSequence(ReversibleBlock(f, zero)), x, seed=3))
    assert 1.0 < growth[0] < 2.5 and growth[1] > 3 * growth[0]
    # the sequence is left in its dtype, and a float32 sequence is measured without its own rounding
    sequence, x = stack(8, features=4), torch.randn(5, 8)
    measured = inverse_amplification(sequence, x)
    assert next(sequence.parameters()).dtype == torch.float32
    assert measured == pytest.approx(inverse_amplification(stack(8, features=4, dtype=torch.float64), x.double()), rel=1e-9)
    with pytest.raises(ValueError, match="positive"):
        inverse_amplification(sequence, x, size=0.0)


def test_replace_modules_swaps_every_relu_and_keeps_the_weights() -> None:
    torch.manual_seed(0)
    model = RevNet((4,), 2)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert replace_modules(model, nn.ReLU, nn.GELU) is model
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 2 * 2 * 2 + 1  # 2 blocks x (F, G) x 2, head
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    with pytest.raises(TypeError, match="nn.Module"):
        replace_modules(model, nn.GELU, lambda: "relu")  # type: ignore[arg-type, return-value]


def test_gradient_error_during_training_measures_before_and_every_few_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(stack(3, features=4, dtype=torch.float64), nn.Linear(8, 3).double())
    x, t = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = gradient_error_during_training(model, x, t, x, t, optimizer, steps=6, every=3, batch_size=4)
    assert len(errors) == 3 and max(errors) < 1e-12  # float64: rounding only
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # it trained
    with pytest.raises(ValueError, match="every"):
        gradient_error_during_training(model, x, t, x, t, optimizer, every=0)


def test_operator_profile_counts_the_operators_of_a_call(capfd: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(stack(2, features=4), nn.Linear(8, 2))
    x = torch.randn(3, 8)
    profile = operator_profile(forward_backward, model, x)
    assert sum(share for share, _ in profile.values()) == pytest.approx(1.0)
    assert profile["aten::cat"][1] == 1  # the last block's output (the input needs no gradient)
    plain = operator_profile(forward_backward, nn.Sequential(*model[0].blocks, model[1]), x)
    # one per block in the forward pass, and the backward of the second block's split joins its input's gradients
    assert plain["aten::cat"][1] == 3
    shares = [share for share, _ in profile.values()]
    assert shares == sorted(shares, reverse=True)
    assert capfd.readouterr().err == ""  # the profiler's start and stop messages are silenced


def test_under_a_torch_func_transform_the_error_names_what_is_missing() -> None:
    """The blocks' Functions are applied through autograd's C entry, not Function.apply; under a transform the
    sequence still goes through Function.apply, whose error says what is missing."""
    sequence = ReversibleSequence(ReversibleBlock(mlp_half(4), mlp_half(4))).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.vmap(sequence)(x)


def test_an_input_left_wrapped_by_a_finished_transform_gives_the_gradients_of_the_unwrapped_one() -> None:
    """A tensor that escaped a finished ``torch.func.grad`` (which Function.apply unwraps, and the sequence
    unwraps before the C entry) gives the gradients of the tensor inside it."""
    torch.manual_seed(0)
    sequence = ReversibleSequence(*[ReversibleBlock(mlp_half(4), mlp_half(4)) for _ in range(2)]).double()
    escaped: list[torch.Tensor] = []

    def leak(x: torch.Tensor) -> torch.Tensor:
        escaped.append(x * 2)
        return x.sum()

    torch.func.grad(leak)(torch.randn(3, 8, dtype=torch.float64))
    wrapped = escaped[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(wrapped), "the test needs a wrapped tensor"
    plain = torch._C._functorch.unwrap_if_dead(wrapped)
    weight = torch.randn(3, 8, dtype=torch.float64)
    found = []
    for x in (wrapped, plain):
        sequence.zero_grad(set_to_none=True)
        (sequence(x) * weight).sum().backward()
        found.append([p.grad for p in sequence.parameters()])
    assert relative_error(found[0], found[1]) == 0
