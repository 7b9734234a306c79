"""Checkpoints and fitted codebooks load with torch.load(weights_only=True): a file whose pickle would run code
is refused with a clear message before anything runs, and an older pickled file of your own still loads through
--trust_checkpoint=True."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import files  # noqa: E402
import modality_tokenizers as T  # noqa: E402
from model import Nano4M, Nano4MConfig, load_checkpoint  # noqa: E402

TINY_ARGS = dict(n_enc_layer=1, n_dec_layer=1, n_embd=32, n_head=2)


class Booby:
    """Unpickling this calls os.mkdir(marker): the stand-in for any code a shared file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def checkpoint_dict(**extra):
    model = Nano4M(Nano4MConfig(**TINY_ARGS))
    return dict({"model": model.state_dict(), "model_args": dict(TINY_ARGS), "iter_num": 3, "best_val_loss": 2.5,
                 "config": {"dataset": "synth"}}, **extra)


def booby_file(tmp_path, name="ckpt.pt"):
    marker = tmp_path / "MARKER"
    path = tmp_path / name
    torch.save(checkpoint_dict(payload=Booby(marker)), path)
    return str(path), marker


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    path, marker = booby_file(tmp_path)
    with pytest.raises(files.UntrustedFileError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert path in msg and "refused" in msg and "--trust_checkpoint=True" in msg and "mkdir" in msg
    assert not marker.exists()
    # the proof that the file really is armed: loading it trusted runs its code
    load_checkpoint(path, trust=True)
    assert marker.exists()


def test_crafted_codebooks_are_refused(tmp_path):
    marker = tmp_path / "MARKER"
    g = torch.Generator().manual_seed(0)
    mel = tmp_path / "audio.pt"
    torch.save({"kind": "mel_rvq", "codebooks": torch.randn(2, 8, 80, generator=g), "settings": {},
                "x": Booby(marker)}, mel)
    patch = tmp_path / "rgb.pt"
    torch.save({"kind": "patch_kmeans", "modality": "tok_rgb", "means": torch.rand(4, 3, generator=g),
                "shapes": torch.randn(4, 192, generator=g), "settings": {}, "x": Booby(marker)}, patch)
    for cls, p in ((T.MelRVQTokenizer, mel), (T.PatchKMeansTokenizer, patch)):
        with pytest.raises(files.UntrustedFileError, match="trust_checkpoint"):
            cls.load(str(p))
    meta = {"modalities": {"tok_audio": {"tokenizer": "mel_rvq", "codebook": "audio.pt"},
                           "tok_rgb": {"tokenizer": "patch_kmeans", "codebook": "rgb.pt"}}}
    for name in ("tok_audio", "tok_rgb"):
        with pytest.raises(files.UntrustedFileError):
            T.load_tokenizer(str(tmp_path), meta, name)
    with pytest.raises(files.UntrustedFileError):
        T.code_features(str(tmp_path), meta)
    assert not marker.exists()


def test_saved_codebooks_and_checkpoints_need_no_pickle(tmp_path):
    """What this project writes loads with weights_only=True, round trip exact."""
    g = torch.Generator().manual_seed(0)
    mel = T.MelRVQTokenizer(torch.randn(2, 16, 80, generator=g), {"level1": "shape", "mse_level1": 0.5})
    mel.save(str(tmp_path / "a.pt"))
    back = T.MelRVQTokenizer.load(str(tmp_path / "a.pt"))
    assert torch.equal(back.codebooks, mel.codebooks) and back.settings == mel.settings
    pk = T.PatchKMeansTokenizer("tok_depth", torch.rand(4, 1, generator=g), torch.randn(8, 64, generator=g),
                                {"depth_ref": [0.5, 1.0]})
    pk.save(str(tmp_path / "d.pt"))
    back = T.PatchKMeansTokenizer.load(str(tmp_path / "d.pt"))
    assert torch.equal(back.shapes, pk.shapes) and back.depth_ref == (0.5, 1.0)
    torch.save(checkpoint_dict(), tmp_path / "ckpt.pt")
    model, ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 3 and model.config.n_embd == 32


def test_old_pickled_checkpoint_loads_only_when_trusted(tmp_path):
    """An older checkpoint holding a numpy scalar (needs pickle, harmless) is refused by default and loads with
    the explicit flag, in sample.py / evaluate.py / train.py alike."""
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint_dict(best_val_loss=np.float64(2.5)), path)
    with pytest.raises(files.UntrustedFileError, match="trust_checkpoint=True"):
        load_checkpoint(str(path))
    _, ckpt = load_checkpoint(str(path), trust=True)
    assert ckpt["best_val_loss"] == 2.5

    import sample
    import evaluate
    with pytest.raises(files.UntrustedFileError):
        sample.main([f"--out_dir={tmp_path}", "--device=cpu"])
    settings = dict(evaluate.default_settings(), out_dir=str(tmp_path), device="cpu")
    with pytest.raises(files.UntrustedFileError):
        evaluate.run(settings)


def test_scripts_refuse_a_crafted_checkpoint(tmp_path):
    """train.py --init_from=resume and sample.py / evaluate.py as a user runs them: exit non-zero with the reason,
    the marker never appears."""
    out = tmp_path / "run"
    out.mkdir()
    path, marker = booby_file(out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train import write_dataset
    write_dataset(str(tmp_path / "data"), n_train=4, n_val=2)
    runs = {"train.py": ["--init_from=resume", f"--out_dir={out}", "--dataset=synth",
                         f"--data_root={tmp_path / 'data'}", "--device=cpu"],
            "sample.py": [f"--out_dir={out}", "--device=cpu"],
            "evaluate.py": [f"--out_dir={out}", "--device=cpu"]}
    for script, args in runs.items():
        proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert proc.returncode != 0, script
        assert "refused to load" in proc.stderr and "--trust_checkpoint=True" in proc.stderr, (script, proc.stderr)
        assert "Traceback" not in proc.stderr, (script, proc.stderr[-2000:])
        assert not marker.exists(), script
