"""`aigc weights fetch` and `evaluate.inception_weights: download`: torch-fidelity's Inception file,
checked against its published sha256 and stored as safetensors, then real Inception Score.

The internet is never contacted: downloads come from an HTTP server on 127.0.0.1 (a mirror, as
`--url` / `$AIGC_INCEPTION_WEIGHTS_URL` allow), and "offline" is a port nothing listens on. The
real published file cannot be had here, so the success path serves a stand-in (the offline
weights with a random classifier layer) under a patched known digest; with the real digest the
same file is refused."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from aigc_pipeline import cli
from aigc_pipeline.evaluation import inception
from aigc_pipeline.evaluation.errors import EvaluationError
from aigc_pipeline.evaluation.fidelity import compute_fidelity_metrics
from aigc_pipeline.evaluation.inception import (
    DOWNLOAD,
    TORCH_FIDELITY_SHA256,
    TORCH_FIDELITY_WEIGHTS_FILENAME,
    InceptionWeights,
    fetched_weights_path,
    load_state_dict,
    resolve_inception_weights,
)
from tests.conftest import BIN


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def offline_weights(tmp_path_factory: pytest.TempPathFactory) -> InceptionWeights:
    shared = tmp_path_factory.getbasetemp() / "aigc-shared-cache"  # the conversion the other modules made
    shared.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("empty-torch-home")))
        return resolve_inception_weights(cache_dir=shared)


@pytest.fixture(scope="module")
def served(offline_weights: InceptionWeights, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An HTTP server on 127.0.0.1 with a stand-in for torch-fidelity's file (classifier included) and
    a pickle that runs code; ``requests`` counts the GETs."""
    root = tmp_path_factory.mktemp("mirror")
    state = load_state_dict(offline_weights)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=g) * 0.05
    state["fc.bias"] = torch.randn(state["fc.bias"].shape, generator=g) * 0.05
    torch.save(state, root / TORCH_FIDELITY_WEIGHTS_FILENAME)
    marker = root / "unpickled.txt"
    from tests.unit.test_inception import _hostile_file

    _hostile_file(root / "hostile.pth", marker)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):  # noqa: N802 - http.server's name
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {
            "url": f"http://127.0.0.1:{server.server_address[1]}",
            "root": root,
            "requests": requests,
            "marker": marker,
            "sha256": _sha256(root / TORCH_FIDELITY_WEIGHTS_FILENAME),
        }
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "aigc-cache"
    monkeypatch.setenv("AIGC_CACHE_DIR", str(path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return path


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{TORCH_FIDELITY_WEIGHTS_FILENAME}"  # nothing listens there any more


def test_offline_fetch_fails_at_once_saying_what_to_copy_where(tmp_path: Path) -> None:
    env = {
        "PATH": str(BIN),
        "AIGC_CACHE_DIR": str(tmp_path / "cache"),
        "TORCH_HOME": str(tmp_path / "th"),
        "HOME": str(tmp_path),
    }
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "aigc"), "weights", "fetch", "--url", _closed_port_url()],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr
    assert message.startswith("aigc: error: cannot download http://127.0.0.1:") and "no network access" in message
    assert inception.URL_INCEPTION_V3 in message and TORCH_FIDELITY_SHA256 in message
    assert str(tmp_path / "th" / "hub" / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILENAME) in message
    assert "aigc weights fetch --file PATH" in message and str(tmp_path / "cache" / "inception") in message
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    assert seconds < 30, f"{seconds:.1f} s: the offline failure should be immediate (the CLI starts in a few)"


def test_download_setting_offline_fails_with_the_same_message(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(inception.URL_ENV, _closed_port_url())
    with pytest.raises(EvaluationError, match=r"cannot download .*copy it here to .*hub/checkpoints"):
        resolve_inception_weights(DOWNLOAD)


def test_a_file_with_the_wrong_digest_is_refused_and_nothing_stored(served: dict, cache: Path) -> None:
    url = f"{served['url']}/{TORCH_FIDELITY_WEIGHTS_FILENAME}"
    with pytest.raises(EvaluationError) as excinfo:
        cli.run_command(["weights", "fetch", "--url", url])
    message = str(excinfo.value)
    assert f"sha256 {served['sha256']}" in message and f"publishes for {TORCH_FIDELITY_WEIGHTS_FILENAME}" in message
    assert TORCH_FIDELITY_SHA256 in message and "refused, nothing stored" in message
    assert not (cache / "inception").exists() or not any((cache / "inception").iterdir())


def test_a_hostile_download_is_refused_unread(served: dict, cache: Path) -> None:
    with pytest.raises(EvaluationError, match="refused, nothing stored"):
        cli.run_command(["weights", "fetch", "--url", f"{served['url']}/hostile.pth"])
    assert not served["marker"].exists()


def test_fetch_stores_safetensors_then_inception_score_comes_from_its_logits(
    served: dict, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(inception, "TORCH_FIDELITY_SHA256", served["sha256"])  # the stand-in's digest
    url = f"{served['url']}/{TORCH_FIDELITY_WEIGHTS_FILENAME}"
    before = len(served["requests"])

    weights = cli.run_command(["weights", "fetch", "--url", url])

    assert len(served["requests"]) == before + 1
    assert "compute Inception Score from their logits" in capsys.readouterr().out
    stored = fetched_weights_path(cache)
    assert weights.path == stored and stored.read_bytes()[8:9] == b"{", "stored as safetensors, not a pickle"
    record = json.loads(stored.with_name(stored.name + ".json").read_text())
    assert record["source_sha256"] == served["sha256"] and record["sha256"] == _sha256(stored)
    assert (weights.source, weights.has_logits, weights.sha256) == ("torch-fidelity", True, served["sha256"])

    # From then on: the default resolution uses it, and `download` does not download again.
    assert resolve_inception_weights() == weights
    assert resolve_inception_weights(DOWNLOAD) == weights
    assert len(served["requests"]) == before + 1
    rng = np.random.default_rng(0)
    generated = rng.integers(0, 256, (20, 3, 16, 16), dtype=np.uint8)  # 2 per IS split
    result = compute_fidelity_metrics(
        generated, generated[:4], reference_key="fetch", weights=weights, isc=True, cache_dir=cache
    )
    assert "isc_unavailable" not in result and result["isc_mean"] > 1.0 and np.isfinite(result["isc_std"])
    assert result["extractor"]["has_logits"] is True

    # A stored file changed afterwards is refused, not loaded.
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(EvaluationError, match="do not match the record written with them"):
        resolve_inception_weights()


def test_fetch_from_a_copied_file(served: dict, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = served["root"] / TORCH_FIDELITY_WEIGHTS_FILENAME
    with pytest.raises(EvaluationError, match="refused, nothing stored"):
        cli.run_command(["weights", "fetch", "--file", str(copy)])  # under the real published digest
    monkeypatch.setattr(inception, "TORCH_FIDELITY_SHA256", served["sha256"])
    weights = cli.run_command(["weights", "fetch", "--file", str(copy)])
    assert weights.has_logits and weights.path == fetched_weights_path(cache)
