"""Issue 26: a generation request has one schema (GenerateConfig's fields and their Setting);
the CLI's flags, the HTTP API's fields and OpenAPI schema and the C ABI's options are made
from it, and each rule refuses with the same one-line text through every interface."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from ddpm_rt.config import SETTINGS, GenerateConfig
from ddpm_rt.errors import InputError


def _generate_parser() -> argparse.ArgumentParser:
    from ddpm_rt.cli.generate import add_generate_parsers

    parser = argparse.ArgumentParser()
    add_generate_parsers(parser.add_subparsers(), lambda p: None)
    return parser._subparsers._group_actions[0].choices["generate"]


def test_every_setting_is_a_cli_flag_with_its_type_choices_and_help():
    actions = {a.dest: a for a in _generate_parser()._actions}
    for name, setting in SETTINGS.items():
        action = actions[name]
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.help == setting.help
        assert action.default is None  # left out: the field's own default
        if setting.kind == "choice":
            assert tuple(action.choices) == setting.choices
        else:
            assert action.type is (int if setting.kind == "int" else float)


def test_every_setting_is_an_http_field_with_its_bounds():
    from ddpm_rt.tools.serve.api import FIELDS, Limits, openapi_schema

    limits = Limits()
    props = openapi_schema("t", "v", limits)["paths"]["/api/generate"]["post"]
    props = props["requestBody"]["content"]["application/json"]["schema"]["properties"]
    here = {"num": limits.max_images, "steps": limits.max_steps}  # the server's own limits
    for name, setting in SETTINGS.items():
        if name == "batch_size":  # the server forms its own batches
            assert name not in FIELDS
            continue
        assert FIELDS[name][0] == setting.json_type == props[name]["type"]
        if setting.kind == "choice":
            assert props[name]["enum"] == list(setting.choices)
        else:
            assert props[name]["minimum"] == setting.lo
            assert props[name]["maximum"] == min(setting.hi, here.get(name, setting.hi))


BAD = [
    ("eta", 2.0, ["--eta", "2"]),
    ("sampler", "euler", None),  # argparse's choices refuse it on the command line first
    ("guidance", 51.0, ["--guidance", "51"]),
    ("seed", -1, ["--seed", "-1"]),
    ("size", 0, ["--size", "0"]),
]


@pytest.mark.parametrize("name,value,flags", BAD, ids=[b[0] for b in BAD])
def test_a_rule_refuses_with_one_text_in_python_http_and_cli(name, value, flags, tmp_path):
    from ddpm_rt.tools.serve.api import Limits, RequestError, parse_generate

    with pytest.raises(InputError) as python:
        GenerateConfig(**{name: value}).validate()
    assert python.value.field == name
    with pytest.raises(RequestError) as http:
        parse_generate({"prompt": "x", name: value}, Limits())
    got = (http.value.status, http.value.param, http.value.message)
    assert got == (422, name, str(python.value))
    if flags:
        proc = subprocess.run(
            [sys.executable, "-m", "ddpm_rt.cli", "--prompt", "x", *flags],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == f"error: {python.value}"


def test_the_negative_prompt_rule_is_one_check_after_the_models_guidance():
    """A negative prompt with guidance 1 -- given, or the model's own -- is refused by the
    one rule (GenerateConfig.check_negative_prompt), named as the negative prompt's."""
    with pytest.raises(InputError) as e:
        GenerateConfig(guidance=1.0).check_negative_prompt("blurry")
    assert e.value.field == "negative_prompt"
    GenerateConfig(guidance=None).check_negative_prompt("blurry")  # the model's: checked later
    GenerateConfig(guidance=1.0).check_negative_prompt(None)
