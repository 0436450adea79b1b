import math

import pytest
import tensorly as tl
import torch
from tensorly.tt_tensor import tt_to_tensor

from fedtt.tt import LORETTA_SHAPES, TTLinear, factorize, tt_num_params, tt_shape, tt_svd, tt_to_dense


def dense_reference(cores, in_features, out_features):
    """Element-wise definition: W(a_1..a_d) = G_1[:, a_1, :] G_2[:, a_2, :] ... G_d[:, a_d, :]."""
    shape = [c.shape[1] for c in cores]
    flat = torch.empty(math.prod(shape), dtype=cores[0].dtype)
    for index in range(flat.numel()):
        digits, rest = [], index
        for k in reversed(shape):
            digits.append(rest % k)
            rest //= k
        product = torch.eye(1, dtype=cores[0].dtype)
        for core, a in zip(cores, reversed(digits)):
            product = product @ core[:, a, :]
        flat[index] = product.item()
    return flat.reshape(in_features, out_features)


def test_contraction_equals_elementwise_definition_and_tensorly():
    layer = TTLinear(12, 6, [3, 4, 2, 3], rank=3, generator=torch.Generator().manual_seed(1))
    cores = [c.detach().double() for c in layer.cores]
    dense = tt_to_dense(cores, 12, 6)
    assert torch.allclose(dense, dense_reference(cores, 12, 6), atol=1e-12)
    tl.set_backend("numpy")
    oracle = tt_to_tensor([c.numpy() for c in cores]).reshape(12, 6)
    assert torch.allclose(dense, torch.from_numpy(oracle), atol=1e-12)


def test_forward_is_one_matmul_with_the_reconstructed_weight_plus_bias():
    layer = TTLinear(64, 16, tt_shape(64, 16), rank=4)
    x = torch.randn(5, 7, 64)
    expected = x @ layer.weight() + layer.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer(x).shape == (5, 7, 16)


def test_gradients_reach_exactly_the_unfrozen_cores():
    layer = TTLinear(48, 8, tt_shape(48, 8), rank=3)
    layer.set_trainable_cores([1])
    layer(torch.randn(4, 48)).pow(2).sum().backward()
    for i, core in enumerate(layer.cores):
        if i == 1:
            assert core.grad is not None and core.grad.abs().sum() > 0
        else:
            assert core.grad is None and not core.requires_grad
    layer.set_trainable_cores(None)
    assert all(core.requires_grad for core in layer.cores)


def test_tt_svd_at_full_rank_reconstructs_and_truncation_is_lossy():
    matrix = torch.randn(24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shape = [4, 6, 4, 4]
    cores = tt_svd(matrix, shape, rank=1000)
    assert [c.shape[1] for c in cores] == shape and cores[0].shape[0] == cores[-1].shape[-1] == 1
    assert torch.allclose(tt_to_dense(cores, 24, 16), matrix, atol=1e-10)
    truncated = tt_to_dense(tt_svd(matrix, shape, rank=2), 24, 16)
    assert (truncated - matrix).norm() / matrix.norm() > 0.1


def test_loretta_init_scale_and_seeded_identity():
    a = TTLinear(768, 64, tt_shape(768, 64), rank=5, generator=torch.Generator().manual_seed(3))
    b = TTLinear(768, 64, tt_shape(768, 64), rank=5, generator=torch.Generator().manual_seed(3))
    c = TTLinear(768, 64, tt_shape(768, 64), rank=5, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a.cores, b.cores))
    assert not torch.equal(a.core_0, c.core_0)
    std = a.weight().std().item()
    assert 0.3 * math.sqrt(1 / (768 + 64)) < std < 3 * math.sqrt(1 / (768 + 64))
    zero = TTLinear(64, 768, tt_shape(64, 768), rank=5, zero_last_core=True)
    assert zero.weight().abs().max() == 0 and zero.bias.abs().max() == 0


@pytest.mark.parametrize("hidden", [768, 1024, 4096, 5120, 8192])
def test_loretta_table_shapes_are_the_defaults(hidden):
    assert tt_shape(hidden, 64) == LORETTA_SHAPES[(hidden, 64)]
    assert tt_shape(64, hidden) == list(reversed(LORETTA_SHAPES[(hidden, 64)]))


def test_per_layer_counts_match_loretta_table_11():
    assert tt_num_params(tt_shape(768, 64), 5) == 780
    assert tt_num_params(tt_shape(768, 64), 8) == 1920
    assert tt_num_params(tt_shape(4096, 64), 5) == 1100
    assert tt_num_params(tt_shape(5120, 64), 8) == 2664


@pytest.mark.parametrize("hidden", [384, 576, 3072, 2048, 896, 1536, 100])
def test_automatic_shapes_for_other_sizes(hidden):
    for in_f, out_f in [(hidden, 64), (64, hidden)]:
        shape = tt_shape(in_f, out_f)
        assert math.prod(shape) == in_f * out_f
        assert max(shape) <= 16 and min(shape) >= 2
        layer = TTLinear(in_f, out_f, shape, rank=5)
        assert layer(torch.randn(2, in_f)).shape == (2, out_f)


def test_awkward_size_gets_a_one_line_error_with_a_shape_to_pass():
    with pytest.raises(ValueError, match=r"50257x64.*adapter.tt_shape = \[29, 1733, 8, 8\]") as err:
        tt_shape(50257, 64)
    assert "\n" not in str(err.value)
    layer = TTLinear(50257, 64, [29, 1733, 8, 8], rank=2)
    assert layer.weight().shape == (50257, 64)
    assert factorize(97, max_mode=97) == [97]


def test_wrong_explicit_shape_is_rejected():
    with pytest.raises(ValueError, match="multiply to 3072, they must multiply to 49152"):
        TTLinear(768, 64, [8, 8, 12, 4], rank=5)
