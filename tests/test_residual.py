"""Tests of revlib.residual: plain/residual builders, bypassing, gradient flow and loss surfaces."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from revlib.residual import (
    DeepNetwork,
    conv_network,
    deletion_accuracies,
    effective_rank,
    filter_normalized_direction,
    gradient_flow,
    jacobian_ranks,
    largest_deletion_share,
    largest_dip,
    lesion_accuracies,
    loss_slices,
    loss_surface,
    mlp_network,
    representation_ranks,
    train_with_cosine_schedule,
)
from revlib.training import fit


def _pair(builder, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    plain = builder(residual=False, **kwargs)
    torch.manual_seed(seed)
    residual = builder(residual=True, **kwargs)
    return plain, residual


MLP = dict(in_features=10, width=16, depth=5, classes=3)
CONV = dict(in_channels=1, channels=4, depth=3, classes=3)


@pytest.mark.parametrize(("builder", "sizes", "shape"), [(mlp_network, MLP, (7, 10)), (conv_network, CONV, (7, 1, 8, 8))])
def test_plain_and_residual_have_the_same_parameters_and_shapes(builder, sizes, shape, device):
    plain, residual = _pair(builder, device=device, **sizes)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in residual.parameters())
    for (name_p, p), (name_r, r) in zip(plain.named_parameters(), residual.named_parameters()):
        assert name_p == name_r and torch.equal(p, r)
    x = torch.randn(shape, device=device)
    assert plain(x).shape == residual(x).shape == (7, 3)
    assert not plain.residual and residual.residual
    assert not torch.allclose(plain(x), residual(x)), "the skip connection must change the function"


def test_residual_block_adds_its_input():
    torch.manual_seed(0)
    plain, residual = _pair(mlp_network, **MLP)
    x = torch.randn(4, 16)
    block_p, block_r = plain.blocks[2], residual.blocks[2]
    torch.testing.assert_close(block_r(x), x + block_p(x))


def test_bypass_replaces_blocks_by_the_identity():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=True)
    x = torch.randn(6, 10)
    kept = model.stem(x)
    for index in (0, 1, 4):
        kept = model.blocks[index](kept)
    torch.testing.assert_close(model(x, bypass={2, 3}), model.head(kept))
    all_gone = model(x, bypass=range(5))
    torch.testing.assert_close(all_gone, model.head(model.stem(x)))
    with pytest.raises(ValueError, match="bypass"):
        model(x, bypass=[5])
    with pytest.raises(ValueError, match="bypass"):
        model(x, bypass=[-1])


def test_builders_reject_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        mlp_network(10, 16, 0, 3, residual=True)
    with pytest.raises(ValueError, match="width"):
        mlp_network(10, 2.5, 3, 3, residual=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation"):
        mlp_network(10, 16, 3, 3, residual=True, activation="gelu")
    with pytest.raises(ValueError, match="channels"):
        conv_network(1, -4, 3, 3, residual=True)


def test_gradient_flow_matches_autograd_and_leaves_grads_alone():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=True, dtype=torch.float64)
    x, y = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 3, (8,))
    flow = gradient_flow(model, x, y)
    assert len(flow.inputs) == len(flow.weights) == 5
    assert all(p.grad is None for p in model.parameters())
    # the input of block 0 is the stem's output: its gradient norm via an explicit graph
    hidden = model.stem(x).detach().requires_grad_(True)
    out = hidden
    for block in model.blocks:
        out = block(out)
    loss = F.cross_entropy(model.head(out), y)
    loss.backward()
    assert flow.inputs[0] == pytest.approx(hidden.grad.norm().item(), rel=1e-12)
    last = torch.cat([p.grad.flatten() for p in model.blocks[-1].parameters()])
    assert flow.weights[-1] == pytest.approx(last.norm().item(), rel=1e-12)
    with pytest.raises(TypeError, match="DeepNetwork"):
        gradient_flow(torch.nn.Linear(3, 3), x, y)  # type: ignore[arg-type]


def test_gradient_vanishes_in_deep_plain_sigmoid_nets_and_not_in_residual_ones():
    plain, residual = _pair(mlp_network, in_features=10, width=32, depth=12, classes=3, activation="sigmoid")
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for model, expected_small in ((plain, True), (residual, False)):
        flow = gradient_flow(model, x, y)
        ratio = flow.inputs[0] / flow.inputs[-1]
        assert (ratio < 1e-6) == expected_small, ratio


def test_lesion_accuracies_bypass_one_block_at_a_time():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=True)
    model.train()
    x, y = torch.randn(50, 10), torch.randint(0, 3, (50,))
    accuracies = lesion_accuracies(model, x, y)
    assert len(accuracies) == 5 and model.training
    with torch.no_grad():
        expected = (model(x, bypass={3}).argmax(1) == y).float().mean().item()
    assert accuracies[3] == expected


def test_deletion_accuracies_draw_subsets_of_the_asked_size():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=True)
    x, y = torch.randn(50, 10), torch.randint(0, 3, (50,))
    accuracies = deletion_accuracies(model, x, y, [0, 2, 5], trials=4, generator=torch.Generator().manual_seed(3))
    assert [len(trial) for trial in accuracies] == [4, 4, 4] and model.training
    with torch.no_grad():
        intact = (model.eval()(x).argmax(1) == y).float().mean().item()
        none_left = (model(x, bypass=set(range(5))).argmax(1) == y).float().mean().item()
    assert accuracies[0] == [intact] * 4 and accuracies[2] == [none_left] * 4
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):  # the four subsets of size 0
        torch.randperm(5, generator=generator)
    first_pair = set(torch.randperm(5, generator=generator)[:2].tolist())
    with torch.no_grad():
        assert accuracies[1][0] == (model(x, bypass=first_pair).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize(("counts", "trials", "message"), [([0, 6], 3, "between 0 and the number of blocks"),
                                                         ([-1], 3, "between 0"), ([1], 0, "trials")])
def test_deletion_accuracies_refuse_impossible_counts(counts, trials, message):
    model = mlp_network(**MLP, residual=True)
    with pytest.raises(ValueError, match=message):
        deletion_accuracies(model, torch.randn(4, 10), torch.zeros(4, dtype=torch.long), counts, trials=trials)


def test_largest_deletion_share_tells_a_gradual_loss_from_a_collapse():
    assert largest_deletion_share([0, 1, 2, 4], [1.0, 0.9, 0.8, 0.6]) == pytest.approx(0.25)
    assert largest_deletion_share([0, 1, 2, 4], [1.0, 0.4, 0.4, 0.4]) == pytest.approx(1.0)
    assert largest_deletion_share([0, 2, 4], [1.0, 0.6, 0.2]) == pytest.approx(0.25), "a step over two counts is shared by two blocks"


@pytest.mark.parametrize(("counts", "accuracies", "message"), [([0], [1.0], "at least two"), ([0, 1], [1.0], "one accuracy per count"),
                                                               ([0, 2, 1], [1.0, 0.5, 0.4], "increasing"), ([0, 1], [0.5, 0.5], "lost no accuracy")])
def test_largest_deletion_share_refuses_bad_input(counts, accuracies, message):
    with pytest.raises(ValueError, match=message):
        largest_deletion_share(counts, accuracies)


def test_filter_normalized_direction_matches_filter_norms(device):
    torch.manual_seed(0)
    model = conv_network(**CONV, residual=True, device=device)
    direction = filter_normalized_direction(model, generator=torch.Generator().manual_seed(1))
    again = filter_normalized_direction(model, generator=torch.Generator().manual_seed(1))
    assert set(direction) == {name for name, _ in model.named_parameters()}
    for name, parameter in model.named_parameters():
        d = direction[name]
        assert d.shape == parameter.shape and d.device == parameter.device and torch.equal(d, again[name])
        if parameter.dim() == 1:
            assert not d.any(), f"{name}: biases and BatchNorm parameters get no direction"
        else:
            dims = tuple(range(1, parameter.dim()))
            norm = torch.linalg.vector_norm
            torch.testing.assert_close(norm(d, dim=dims), norm(parameter.detach(), dim=dims))
            assert not torch.allclose(d, parameter.detach())


def test_loss_surface_is_the_loss_at_the_shifted_parameters():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=True, dtype=torch.float64)
    x, y = torch.randn(20, 10, dtype=torch.float64), torch.randint(0, 3, (20,))
    d1 = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    d2 = filter_normalized_direction(model, generator=torch.Generator().manual_seed(1))
    before = {name: p.clone() for name, p in model.state_dict().items()}
    a, b = torch.tensor([-0.5, 0.0, 0.25]), torch.tensor([0.0, 1.0])
    surface = loss_surface(model, [d1, d2], [a, b], x, y)
    assert surface.shape == (3, 2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), "the model's parameters must not change"
    with torch.no_grad():
        assert surface[1, 0].item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-12)
        for name, p in model.named_parameters():
            p.add_(0.25 * d1[name] + 1.0 * d2[name])
        assert surface[2, 1].item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-12)
    line = loss_surface(model, [d1], [a], x, y)
    assert line.shape == (3,)


def test_loss_surface_rejects_mismatched_arguments():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=True)
    x, y = torch.randn(5, 10), torch.randint(0, 3, (5,))
    direction = filter_normalized_direction(model)
    with pytest.raises(ValueError, match="coordinate"):
        loss_surface(model, [direction], [torch.zeros(2), torch.zeros(2)], x, y)
    with pytest.raises(ValueError, match="direction 0"):
        loss_surface(model, [{"stem.weight": direction["stem.weight"]}], [torch.zeros(2)], x, y)


def test_deep_network_is_a_module_of_blocks():
    model = mlp_network(**MLP, residual=False)
    assert isinstance(model, DeepNetwork) and len(model.blocks) == 5


def test_largest_dip_is_zero_for_a_bowl_wherever_its_lowest_point_lies():
    a = torch.linspace(-1, 1, 41, dtype=torch.float64)
    assert largest_dip(a**2 + 0.01) == 0.0
    assert largest_dip((a - 0.4) ** 2 + 0.01) == 0.0, "a minimum off the centre is still a bowl"
    assert largest_dip(torch.exp(a)) == 0.0, "a monotone slice has its minimum at one end"


def test_largest_dip_is_the_log_of_the_fall_from_a_ridge():
    line = torch.tensor([1.0, 0.5, 0.1, 0.5, 2.0, 1.0, 3.0])  # valley at 0.1, ridge at 2 falls to 1 on the right
    assert largest_dip(line) == pytest.approx(math.log(2.0))
    assert largest_dip(line.flip(0)) == pytest.approx(math.log(2.0)), "both sides are walked"
    scaled = largest_dip(line * 1e4)
    assert scaled == pytest.approx(math.log(2.0)), "a relative fall: independent of the loss's scale"
    a = torch.linspace(-1, 1, 201, dtype=torch.float64)
    assert largest_dip(a**2 + 0.01 + 0.05 * torch.cos(40 * a) ** 2) > 0.1, "a rippled bowl"


def test_largest_dip_rejects_what_is_not_a_slice_of_losses():
    with pytest.raises(ValueError, match="1-D"):
        largest_dip(torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least 3"):
        largest_dip(torch.ones(2))
    with pytest.raises(ValueError, match="positive, finite"):
        largest_dip(torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="positive, finite"):
        largest_dip(torch.tensor([1.0, 0.5, float("inf")]))


def test_largest_dip_with_a_ceiling_measures_only_the_basin():
    line = torch.tensor([9.0, 2.0, 8.0, 1.0, 0.1, 0.5, 2.0, 1.0, 3.0])  # falls from 8 to 2 in the left tail
    assert largest_dip(line) == pytest.approx(math.log(8.0 / 2.0))
    assert largest_dip(line, ceiling=2.5) == pytest.approx(math.log(2.0)), "the basin's own ridge still counts"
    assert largest_dip(line, ceiling=1.5) == 0.0, "below 1.5 the slice is a bowl"
    assert largest_dip(line, ceiling=100.0) == largest_dip(line), "a ceiling above every loss changes nothing"
    with pytest.raises(ValueError, match="ceiling"):
        largest_dip(line, ceiling=0.05)


def test_effective_rank_counts_equal_directions_and_ignores_scale():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert effective_rank(1e-6 * torch.eye(5)) == pytest.approx(5.0), "scale-free"
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.ones(4, 3)) == pytest.approx(1.0), "rank one"
    spread = effective_rank(torch.diag(torch.tensor([1.0, 0.1, 0.01])))
    assert 1.0 < spread < 2.0, "unequal singular values count for less than one direction each"
    for bad in (torch.ones(3), torch.zeros(3, 3), torch.empty(0, 3), torch.tensor([[1.0, float("nan")]])):
        with pytest.raises(ValueError):
            effective_rank(bad)


def test_representation_ranks_measure_every_block_input_and_the_head_input():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=True)
    inputs = torch.randn(64, 10)
    ranks = representation_ranks(model, inputs)
    assert len(ranks) == MLP["depth"] + 1
    with torch.no_grad():
        x = model.stem(inputs)
    assert ranks[0] == pytest.approx(effective_rank(x - x.mean(dim=0)))
    with torch.no_grad():
        for f in model.functions:
            x = x + f(x)
    assert ranks[-1] == pytest.approx(effective_rank(x - x.mean(dim=0)))
    with pytest.raises(TypeError):
        representation_ranks(torch.nn.Linear(10, 3), inputs)
    with pytest.raises(ValueError, match="two inputs"):
        representation_ranks(model, inputs[:1])


def test_jacobian_ranks_match_the_product_of_the_block_jacobians():
    torch.manual_seed(0)
    model = mlp_network(in_features=4, width=6, depth=3, classes=2, residual=True, activation="tanh",
                        dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    start = model.stem(x[:1]).detach()[0]
    product = torch.eye(6, dtype=torch.float64)
    point = start
    for f in model.functions:
        block = torch.autograd.functional.jacobian(lambda v, f=f: v + f(v[None])[0], point)
        product = block @ product
        point = (point + f(point[None])[0]).detach()
    ranks = jacobian_ranks(model, x)
    assert len(ranks) == 2 and ranks[0] == pytest.approx(effective_rank(product))
    with pytest.raises(ValueError, match="at least one"):
        jacobian_ranks(model, x[:0])


def test_jacobian_rank_collapses_with_depth_in_plain_nets_and_not_in_residual_ones():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    ranks = {}
    for residual in (False, True):
        for depth in (1, 12):
            torch.manual_seed(0)
            model = mlp_network(in_features=16, width=32, depth=depth, classes=3, residual=residual,
                                activation="tanh")
            ranks[residual, depth] = sum(jacobian_ranks(model, x)) / len(x)
    assert ranks[False, 12] < 0.5 * ranks[False, 1], "a deep plain net's Jacobian degenerates"
    assert ranks[True, 12] > 0.7 * ranks[True, 1], "the identity path keeps it full"


def test_largest_dip_with_a_ceiling_detects_a_dip_planted_in_the_basin():
    ceiling = math.log(10)  # chance level for ten classes, as in the chapter
    bowl = torch.linspace(-1, 1, 41) ** 2 + 0.05
    planted = bowl.clone()
    planted[31] = 0.95 * planted[30]  # a 5 % fall after rising to 0.3, well below the ceiling
    assert largest_dip(bowl, ceiling=ceiling) == 0.0
    dip = largest_dip(planted, ceiling=ceiling)
    assert dip == pytest.approx(-math.log(0.95), rel=1e-5)
    assert dip > 0.01, "a 5 % fall in the basin passes the chapter's 1 % threshold"
    tail = bowl.clone()
    tail[-3:] = torch.tensor([3.0, 2.6, 3.5])  # the same kind of fall, but above the ceiling
    assert largest_dip(tail) > 0.1 and largest_dip(tail, ceiling=ceiling) == 0.0


def test_representation_ranks_detect_a_planted_collapse():
    torch.manual_seed(0)
    model = mlp_network(**MLP, residual=False, activation="tanh")
    inputs = torch.randn(256, 10)
    healthy = representation_ranks(model, inputs)[-1]
    assert healthy > 3.0, "a random tanh MLP of depth 5 keeps several directions (4.2)"
    last = [m for m in model.functions[-1].modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # the last block's output layer now writes along one direction only
        last.weight.copy_(torch.outer(torch.randn(MLP["width"]), torch.randn(MLP["width"])))
    assert representation_ranks(model, inputs)[-1] == pytest.approx(1.0, abs=1e-3)


def test_loss_slices_match_the_directions_drawn_in_order():
    torch.manual_seed(0)
    model = conv_network(**CONV, residual=False)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    coordinates = torch.linspace(-1, 1, 9)
    found = loss_slices(model, inputs, targets, coordinates, directions=3, ceiling=math.log(3) + 10,
                        plane_stride=2, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    drawn = [filter_normalized_direction(model, generator=generator) for _ in range(3)]
    for line, dip, basin, u in zip(found.lines, found.dips, found.basin_dips, drawn):
        expected = loss_surface(model, [u], [coordinates], inputs, targets)
        torch.testing.assert_close(line, expected)
        assert dip == largest_dip(expected) and basin == largest_dip(expected, ceiling=math.log(3) + 10)
    plane = loss_surface(model, drawn[:2], [coordinates[::2]] * 2, inputs, targets)
    torch.testing.assert_close(found.plane, plane)
    assert loss_slices(model, inputs, targets, coordinates, directions=1, ceiling=20.0).plane is None
    for kwargs, message in ((dict(directions=0), "directions"), (dict(directions=1, plane_stride=2), "two"),
                            (dict(directions=2, plane_stride=0), "plane_stride")):
        with pytest.raises(ValueError, match=message):
            loss_slices(model, inputs, targets, coordinates, ceiling=20.0, **kwargs)
    with pytest.raises(ValueError, match="1-D"):
        loss_slices(model, inputs, targets, coordinates[None], directions=1, ceiling=20.0)


def test_train_with_cosine_schedule_is_fit_with_sgd_on_a_cosine_schedule():
    from revlib.data import DataSplits

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 10, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    data = DataSplits(name="random", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8], classes=3)
    torch.manual_seed(1)
    model = mlp_network(**MLP, residual=True)
    reference = copy.deepcopy(model)
    history = train_with_cosine_schedule(model, data, epochs=2, learning_rate=0.1, batch_size=16, seed=3)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * 3)
    expected = fit(reference, data, optimizer, 2, batch_size=16, seed=3, progress=False, scheduler=schedule)
    assert history.train_loss == expected.train_loss
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12), "the rate reaches 0 at the end"
    for bad, message in ((dict(learning_rate=0.0), "learning_rate"), (dict(learning_rate=0.1, momentum=1.0), "momentum"),
                         (dict(learning_rate=0.1, epochs=0), "epochs")):
        with pytest.raises(ValueError, match=message):
            train_with_cosine_schedule(model, data, **{"epochs": 1, **bad})
