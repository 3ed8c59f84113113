"""Bad input: one line `error: ...`, a non-zero exit, no traceback, nothing half-written."""

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli


def assert_clean_error(proc, match: str, code: int = 1):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") or code == 2, proc.stderr
    assert match in proc.stderr, proc.stderr
    if code == 1:
        assert len(lines) == 1, proc.stderr


@pytest.fixture
def bundle_copy(trained, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(trained["bundle"], dst)
    return dst


def _generate(bundle, out, *extra):
    return run_cli(
        "--model",
        str(bundle),
        "--prompt",
        "red circle",
        "--out",
        str(out),
        "--no-progress",
        *extra,
        check=False,
    )


def _no_files(folder):
    return [p.name for p in folder.iterdir()] == []


def test_missing_bundle(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    assert_clean_error(_generate(tmp_path / "nope", out / "a.png"), "bundle not found")
    assert _no_files(out)


def test_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(_generate(tmp_path / "empty", tmp_path / "a.png"), "no manifest.json")


def test_corrupt_manifest(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").write_text("{not json")
    assert_clean_error(_generate(bundle_copy, tmp_path / "a.png"), "corrupt")
    (bundle_copy / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    assert_clean_error(_generate(bundle_copy, tmp_path / "a.png"), "invalid")
    assert not (tmp_path / "a.png").exists()


def test_newer_schema(bundle_copy, tmp_path):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(_generate(bundle_copy, tmp_path / "a.png"), "upgrade ddpm-rt")


def test_hash_mismatch(bundle_copy, tmp_path):
    data = bytearray((bundle_copy / "unet.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle_copy / "unet.onnx").write_bytes(bytes(data))
    assert_clean_error(_generate(bundle_copy, tmp_path / "a.png"), "does not match its sha256")
    (bundle_copy / "unet.onnx").unlink()
    assert_clean_error(_generate(bundle_copy, tmp_path / "a.png"), "missing")


def test_manifest_disagreeing_with_graph_spec(bundle_copy, tmp_path):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["image"]["height"] = 32
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(
        _generate(bundle_copy, tmp_path / "a.png"), "must agree with image and conditioning"
    )


def test_unknown_label_lists_the_valid_ones(trained, tmp_path):
    proc = run_cli(
        "--model",
        str(trained["bundle"]),
        "--prompt",
        "purple hexagon",
        "--out",
        str(tmp_path / "a.png"),
        check=False,
    )
    assert_clean_error(proc, "unknown prompt 'purple hexagon'")
    assert "red circle" in proc.stderr and "yellow triangle" in proc.stderr
    assert not (tmp_path / "a.png").exists()


def test_unwritable_output(trained, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    assert_clean_error(
        _generate(trained["bundle"], tmp_path / "file.txt" / "a.png"),
        "output folder does not exist",
    )
    assert_clean_error(
        _generate(trained["bundle"], tmp_path / "missing" / "a.png"), "output folder does not exist"
    )
    (tmp_path / "dir.png").mkdir()
    assert_clean_error(_generate(trained["bundle"], tmp_path / "dir.png"), "is a folder")
    assert_clean_error(_generate(trained["bundle"], tmp_path / "a.jpg"), ".png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "file.txt"]


def test_incompatible_flags(trained, tmp_path):
    assert_clean_error(
        _generate(trained["bundle"], tmp_path / "a.png", "--sampler", "ddpm", "--steps", "25"),
        "use another sampler",
    )
    assert_clean_error(
        _generate(
            trained["bundle"], tmp_path / "a.png", "--sampler", "dpm++2m-sde", "--eta", "0.5"
        ),
        "eta applies to ddim",
    )
    assert_clean_error(_generate(trained["bundle"], tmp_path / "a.png", "--num", "0"), "num")
    assert_clean_error(
        _generate(trained["bundle"], tmp_path / "a.png", "--sampler", "euler"),
        "invalid choice",
        code=2,
    )
    assert not (tmp_path / "a.png").exists()


def test_wrong_image_size_in_training_data(tmp_path):
    np.savez(
        tmp_path / "bad.npz",
        images=np.zeros((8, 18, 18, 3), np.uint8),
        labels=np.zeros(8, np.int64),
    )
    proc = run_cli(
        "train",
        "--data",
        str(tmp_path / "bad.npz"),
        "--out",
        str(tmp_path / "ck"),
        "--steps",
        "1",
        check=False,
    )
    assert_clean_error(proc, "divisible by 4")
    assert not (tmp_path / "ck").exists()


def test_missing_and_corrupt_training_data(tmp_path):
    proc = run_cli(
        "train", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "ck"), check=False
    )
    assert_clean_error(proc, "data file not found")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    proc = run_cli(
        "train", "--data", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "ck"), check=False
    )
    assert_clean_error(proc, "cannot read data file")


def test_export_errors(tmp_path):
    proc = run_cli("export", str(tmp_path / "nockpt"), "--out", str(tmp_path / "b"), check=False)
    assert_clean_error(proc, "not a checkpoint")
    assert not (tmp_path / "b").exists()


def test_malformed_text_conditioning(text_trained, tmp_path):
    dst = tmp_path / "tb"
    shutil.copytree(text_trained["bundle"], dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["conditioning"]["text"]["default_precision"] = "fp16"
    (dst / "manifest.json").write_text(json.dumps(m))
    proc = run_cli(
        "--model", str(dst), "--prompt", "a dog", "--out", str(tmp_path / "a.png"), check=False
    )
    assert_clean_error(proc, "conditioning.text.default_precision")
