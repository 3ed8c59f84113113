"""Layer 1: the NumPy schedule against an independent torch computation."""

import numpy as np
import pytest
import torch

from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig
from ddpm_rt.errors import InputError


@pytest.mark.parametrize("T,b1,b2", [(500, 1e-4, 0.02), (1000, 1e-4, 0.02), (7, 0.01, 0.3)])
def test_tables_match_torch(T, b1, b2):
    s = NoiseSchedule(ScheduleConfig(T, b1, b2))
    # Independent: torch float64, product written as exp(sum(log)) like the course code.
    beta = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.linspace(b1, b2, T, dtype=torch.float64)]
    )
    alpha_bar = torch.exp(torch.cumsum(torch.log(1 - beta), 0))
    np.testing.assert_allclose(s.beta, beta.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(s.alpha, (1 - beta).numpy(), rtol=1e-6)
    np.testing.assert_allclose(s.alpha_bar, alpha_bar.numpy(), rtol=1e-5)
    assert s.alpha_bar[0] == 1.0 and s.beta[0] == 0.0
    assert np.all(np.diff(s.alpha_bar) < 0)
    assert s.beta.dtype == s.alpha_bar.dtype == np.float32
    assert len(s.beta) == T + 1


def test_add_noise_is_the_closed_form():
    s = NoiseSchedule()
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    t = np.array([1, 10, 250, 500])
    got = s.add_noise(x0, eps, t)
    ab = torch.from_numpy(s.alpha_bar)[torch.from_numpy(t)].view(-1, 1, 1, 1)
    want = ab.sqrt() * torch.from_numpy(x0) + (1 - ab).sqrt() * torch.from_numpy(eps)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "cfg",
    [
        ScheduleConfig(0),
        ScheduleConfig(10, 0.1, 0.01),
        ScheduleConfig(10, 0, 0.1),
        ScheduleConfig(kind="cosine"),
    ],
)
def test_bad_schedules_are_rejected(cfg):
    with pytest.raises(InputError):
        NoiseSchedule(cfg)
