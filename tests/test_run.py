"""Per-run, per-row generation: jobs run together give what they give alone, and a job that
ends early (cancelled, its callback failing) ends alone."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_rt import Generator
from ddpm_rt.errors import Cancelled, InputError
from ddpm_rt.run import plan_runs


@pytest.fixture(scope="module")
def gen():
    from ddpm_rt.cli.generate import default_model

    return Generator(default_model(), threads=1)


def _alone(gen, **kw):
    return gen.generate(**kw)


# Requests that differ in everything a row carries: prompt, count, seed, guidance (incl. none),
# negative prompt.
REQUESTS = [
    dict(prompt="red apple", num=2, seed=1, guidance=2.0),
    dict(prompt="a happy dog", num=1, seed=5, guidance=1.0),
    dict(prompt="blue car", num=2, seed=9, guidance=3.0, negative_prompt="red"),
]


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m-sde"])
def test_jobs_run_together_give_what_they_give_alone(gen, sampler):
    settings = dict(sampler=sampler, steps=6)
    jobs = [gen.prepare(**r, **settings) for r in REQUESTS]
    assert len({j.batch_key for j in jobs}) == 1
    gen.run_jobs(jobs)  # one run: every step one U-Net call over all 5 rows (+ guided rows)
    for r, job in zip(REQUESTS, jobs, strict=True):
        assert job.error is None
        np.testing.assert_array_equal(job.images, _alone(gen, **r, **settings))


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_a_cancelled_job_ends_alone(gen, sampler):
    """Cancelling one job mid-run drops its rows; the others (and a multistep solver's
    history of their rows) go on unchanged."""
    settings = dict(sampler=sampler, steps=6)
    seen = []

    def stop_at_3(info):
        seen.append(info.chunk_step)
        return info.chunk_step < 3

    def boom(info):
        if info.chunk_step == 2:
            raise RuntimeError("client went away")

    # the cancelled job's rows come first, so dropping them shifts every other row's state
    jobs = [
        gen.prepare(**REQUESTS[1], **settings, callback=stop_at_3),
        gen.prepare(**REQUESTS[0], **settings),
        gen.prepare(**REQUESTS[2], **settings, callback=boom),
    ]
    gen.run_jobs(jobs)
    assert isinstance(jobs[0].error, Cancelled) and jobs[0].images is None
    assert seen == [1, 2, 3]  # no callback after the cancel
    assert isinstance(jobs[2].error, RuntimeError) and jobs[2].images is None
    np.testing.assert_array_equal(jobs[1].images, _alone(gen, **REQUESTS[0], **settings))


def test_previews_are_per_job_and_are_the_step_estimate(gen):
    """Each job's callback sees its own rows' x̂0 preview, the same as when it runs alone."""
    got = {0: [], 1: []}

    def keep(k):
        return lambda info: got[k].append((info.step, info.first_image, info.images, info.preview))

    settings = dict(sampler="ddim", steps=4)
    jobs = [
        gen.prepare(**REQUESTS[k], **settings, callback=keep(k), preview_every=2) for k in (0, 1)
    ]
    gen.run_jobs(jobs)
    alone = []
    gen.generate(**REQUESTS[0], **settings, preview_every=2, callback=alone.append)
    want = [(i.step, i.first_image, i.images) for i in alone]
    assert [(s, f, n) for s, f, n, _ in got[0]] == want
    for (_, _, _, p), info in zip(got[0], alone, strict=True):
        assert (p is None) == (info.preview is None)
        if p is not None:
            np.testing.assert_array_equal(p, info.preview)
    assert got[1][-1][3].shape == (1, *jobs[1].images.shape[1:])
    # DDIM's last step lands at t = 0, where x_0 is exactly that step's estimate x̂0
    np.testing.assert_array_equal(got[1][-1][3], jobs[1].images)


def test_jobs_with_different_sampler_settings_are_refused_together(gen):
    a = gen.prepare("red apple", sampler="ddim", steps=4)
    b = gen.prepare("red apple", sampler="ddim", steps=5)
    with pytest.raises(InputError, match="cannot share a batch"):
        gen.run_jobs([a, b])


def test_batch_size_splits_runs_across_jobs(gen):
    settings = dict(sampler="ddim", steps=3)
    jobs = [gen.prepare(**r, **settings) for r in REQUESTS]
    runs = plan_runs(jobs, 2)
    assert [[(jobs.index(j), a, b) for j, a, b in r] for r in runs] == [
        [(0, 0, 2)],
        [(1, 0, 1), (2, 0, 1)],
        [(2, 1, 2)],
    ]
    gen.run_jobs(jobs, batch_size=2)
    for r, job in zip(REQUESTS, jobs, strict=True):
        np.testing.assert_array_equal(job.images, _alone(gen, **r, **settings))


def test_resolved_settings_fill_the_defaults(gen):
    job = gen.prepare("red apple", sampler="ddim")
    assert job.settings["steps"] is not None and job.settings["eta"] is not None
    assert job.settings["spacing"] == "time"
    job = gen.prepare("red apple", sampler="ddpm", guidance=1.0)
    assert job.settings["steps"] == gen.schedule.timesteps and job.settings["eta"] is None
