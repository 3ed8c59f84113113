"""The public Python API is what ddpm_rt.__all__ and the README list, and nothing more."""

import re
from pathlib import Path

import ddpm_rt

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PUBLIC = {
    "Generator",
    "GenerateConfig",
    "StepInfo",
    "Bundle",
    "NoiseSchedule",
    "ScheduleConfig",
    "DdpmRtError",
    "BundleError",
    "BackendError",
    "NumericalError",
    "InputError",
    "Cancelled",
    "__version__",
}


def test_all_is_the_public_surface_and_resolves():
    assert set(ddpm_rt.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(ddpm_rt, name) is not None


def test_readme_lists_exactly_the_public_surface():
    section = README.split("**Public surface**", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_]+)`", section)) - {"ddpm_rt.__all__"}
    assert listed == PUBLIC, listed ^ PUBLIC


def test_errors_form_one_hierarchy():
    for name in ("BundleError", "BackendError", "NumericalError", "InputError", "Cancelled"):
        assert issubclass(getattr(ddpm_rt, name), ddpm_rt.DdpmRtError)
