"""The report's real pipeline, every external model built from its real code with random weights (nothing is
downloaded), run through this project's own wrappers on input of the real shape. Run with
`bash tests_extras/run.sh` (installs requirements-extra.txt). A missing package fails here, never skips."""
import importlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import modalities as M  # noqa: E402
import modality_tokenizers as T  # noqa: E402
import prepare_data as pd  # noqa: E402
import rawdata  # noqa: E402

TARBALL = os.environ.get("NANO4M_ML4M_TARBALL",
                         os.path.join(ROOT, "..", "shared", "vendor", "ml-4m-cda590faa3b9.tar.gz"))
DIVAE_CFGS = {"tok_rgb": ("rgb", "ViTB-UNetP4_16k_224-448_predx0.yaml", 3, 16384),
              "tok_depth": ("depth", "ViTB-UNetP4_8k_224-448_predx0.yaml", 1, 8192),
              "tok_normal": ("normal", "ViTB-UNetP4_8k_224-448_predx0.yaml", 3, 8192)}
# every module the real path imports (prepare_data.py's oracles and pseudo-labellers, tokenize_all.py's real
# tokenizers, the downloader)
REAL_PATH_MODULES = ["yt_dlp", "silero_vad", "panns_inference.models", "torchlibrosa", "open_clip", "torchvision",
                     "transformers", "geffnet", "cv2", "encodec", "torchaudio", "fourm.vq.vqvae", "diffusers",
                     "huggingface_hub", "requests"]


def test_every_real_path_module_imports(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))      # panns_inference fetches a label list at import: give it one
    labels(tmp_path)
    failed = {}
    for name in REAL_PATH_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:      # noqa: BLE001  every failure is collected and reported together
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, f"modules of the real pipeline that do not import: {failed}"
    from transformers import DepthAnythingForDepthEstimation, pipeline  # noqa: F401
    import huggingface_hub
    import numpy
    assert numpy.__version__.startswith("1.") and huggingface_hub.__version__ < "0.26"


def labels(home):
    d = home / "panns_data"
    d.mkdir(exist_ok=True)
    rows = ["index,mid,display_name"] + [f"{i},/m/x{i},label {i}" for i in range(527)]
    (d / "class_labels_indices.csv").write_text("\n".join(rows) + "\n")


# ---------------------------------------------------------------------------------------------------
# DiVAE: the hub tokenizers' architecture from ml-4m's own configs

def divae_config(modality):
    """DiVAE kwargs from ml-4m's training config, renamed the way fourm.vq.get_image_tokenizer does."""
    import yaml
    if not os.path.exists(TARBALL):
        raise AssertionError(f"{TARBALL} missing: the ml-4m snapshot (shared/vendor) holds the DiVAE configs; "
                             f"set NANO4M_ML4M_TARBALL")
    folder, name, channels, _ = DIVAE_CFGS[modality]
    with tarfile.open(TARBALL) as tar:
        cfg = yaml.safe_load(tar.extractfile(f"ml-4m/cfgs/default/tokenization/divae/{folder}/{name}"))
    return dict(cfg, quant_type=cfg["quantizer_type"], enc_type=cfg["encoder_type"], dec_type=cfg["decoder_type"],
                image_size=cfg["input_size_max"], ema_decay=cfg["quantizer_ema_decay"], n_channels=channels,
                sync_codebook=False)


@pytest.fixture(scope="module")
def divae_models():
    from fourm.vq.vqvae import DiVAE
    torch.manual_seed(0)
    return {m: DiVAE(**divae_config(m)).eval() for m in DIVAE_CFGS}


def image_batch(modality, n=2, seed=0):
    rng = np.random.default_rng(seed)
    if modality == "tok_depth":
        return rng.integers(0, 65536, (n, 224, 224)).astype(np.uint16)
    return rng.integers(0, 256, (n, 224, 224, 3)).astype(np.uint8)


@pytest.mark.parametrize("modality", list(DIVAE_CFGS))
def test_divae_contract(divae_models, modality):
    model = divae_models[modality]
    vocab = DIVAE_CFGS[modality][3]
    assert model.codebook_size == vocab == M.BY_NAME[modality].vocab
    tok = T.DivaeTokenizer(modality, "cpu", timesteps=2, model=model)
    ids = tok.encode(image_batch(modality))
    assert ids.shape == (2, 196) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < vocab
    assert len(torch.unique(ids)) > 1
    out = tok.decode(ids[:1])
    if modality == "tok_depth":
        assert out.shape == (1, 224, 224) and out.dtype == np.uint16
    else:
        assert out.shape == (1, 224, 224, 3) and out.dtype == np.uint8
    # the untrained UNet's output layer starts at zero, so the diffusion decodes to the middle of the value range:
    # which pins down the output convention ([-1, 1] -> 0..255, standardised depth -> 0.5 of the uint16 range)
    mid = 32768 if modality == "tok_depth" else 128
    assert abs(float(np.median(out)) - mid) <= 1


def test_divae_rgb_input_scale_follows_the_model(divae_models):
    """rgb reaches the encoder in [-1, 1] (ml-4m trains the tokenizer so), or ImageNet-standardised when the
    model undoes that itself (undo_std)."""
    model = divae_models["tok_rgb"]
    tok = T.DivaeTokenizer("tok_rgb", "cpu", model=model)
    white = np.full((1, 224, 224, 3), 255, np.uint8)
    assert torch.allclose(tok._prepare(white), torch.ones(1, 3, 224, 224))
    model.undo_std = True
    try:
        x = tok._prepare(white)
        assert torch.allclose(model.prepare_input(x), torch.ones(1, 3, 224, 224), atol=1e-5)
    finally:
        model.undo_std = False


# ---------------------------------------------------------------------------------------------------
# tokenize_all.py --audio_tokenizer=encodec --image_tokenizer=divae end to end, then train.py

def untrained_encodec():
    from encodec import EncodecModel
    torch.manual_seed(0)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(1.5)
    with torch.no_grad():
        T.encodec_init_untrained(model, torch.randn(1, model.quantizer.dimension, 1040), kmeans_iters=1)
    return model


def test_tokenize_all_encodec_divae_then_train(divae_models, tmp_path, monkeypatch):
    from test_tokenize_all import make_clip
    import tokenize_all
    data = tmp_path / "data"
    raw = rawdata.raw_dir("real", str(data))
    rows = []
    for k, (cls, split) in enumerate([("cow", "train"), ("dog", "train"), ("cow", "val"), ("dog", "test")]):
        cid = f"{cls}_{k}"
        dur = make_clip(os.path.join(raw, "clips", cid), "cow" if cls == "cow" else "dog", k, seed=k)
        rows.append({"clip_id": cid, "class": cls, "source": "folder", "split": split,
                     "audio": f"clips/{cid}/audio.wav",
                     "frames": [f"clips/{cid}/frame_{v:02d}.png" for v in range(10)],
                     "depths": [f"clips/{cid}/depth_{v:02d}.png" for v in range(10)],
                     "normals": [f"clips/{cid}/normal_{v:02d}.png" for v in range(10)],
                     "keyframe_times": [round(dur * (v + 0.5) / 10, 3) for v in range(10)],
                     "duration_s": dur})
    rawdata.write_manifest(os.path.join(raw, "manifest.jsonl"), rows)
    # the test's only change: the wrappers' loaders hand out untrained models instead of downloading weights
    monkeypatch.setattr(T, "load_encodec_model", untrained_encodec)
    monkeypatch.setattr(T, "load_divae_model", lambda m, revision=None: (divae_models[m], None))
    tokenize_all.main(["--dataset=real", f"--data_root={data}", "--audio_tokenizer=encodec",
                       "--image_tokenizer=divae", "--batch_size=2", "--device=cpu"])
    tok = M.tok_dir("real", str(data))
    meta = M.load_meta(tok)
    assert meta["splits"] == {"train": 2, "val": 1, "test": 1}
    assert {m: meta["modalities"][m]["tokenizer"] for m in meta["modalities"]} == {
        "tok_rgb": "divae", "tok_depth": "divae", "tok_normal": "divae", "tok_audio": "encodec",
        "caption": "gpt2_bpe"}
    arrays = M.open_split(tok, "train", meta)
    for m in M.MODALITIES:
        a = np.asarray(arrays[m.name])
        assert a.max() < m.vocab, m.name
        if m.per_view:
            assert a.shape == (2, 10, m.length) and len(np.unique(a)) > 1, m.name
    audio = np.asarray(arrays["tok_audio"]).astype(np.int64)
    assert audio[..., 0::2].max() < 1024 and audio[..., 1::2].min() >= 1024      # codebook 2 offset by +1024
    # train.py reads it and trains a few steps
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--dataset=real", f"--data_root={data}",
           f"--out_dir={out}", "--n_enc_layer=1", "--n_dec_layer=1", "--n_embd=32", "--n_head=2",
           "--batch_size=4", "--masking.input_budget=(4, 32)", "--masking.target_budget=(4, 16)", "--max_iters=4",
           "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1", "--device=cpu",
           "--compile=False"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [s["iter"] for s in steps] == list(range(4)) and all(np.isfinite(s["loss"]) for s in steps)
    assert (out / "ckpt.pt").exists()


# ---------------------------------------------------------------------------------------------------
# the oracles: PANNs Cnn14 and CLIP ViT-B-32 untrained, Silero VAD with its shipped weights

def test_oracles_scores_in_range_and_thresholds_applied(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    labels(tmp_path)
    torch.manual_seed(0)
    models = {"pann": pd.build_cnn14().eval(), "clip": pd.load_clip("cpu", pretrained=None), "vad": pd.load_vad()}
    raw = str(tmp_path / "raw")
    rng = np.random.default_rng(0)
    rows = []
    for i, cls in enumerate(["dog", "cow", "duck"]):
        t = np.arange(5 * 24000) / 24000
        audio = (0.3 * np.sin(2 * np.pi * (300 + 200 * i) * t)).astype(np.float32)
        frames = [rng.integers(0, 256, (224, 224, 3)).astype(np.uint8) for _ in range(10)]
        a, f = pd.write_clip(raw, f"c{i}", pd.pad_audio(audio, "pad", f"c{i}"), frames)
        rows.append({"clip_id": f"c{i}", "class": cls, "source": "folder", "audio": a, "frames": f,
                     "duration_s": 5.0})
    pd.run_oracles(raw, rows, skip=set(), device="cpu", models=models)
    th = {"pann": pd.PANN_THRESHOLD, "clip": pd.CLIP_THRESHOLD, "vad": pd.VAD_MAX_VOICED}
    assert (th["pann"], th["clip"]) == (0.30, 0.25)
    for r in rows:
        s = r["oracles"]
        n_idx = len(pd.CLASS_MAP[r["class"]]["pann"])
        assert 0.0 <= s["pann"] <= n_idx and -1.0 <= s["clip"] <= 1.0 and 0.0 <= s["vad"] <= 1.0
        want = [o for o in pd.ORACLES if (s[o] > th[o] if o == "vad" else s[o] < th[o])]
        assert pd.oracle_failures(r, th) == want
    # the thresholds bite on both sides: a score just under is removed, just over kept
    r = dict(rows[0], oracles={"pann": 0.29, "clip": 0.26, "vad": 0.0})
    assert pd.oracle_failures(r, th) == ["pann"]
    r = dict(rows[0], oracles={"pann": 0.31, "clip": 0.24, "vad": 0.01})
    assert pd.oracle_failures(r, th) == ["clip", "vad"]


# ---------------------------------------------------------------------------------------------------
# the structural pseudo-labellers: Depth-Anything-V2 through transformers, DSINE through its hub entry

def depth_anything_small(path):
    """Depth-Anything-V2-Small's architecture (DINOv2 ViT-S/14 backbone, DPT head), random weights, saved with its
    image processor as a local model folder that transformers' pipeline loads like the hub one."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor
    backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=384, num_attention_heads=6,
                            num_hidden_layers=12, out_features=["stage3", "stage6", "stage9", "stage12"],
                            reshape_hidden_states=False, apply_layernorm=True)
    cfg = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[48, 96, 192, 384],
                              fusion_hidden_size=64, reassemble_factors=[4, 2, 1, 0.5], patch_size=14,
                              depth_estimation_type="relative")
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(path)
    DPTImageProcessor(do_resize=True, size={"height": 518, "width": 518}, keep_aspect_ratio=True,
                      ensure_multiple_of=14, resample=3, do_rescale=True, do_normalize=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return str(path)


# a stand-in for hugoycj/DSINE-hub's hubconf.py (whose licence forbids redistribution): the same entry signature
# DSINE(local_file_path=None) -> predictor with infer_cv2(bgr uint8 HxWx3) -> unit normals [1, 3, H, W], the same
# backbone package (geffnet), weights read from local_file_path as {"model": state_dict}
STAND_IN_HUBCONF = '''
import torch
import torch.nn.functional as F

dependencies = ["torch", "numpy", "geffnet"]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import geffnet
        self.encoder = geffnet.create_model("tf_efficientnet_b5_ap", pretrained=False)
        self.head = torch.nn.Conv2d(self.encoder.conv_head.in_channels, 3, 1)

    def forward(self, x):
        e = self.encoder
        n = self.head(e.blocks(e.act1(e.bn1(e.conv_stem(x)))))
        return [F.normalize(F.interpolate(n, size=x.shape[-2:], mode="bilinear"), dim=1)]


class Predictor:
    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def infer_cv2(self, image):
        x = torch.from_numpy(image[:, :, ::-1].copy()).float().permute(2, 0, 1)[None] / 255.0
        with torch.no_grad():
            return self.model(x.to(self.device))[-1]


def DSINE(local_file_path=None):
    model = Net()
    model.load_state_dict(torch.load(local_file_path, map_location="cpu", weights_only=True)["model"])
    return Predictor(model.eval())
'''


@pytest.fixture
def dsine_stand_in(tmp_path):
    hub = tmp_path / "DSINE-hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(STAND_IN_HUBCONF)
    sys.path.insert(0, str(hub))
    try:
        import hubconf
        torch.manual_seed(0)
        torch.save({"model": hubconf.Net().state_dict()}, tmp_path / "dsine_src.pt")
    finally:
        sys.path.remove(str(hub))
        sys.modules.pop("hubconf", None)
    return hub, (tmp_path / "dsine_src.pt").as_uri()


def test_dsine_through_its_hub_entry(dsine_stand_in, tmp_path):
    hub, url = dsine_stand_in
    raw = str(tmp_path / "raw")
    weights = str(tmp_path / "cache" / "dsine.pt")
    normal = pd.load_normal_model("cpu", raw, hub=(str(hub), "DSINE"), source="local", weights=weights,
                                  weights_url=url)
    rec = json.loads(open(os.path.join(raw, "downloads.json")).read())
    assert rec["dsine"]["sha256"] == pd.sha256_file(weights) and rec["dsine_hub"]["tree_sha256"]
    out = normal.infer_cv2(image_batch("tok_rgb", 1)[0])
    assert out.shape == (1, 3, 224, 224)
    # the hub code changed under the same ref: refused
    (hub / "hubconf.py").write_text(STAND_IN_HUBCONF + "\n# changed\n")
    with pytest.raises(RuntimeError, match="dsine_hub"):
        pd.load_normal_model("cpu", raw, hub=(str(hub), "DSINE"), source="local", weights=weights, weights_url=url)


def test_structure_pseudo_labels_end_to_end(dsine_stand_in, tmp_path):
    """write_structure's real mode on one clip: Depth-Anything-V2 (random weights, loaded by the pipeline from a
    local folder) and DSINE (the stand-in hub entry) -> depth uint16 and normal uint8 maps of 224 px, unit normals,
    the model revision and file hashes recorded in raw/downloads.json."""
    hub, url = dsine_stand_in
    raw = str(tmp_path / "raw")
    depth_dir = depth_anything_small(tmp_path / "dav2")
    depth = pd.load_depth_model("cpu", raw, model=depth_dir)
    normal = pd.load_normal_model("cpu", raw, hub=(str(hub), "DSINE"), source="local",
                                  weights=str(tmp_path / "cache" / "dsine.pt"), weights_url=url)
    images = [image_batch("tok_rgb", 1, seed=s)[0] for s in range(3)]
    depths, normals = pd.predict_structure(images, (depth, normal), batch_size=2)
    assert len(depths) == len(normals) == 3
    for d, n in zip(depths, normals):
        assert d.shape == (224, 224) and d.dtype == np.uint16 and d.min() == 0 and d.max() == 65535
        assert n.shape == (224, 224, 3) and n.dtype == np.uint8
        v = n.astype(np.float64) / 255 * 2 - 1
        assert np.allclose(np.linalg.norm(v, axis=-1), 1.0, atol=0.03)
    assert "depth_anything_v2" in json.loads(open(os.path.join(raw, "downloads.json")).read())


def test_clip_weights_checked_before_open_clip_reads_them(tmp_path, monkeypatch):
    """load_clip's real route (pretrained='openai'): open_clip's own downloader gives the cache file (here a
    random ViT-B-32 state dict standing in for it), its sha256 is recorded, the model is built from that file;
    a different file in its place is refused."""
    import open_clip
    torch.manual_seed(0)
    path = tmp_path / "open_clip_model.pt"
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True).state_dict(), path)
    fake = lambda cfg, *a, **k: str(path)  # noqa: E731
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fake)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", fake)
    raw = str(tmp_path / "raw")
    model, preprocess, tokenizer = pd.load_clip("cpu", raw=raw)
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.visual.conv1.weight, saved["visual.conv1.weight"])
    rec = json.loads(open(os.path.join(raw, "downloads.json")).read())
    assert rec["clip_ViT-B-32_openai"]["sha256"] == pd.sha256_file(path)
    score, best = pd.clip_score([image_batch("tok_rgb", 1)[0]] * 2, "dog", (model, preprocess, tokenizer))
    assert -1.0 <= score <= 1.0 and best in (0, 1)
    saved["visual.conv1.weight"] += 1.0
    torch.save(saved, path)
    with pytest.raises(RuntimeError, match="sha256"):
        pd.load_clip("cpu", raw=raw)
