"""Pinned, verified downloads (prepare_data.fetch_verified / check_sha256), against a web server on 127.0.0.1
and file:// URLs: the first download's sha256 is recorded in the dataset's raw/downloads.json, a later file that
differs is refused, a pinned hash is enforced on the very first download."""
import functools
import hashlib
import http.server
import json
import os
import threading

import pytest
import torch

import prepare_data as pd


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "web"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_first_download_recorded_then_a_changed_file_refused(server, tmp_path):
    root, base = server
    (root / "w.bin").write_bytes(b"weights v1" * 1000)
    raw, dest = tmp_path / "raw", tmp_path / "cache" / "w.bin"
    pd.fetch_verified("w", f"{base}/w.bin", str(dest), str(raw))
    rec = json.loads((raw / "downloads.json").read_text())
    assert rec["w"]["sha256"] == hashlib.sha256(b"weights v1" * 1000).hexdigest()
    assert rec["w"]["url"] == f"{base}/w.bin"
    # a rerun with the same file passes without fetching again
    (root / "w.bin").unlink()
    pd.fetch_verified("w", f"{base}/w.bin", str(dest), str(raw))
    # upstream changed (or the cache was tampered with): refused, named, never used
    (root / "w.bin").write_bytes(b"weights v2")
    dest.unlink()
    with pytest.raises(RuntimeError, match="differs from the .* recorded in"):
        pd.fetch_verified("w", f"{base}/w.bin", str(dest), str(raw))
    dest.write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="refusing a changed"):
        pd.check_sha256("w", str(dest), str(raw))


def test_pinned_hash_enforced_on_first_download(server, tmp_path):
    root, base = server
    (root / "w.bin").write_bytes(b"real")
    dest = tmp_path / "w.bin"
    with pytest.raises(RuntimeError, match="not the pinned"):
        pd.fetch_verified("w", f"{base}/w.bin", str(dest), None, pinned="0" * 64)
    assert not dest.exists() and not list(tmp_path.glob("w.bin*"))       # no half-kept file
    pd.fetch_verified("w", f"{base}/w.bin", str(dest), None, pinned=hashlib.sha256(b"real").hexdigest())
    assert dest.read_bytes() == b"real"
    with pytest.raises(RuntimeError, match="download of .* failed"):
        pd.fetch_verified("x", f"{base}/missing.bin", str(tmp_path / "x.bin"))


def test_pann_weights_verified_and_loaded_without_pickle(tmp_path, monkeypatch):
    """load_pann: file:// URL -> sha256 recorded -> torch.load(weights_only=True) into Cnn14; a swapped file is
    refused before it is read."""
    pytest.importorskip("torchlibrosa", reason="panns-inference not installed (pip install -r requirements-test.txt)")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "panns_data").mkdir()
    lines = ["index,mid,display_name"] + [f"{i},/m/x{i},label {i}" for i in range(527)]
    (tmp_path / "panns_data" / "class_labels_indices.csv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    src = tmp_path / "Cnn14.pth"
    torch.save({"model": pd.build_cnn14().state_dict(), "iteration": 0}, src)
    raw, ckpt = tmp_path / "raw", tmp_path / "cache" / "Cnn14.pth"
    model = pd.load_pann("cpu", str(ckpt), str(raw), url=src.as_uri())
    assert torch.equal(model.fc_audioset.weight, torch.load(src, weights_only=True)["model"]["fc_audioset.weight"])
    assert json.loads((raw / "downloads.json").read_text())["pann_cnn14"]["sha256"] == pd.sha256_file(ckpt)
    torch.save({"model": pd.build_cnn14().state_dict()}, ckpt)       # another file in its place
    with pytest.raises(RuntimeError, match="sha256"):
        pd.load_pann("cpu", str(ckpt), str(raw), url=src.as_uri())


def test_dsine_without_a_gpu_is_refused_before_any_download(tmp_path):
    """DSINE's real hub entry puts its model on CUDA: without a GPU the loader says so and fetches nothing, and
    --pseudo_labels=auto falls back to flagged flat maps."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU refusal cannot be shown here")
    with pytest.raises(RuntimeError, match="need a GPU"):
        pd.load_normal_model("cpu", str(tmp_path / "raw"), weights=str(tmp_path / "dsine.pt"))
    assert not (tmp_path / "dsine.pt").exists() and not (tmp_path / "raw").exists()
    assert pd.structure_available() is False


# hub code (DSINE's torch.hub entry): fetched as a zip, hashed, and only then run

HUBCONF = '''import os
open(os.environ["NANO4M_TEST_MARKER"], "a").write("ran\\n")   # what a hostile hubconf could do on import


def DSINE(local_file_path=None):
    return "predictor"
'''


def _hub_zip(path, hubconf, commit="0123456789abcdef0123456789abcdef01234567"):
    import zipfile
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("DSINE-hub-main/hubconf.py", hubconf)
        z.writestr("DSINE-hub-main/README.md", "stand-in\n")
        z.comment = commit.encode()


def test_hub_code_is_hashed_before_it_runs_and_changed_code_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("NANO4M_TEST_MARKER", str(marker))
    _hub_zip(tmp_path / "main.zip", HUBCONF)
    raw, cache = str(tmp_path / "raw"), str(tmp_path / "hub")
    template = (tmp_path / "{ref}.zip").as_uri().replace("%7B", "{").replace("%7D", "}")
    folder = pd.fetch_hub_code("owner/DSINE-hub:main", raw, cache=cache, url_template=template)
    assert not marker.exists()                                   # fetching and unpacking runs nothing
    pd.check_hub_tree("dsine_hub", folder, raw, url="owner/DSINE-hub:main")
    rec = json.loads((tmp_path / "raw" / "downloads.json").read_text())["dsine_hub"]
    assert rec["commit"] == "0123456789abcdef0123456789abcdef01234567"   # the zip's comment names the commit
    assert rec["tree_sha256"] == pd.hub_tree_sha256(folder) and not marker.exists()
    # the same ref now holds other code: refused before torch.hub imports it
    with open(os.path.join(folder, "hubconf.py"), "a") as f:
        f.write("\n# changed upstream\n")
    weights = tmp_path / "dsine.pt"
    weights.write_bytes(b"weights")
    with pytest.raises(RuntimeError, match="dsine_hub.*|tree sha256"):
        pd.load_normal_model("cpu", raw, hub=(folder, "DSINE"), source="local", weights=str(weights),
                             weights_url=weights.as_uri())
    assert not marker.exists()


def test_hub_code_fetch_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="fetching its code"):
        pd.fetch_hub_code("owner/none:main", None, cache=str(tmp_path / "hub"),
                          url_template=(tmp_path / "missing.zip").as_uri())
    assert os.listdir(tmp_path / "hub") == []


def test_a_later_run_fetches_the_recorded_commit(tmp_path, monkeypatch):
    """the first run took the branch and recorded its commit; a later run (the cache gone) asks for that commit"""
    asked = []

    def fetch(hub, raw):
        asked.append(hub)
        raise RuntimeError("offline")
    monkeypatch.setattr(pd, "fetch_hub_code", fetch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    raw = str(tmp_path / "raw")
    pd.record_download(raw, "dsine_hub", {"commit": "f" * 40, "tree_sha256": "0" * 64})
    weights = tmp_path / "dsine.pt"
    weights.write_bytes(b"weights")
    with pytest.raises(RuntimeError, match="offline"):
        pd.load_normal_model("cpu", raw, weights=str(weights), weights_url=weights.as_uri())
    assert asked == ["hugoycj/DSINE-hub:" + "f" * 40]
