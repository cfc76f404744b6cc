"""Bad input to the CLI: one clear sentence naming the problem and the file/key, exit code 2, no traceback,
and no partial output folder."""

import json
import os
import subprocess
import sys

import pytest

from openr1_jax.cli import main
from tests.hf_models import save_random_model


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _assert_one_sentence(err: str, *needles: str):
    lines = [line for line in err.strip().splitlines() if line.startswith("openr1-jax: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _no_output(out_dir):
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp")]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    save_random_model(path, "qwen2", num_key_value_heads=2)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unsupported_architecture(capsys, hf_folder, tmp_path):
    bad = _copy(hf_folder, tmp_path / "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    code, err = _run(capsys, "convert", "hf-to-jax", str(bad), str(tmp_path / "out"))
    assert code == 2
    _assert_one_sentence(err, "model_type 'gpt2'", "config.json")
    _no_output(tmp_path / "out")


def test_not_a_model_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, "convert", "hf-to-jax", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert code == 2
    _assert_one_sentence(err, "config.json")
    _no_output(tmp_path / "out")


def test_missing_shard(capsys, tmp_path):
    src = tmp_path / "sharded"
    save_random_model(src, "llama").save_pretrained(src, max_shard_size="20KB")
    (src / "model.safetensors").unlink(missing_ok=True)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    code, err = _run(capsys, "convert", "hf-to-jax", str(src), str(tmp_path / "out"))
    assert code == 2
    _assert_one_sentence(err, shard.name)
    _no_output(tmp_path / "out")


def test_shape_mismatch_names_tensor_and_file(capsys, hf_folder, tmp_path):
    bad = _copy(hf_folder, tmp_path / "mismatch")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 8}))
    code, err = _run(capsys, "convert", "hf-to-jax", str(bad), str(tmp_path / "out"))
    assert code == 2
    _assert_one_sentence(err, "model.layers.0.mlp.", "has shape", "config.json implies", "model.safetensors")
    _no_output(tmp_path / "out")


def test_unknown_preset(capsys, tmp_path):
    code, err = _run(capsys, "sft", "model.name_or_path=tiny-moee", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    _assert_one_sentence(err, "tiny-moee", "tiny-moe")
    _no_output(tmp_path / "run")


def test_misspelled_config_key(capsys, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(
        "architecture: llama\nvocab_size: 32\nhidden_size: 16\nintermediate_size: 32\n"
        "num_hidden_layers: 1\nnum_attention_heads: 2\nrope_thetta: 10000\n"
    )
    code, err = _run(capsys, "sft", f"model.name_or_path={path}", f"output_dir={tmp_path / 'run'}")
    assert code == 2
    _assert_one_sentence(err, "rope_thetta", "rope_theta", str(path))
    _no_output(tmp_path / "run")


def test_jax_to_hf_on_a_non_checkpoint(capsys, hf_folder, tmp_path):
    code, err = _run(capsys, "convert", "jax-to-hf", str(hf_folder), str(tmp_path / "out"))
    assert code == 2
    _assert_one_sentence(err, "not an openr1-jax checkpoint")
    _no_output(tmp_path / "out")


def test_existing_output_is_not_touched(capsys, hf_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, "convert", "hf-to-jax", str(hf_folder), str(out))
    assert code == 2
    _assert_one_sentence(err, "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_real_process_exit_code_and_help(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "openr1_jax.cli", "convert", "hf-to-jax", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    _assert_one_sentence(proc.stderr, "does not exist or is not a folder")
    helptext = subprocess.run(
        [sys.executable, "-m", "openr1_jax.cli", "convert", "jax-to-hf", "--help"],
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert "--max-shard-size" in helptext and "default: 5GB" in helptext


def test_relative_paths_work(hf_folder, tmp_path, monkeypatch):
    """orbax refuses relative paths; users type them anyway."""
    from openr1_jax.models.load import load_model

    monkeypatch.chdir(tmp_path)
    assert main(["convert", "hf-to-jax", str(hf_folder), "ckpt"]) == 0
    assert main(["convert", "jax-to-hf", "ckpt", "hf"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert load_model("ckpt").config.architecture == "qwen2"
