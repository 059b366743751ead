"""Safe defaults, without Ray: pickle-format weights and damaged checkpoints are refused before
anything starts, model code from a model directory never runs unless the job allows it, and the
server compares API keys as fixed-length digests in constant time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from raylm.checkpoint import load_for_inference, seal
from raylm.job import JobSpecError, spec_from_dict
from raylm.models import build_model, materialize_tiny_llama

from .conftest import REPO


def serve_cli(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from raylm.cli import main; rc = main(sys.argv[1:]); "
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(materialize_tiny_llama(), d)
    return d


def test_a_model_directory_carrying_a_pickle_file_is_refused(model_dir):
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really weights")
    with pytest.raises(ValueError, match="pickle-format files \\['pytorch_model.bin'\\]"):
        load_for_inference(model_dir)
    out = serve_cli(str(model_dir))
    assert out.returncode == 2, out.stderr
    assert "pytorch_model.bin" in out.stderr and "safetensors only" in out.stderr
    assert out.stdout.strip().endswith("NO_RAY")  # refused before any Ray work


def test_a_checkpoint_that_fails_its_checksums_is_refused_before_serving(model_dir):
    (model_dir / "raylm.json").write_text(json.dumps({"format": "raylm-checkpoint/1"}))
    seal(model_dir)
    weights = model_dir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors does not match its sha256"):
        load_for_inference(model_dir)
    out = serve_cli(str(model_dir))
    assert out.returncode == 2 and "damaged or incomplete" in out.stderr, out.stderr


EVIL_CONFIG = """
from transformers import LlamaConfig
import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("model code ran")
class EvilConfig(LlamaConfig):
    model_type = "evil"
"""


def test_model_code_in_a_model_directory_never_runs_unless_the_job_trusts_it(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_evil.py").write_text(EVIL_CONFIG)
    spec = spec_from_dict({"model": {"name_or_path": str(model_dir)}})
    assert spec.model.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(spec, str(model_dir))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_for_inference(model_dir)
    assert not (model_dir / "RAN").exists()


def test_api_keys_are_compared_as_digests_in_constant_time(monkeypatch):
    import hmac

    from raylm.serving import auth

    seen: list[tuple[str, str]] = []

    def recording(a: str, b: str) -> bool:
        seen.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(auth, "compare", recording)
    digest = auth.key_digest("secret")
    assert auth.check_key("Bearer secret", digest) is True
    assert auth.check_key("bearer secret", digest) is True  # the scheme is case-insensitive
    assert auth.check_key("Bearer wrong", digest) is False
    assert auth.check_key("Basic secret", digest) is False  # right key, wrong scheme
    assert auth.check_key("secret", digest) is False  # no scheme
    assert auth.check_key("", digest) is False
    assert auth.check_key("Bearer " + "k" * 10_000, digest) is False
    # Every check went through the constant-time comparison, always of two 64-character
    # digests: neither the key nor its length reaches the comparison.
    assert len(seen) == 7
    assert all(len(a) == len(b) == 64 for a, b in seen), seen
    assert all("secret" not in a + b for a, b in seen)
    assert auth.check_key("anything", None) is True  # no key configured: open


def test_a_pickle_only_model_directory_is_never_unpickled(model_dir, tmp_path):
    """Every `from_pretrained` passes use_safetensors=True: a directory whose only weights are a
    pickle is refused by training and serving alike, and the pickle never runs."""
    from raylm.errors import CheckpointError

    marker = tmp_path / "UNPICKLED"
    (model_dir / "model.safetensors").unlink()
    # A protocol-0 pickle that, if anything loaded it, would run `touch MARKER`.
    (model_dir / "pytorch_model.bin").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(JobSpecError, match="model.name_or_path=.*pytorch_model.bin"):
        spec_from_dict({"model": {"name_or_path": str(model_dir)}})  # a job naming it: exit 2
    with pytest.raises(OSError, match="safetensors"):  # and were it reached, from_pretrained
        build_model(spec_from_dict({}), str(model_dir))  # refuses it (use_safetensors=True)
    with pytest.raises(CheckpointError, match="pickle-format"):
        load_for_inference(model_dir)  # serving refuses it before from_pretrained
    assert not marker.exists()
