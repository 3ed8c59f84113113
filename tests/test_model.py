"""The U-Net: shapes, registered shortcut, sizes."""

import pytest
import torch

from ddpm_rt.errors import InputError
from ddpm_rt.training.model import ContextUnet, UNetConfig


@pytest.mark.parametrize("h,w", [(16, 16), (8, 12), (32, 32)])
def test_output_shape_any_size_divisible_by_4(h, w):
    m = ContextUnet(UNetConfig(n_feat=16, context_dim=5, height=h, width=w)).eval()
    x = torch.randn(3, 3, h, w)
    out = m(x, torch.rand(3, 1), torch.randn(3, 5))
    assert out.shape == x.shape


@pytest.mark.parametrize("h,w", [(15, 16), (16, 18), (2, 2)])
def test_bad_size_is_rejected(h, w):
    with pytest.raises(InputError, match="divisible by 4"):
        UNetConfig(height=h, width=w)


def test_residual_shortcut_is_a_trained_registered_layer():
    m = ContextUnet(UNetConfig(n_feat=16, context_dim=4))
    shortcut = m.init_conv.shortcut
    assert isinstance(shortcut, torch.nn.Conv2d)
    assert "init_conv.shortcut.weight" in m.state_dict()
    assert any(p is shortcut.weight for p in m.parameters())  # the optimiser sees it
    # The course's fresh-conv-per-forward made two identical calls disagree.
    m.eval()
    args = (torch.randn(2, 3, 16, 16), torch.rand(2, 1), torch.randn(2, 4))
    torch.testing.assert_close(m(*args), m(*args), rtol=0, atol=0)


def test_context_and_time_change_the_output():
    torch.manual_seed(0)
    m = ContextUnet(UNetConfig(n_feat=16, context_dim=4)).eval()
    x = torch.randn(1, 3, 16, 16)
    base = m(x, torch.tensor([[0.5]]), torch.zeros(1, 4))
    assert not torch.allclose(base, m(x, torch.tensor([[0.9]]), torch.zeros(1, 4)))
    assert not torch.allclose(base, m(x, torch.tensor([[0.5]]), torch.eye(4)[:1]))
