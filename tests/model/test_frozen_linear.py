"""Linear around a frozen weight (the PEFT case) takes the oneDNN path in training too: same
output and input gradient as F.linear, no weight gradient."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import layers
from lmforge.model.layers import Linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
def test_frozen_linear_matches_f_linear(bias, shape):
    torch.manual_seed(0)
    lin = Linear(24, 40, bias=bias).requires_grad_(False)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 40)
    y = lin(x)
    if layers._ONEDNN_LINEAR:
        assert type(y.grad_fn).__name__ == "_FrozenLinearBackward"
    (dx,) = torch.autograd.grad(y, x, g)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, lin.weight, lin.bias)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    assert lin.weight.grad is None


def test_trainable_weight_keeps_autograd_linear():
    lin = Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, x.detach().sum(0).expand(4, 8))
    assert x.grad is not None
