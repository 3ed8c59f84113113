"""Layer 1: sampler steps against independent torch computations, and the noise-order contract."""

import numpy as np
import pytest
import torch

from ddpm_rt.core.samplers import DDIMSampler, DDPMSampler, make_sampler, sample_loop, to_uint8
from ddpm_rt.core.schedule import NoiseSchedule, ScheduleConfig
from ddpm_rt.errors import InputError

SHAPE = (2, 3, 8, 8)


def _torch_tables(T=500, b1=1e-4, b2=0.02):
    """The course's formulation, in torch float64."""
    b_t = torch.cat(
        [torch.zeros(1, dtype=torch.float64), torch.linspace(b1, b2, T, dtype=torch.float64)]
    )
    a_t = 1 - b_t
    ab_t = torch.cumprod(a_t, 0)
    return b_t, a_t, ab_t


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal(SHAPE).astype(np.float32),
        rng.standard_normal(SHAPE).astype(np.float32),
    )


@pytest.mark.parametrize("t", [500, 250, 2, 1])
def test_ddpm_step_matches_course_formula(t):
    s = NoiseSchedule()
    sampler = DDPMSampler(s)
    i = int(np.where(sampler.timesteps == t)[0][0])
    x, eps = _arrays(t)
    got = sampler.step(x, eps, i, np.random.Generator(np.random.PCG64(7)))
    # The course's denoise_add_noise, with the same z the sampler draws (same seed).
    b_t, a_t, ab_t = _torch_tables()
    z = np.random.Generator(np.random.PCG64(7)).standard_normal(SHAPE, dtype=np.float32)
    z = torch.from_numpy(z).double() if t > 1 else 0
    xt, et = torch.from_numpy(x).double(), torch.from_numpy(eps).double()
    mean = (xt - et * ((1 - a_t[t]) / (1 - ab_t[t]).sqrt())) / a_t[t].sqrt()
    want = mean + b_t.sqrt()[t] * z
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert got.dtype == np.float32


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("i", [0, 10, 24])
def test_ddim_step_matches_paper(eta, i):
    s = NoiseSchedule()
    sampler = DDIMSampler(s, steps=25, eta=eta)
    x, eps = _arrays(i)
    got = sampler.step(x, eps, i, np.random.Generator(np.random.PCG64(3)))
    _, _, ab_t = _torch_tables()
    t = int(sampler.timesteps[i])
    tp = int(sampler.timesteps[i + 1]) if i + 1 < 25 else 0
    ab, abp = ab_t[t], ab_t[tp]
    xt, et = torch.from_numpy(x).double(), torch.from_numpy(eps).double()
    x0 = (xt - (1 - ab).sqrt() * et) / ab.sqrt()
    sigma = eta * ((1 - abp) / (1 - ab) * (1 - ab / abp)).sqrt()
    want = abp.sqrt() * x0 + (1 - abp - sigma**2).sqrt() * et
    if sigma > 0:
        z = np.random.Generator(np.random.PCG64(3)).standard_normal(SHAPE, dtype=np.float32)
        want = want + sigma * torch.from_numpy(z).double()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def _oracle(schedule, x0):
    """The exact noise in x given the known clean image x0."""

    def eps_fn(x, t):
        ab = schedule.alpha_bar[t]
        return ((x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)).astype(np.float32)

    return eps_fn


@pytest.mark.parametrize("name,steps", [("ddpm", None), ("ddim", 25), ("ddim", 3)])
def test_perfect_noise_prediction_recovers_the_image(name, steps):
    s = NoiseSchedule(ScheduleConfig(timesteps=100))
    x0 = np.random.default_rng(1).uniform(-1, 1, SHAPE).astype(np.float32)
    sampler = make_sampler(name, s, steps)
    out = sample_loop(_oracle(s, x0), sampler, SHAPE, np.random.Generator(np.random.PCG64(0)))
    np.testing.assert_allclose(out, x0, atol=2e-3)


def test_noise_order_contract():
    """Initial noise first, then one draw per noise-adding step, all from the one generator."""
    s = NoiseSchedule(ScheduleConfig(timesteps=5))
    seen = []
    sample_loop(
        lambda x, t: (seen.append(x.copy()), np.zeros_like(x))[1],
        DDPMSampler(s),
        SHAPE,
        np.random.Generator(np.random.PCG64(11)),
    )
    rng = np.random.Generator(np.random.PCG64(11))
    np.testing.assert_array_equal(seen[0], rng.standard_normal(SHAPE, dtype=np.float32))
    # Steps t=5..2 each draw once; t=1 draws nothing. Replaying the draws reproduces x.
    x = seen[0]
    for k, t in enumerate(range(5, 1, -1)):
        a, b = s.alpha[t], s.beta[t]
        mean = x / np.sqrt(a)  # eps = 0
        x = mean + np.sqrt(b) * rng.standard_normal(SHAPE, dtype=np.float32)
        np.testing.assert_allclose(seen[k + 1], x, rtol=1e-5, atol=1e-6)


def test_ddim_full_steps_visits_every_timestep():
    s = NoiseSchedule(ScheduleConfig(timesteps=50))
    np.testing.assert_array_equal(DDIMSampler(s, 50).timesteps, DDPMSampler(s).timesteps)
    ts = DDIMSampler(s, 7).timesteps
    assert ts[0] == 50 and len(set(ts)) == 7 and np.all(np.diff(ts) < 0)


def test_sampler_arguments_are_checked():
    s = NoiseSchedule()
    with pytest.raises(InputError, match="use another sampler for 25 steps"):
        make_sampler("ddpm", s, steps=25)
    with pytest.raises(InputError):
        make_sampler("ddim", s, steps=501)
    with pytest.raises(InputError):
        make_sampler("euler", s)


def test_to_uint8():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], dtype=np.float32).reshape(1, 1, 1, 5)
    x = np.repeat(x, 3, axis=1)
    np.testing.assert_array_equal(to_uint8(x)[0, 0, :, 0], [0, 0, 128, 255, 255])


# -- DPM-Solver++(2M) and its SDE variant, against diffusers (an independent implementation)
def _eps_model(x, t, T):
    """A fixed, smooth stand-in for a U-Net: eps depends on x and t (float64 in, f32 out)."""
    return (0.6 * np.tanh(x) + 0.2 * np.sin(3.0 * x) * (t / T)).astype(np.float32)


class _Noise:
    """Hands the sampler a given array as its next draw (diffusers takes the same array)."""

    def __init__(self, z):
        self.z, self.draws = z, 0

    def standard_normal(self, shape, dtype=np.float32):
        self.draws += 1
        return self.z


@pytest.mark.parametrize("steps", [1, 2, 8, 10, 15, 25])
@pytest.mark.parametrize("name", ["dpm++2m", "dpm++2m-sde"])
def test_dpm_solver_matches_diffusers(name, steps):
    from diffusers import DPMSolverMultistepScheduler

    T = 500
    s = NoiseSchedule(ScheduleConfig(timesteps=T))
    ours = make_sampler(name, s, steps)
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        algorithm_type="sde-dpmsolver++" if name.endswith("sde") else "dpmsolver++",
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    ref.set_timesteps(steps)
    _step_along(ours, ref, T, steps)


def _step_along(ours, ref, T, seed, **ref_kw):
    """Run our sampler and a diffusers scheduler side by side from the same x with the same
    eps model and the same injected noise, comparing after every step."""
    # diffusers counts timesteps 0..T-1: its index k is our t = k + 1
    np.testing.assert_array_equal(ref.timesteps.numpy() + 1, ours.timesteps)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    for i, t in enumerate(ours.timesteps):
        z = rng.standard_normal(x.shape).astype(np.float32)
        x = ours.step(x, _eps_model(x, t, T), i, _Noise(z))
        eps_r = torch.from_numpy(_eps_model(xr.numpy(), t, T))
        xr = ref.step(
            eps_r, int(t) - 1, xr, variance_noise=torch.from_numpy(z), **ref_kw
        ).prev_sample
        np.testing.assert_allclose(x, xr.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


def test_dpm_solver_first_order_step_is_ddim():
    """DPM-Solver++ first order == DDIM eta 0 (Lu et al. 2022, eq. 10): the first step."""
    s = NoiseSchedule()
    x, eps = _arrays(4)
    a = make_sampler("dpm++2m", s, 10).step(x, eps, 0, None)
    b = make_sampler("ddim", s, 10, eta=0.0).step(x, eps, 0, None)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dpm_solver_noise_contract_and_order():
    s = NoiseSchedule()
    x, eps = _arrays(5)
    sde = make_sampler("dpm++2m-sde", s, 4)
    draws = []
    for i in range(4):
        n = _Noise(np.zeros_like(x))
        x = sde.step(x, eps, i, n)
        draws.append(n.draws)
    assert draws == [1, 1, 1, 0]  # no noise at the last step (to t = 0)
    ode = make_sampler("dpm++2m", s, 4)
    ode.step(x, eps, 0, None)
    with pytest.raises(ValueError, match="step 2 after step 0"):
        ode.step(x, eps, 2, None)


def test_logsnr_spacing_is_uniform_in_lambda():
    from ddpm_rt.core.samplers import spaced_timesteps

    s = NoiseSchedule()
    ts = spaced_timesteps(s, 10, "logsnr")
    assert ts[0] == 500 and np.all(np.diff(ts) < 0) and ts[-1] >= 1
    ab = s.alpha_bar64[ts]
    lam = 0.5 * np.log(ab / (1 - ab))
    gaps = np.diff(lam)
    # integer timesteps only approximate the ideal points; the spacing is close to even
    assert gaps.std() / gaps.mean() < 0.1, gaps
    assert spaced_timesteps(s, 500, "logsnr").tolist() == list(range(500, 0, -1))


# -- DDPM and DDIM against diffusers' schedulers (an independent implementation), with an eps
# model that is *not* the exact noise of a known image: with an exact-noise oracle DDIM's
# direction term and eps cancel out and only the last step decides the result.
@pytest.mark.parametrize(
    "T,steps", [(500, 1), (500, 5), (500, 10), (500, 25), (400, 8), (100, 100)]
)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(T, steps, eta):
    from diffusers import DDIMScheduler

    s = NoiseSchedule(ScheduleConfig(timesteps=T))
    ours = make_sampler("ddim", s, steps, eta)
    ref = DDIMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,  # after the last step the image is at t = 0 (alpha-bar 1)
        timestep_spacing="trailing",
    )
    ref.set_timesteps(steps)
    # steps divide T here, so diffusers' prev_timestep = k - T // steps is our next timestep
    # (or -1: our t = 0)
    _step_along(ours, ref, T, steps, eta=eta)


def test_ddpm_matches_diffusers():
    """Ho et al. 2020 Algorithm 2 with sigma_t^2 = beta_t is diffusers' DDPMScheduler with
    variance_type="fixed_large" over all T steps (no noise at its t = 0, our t = 1)."""
    from diffusers import DDPMScheduler

    T = 100
    s = NoiseSchedule(ScheduleConfig(timesteps=T))
    ours = make_sampler("ddpm", s)
    ref = DDPMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="fixed_large",
        clip_sample=False,
    )
    ref.set_timesteps(T)
    np.testing.assert_array_equal(ref.timesteps.numpy() + 1, ours.timesteps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    xr = torch.from_numpy(x.copy())
    for i, t in enumerate(ours.timesteps):
        # diffusers draws its noise from a torch generator: hand ours the same values
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float32)
        noise = _Noise(z.numpy())
        x = ours.step(x, _eps_model(x, t, T), i, noise)
        assert noise.draws == (1 if t > 1 else 0), f"t={t}"
        eps_r = torch.from_numpy(_eps_model(xr.numpy(), t, T))
        g = torch.Generator().manual_seed(i)
        xr = ref.step(eps_r, int(t) - 1, xr, generator=g).prev_sample
        np.testing.assert_allclose(x, xr.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"t={t}")
