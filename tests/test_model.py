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


def test_learned_null_replaces_exactly_the_all_zero_rows():
    torch.manual_seed(0)
    m = ContextUnet(UNetConfig(n_feat=16, context_dim=4, null_context="learned")).eval()
    zero = ContextUnet(UNetConfig(n_feat=16, context_dim=4)).eval()
    zero.load_state_dict({k: v for k, v in m.state_dict().items() if k != "null"})
    with torch.no_grad():
        m.null.copy_(torch.tensor([0.3, -0.2, 0.5, 0.1]))
    x, t = torch.randn(3, 3, 16, 16), torch.rand(3, 1)
    c = torch.tensor([[0.0, 0, 0, 0], [1.0, 0, 0, 0], [0.0, 0, 0, 0]])
    with torch.no_grad():
        got, plain = m(x, t, c), zero(x, t, c)
        as_null = zero(x, t, m.null.expand(3, 4))
    torch.testing.assert_close(got[1], plain[1])  # a real context is untouched
    torch.testing.assert_close(got[[0, 2]], as_null[[0, 2]])  # zeros -> the learned vector
    assert not torch.allclose(got[0], plain[0])


def test_capacity_knobs_change_the_architecture():
    base = sum(p.numel() for p in ContextUnet(UNetConfig(n_feat=16, context_dim=4)).parameters())
    for kw in ({"blocks": 3}, {"attention": True}):
        m = ContextUnet(UNetConfig(n_feat=16, context_dim=4, **kw))
        assert sum(p.numel() for p in m.parameters()) > base
    with pytest.raises(InputError, match="blocks"):
        UNetConfig(blocks=0)
    with pytest.raises(InputError, match="null_context"):
        UNetConfig(null_context="random")
