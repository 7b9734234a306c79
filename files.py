"""
Atomic writes of every output file (text, JSON, npy, wav, png): each goes through a temporary sibling name
and an atomic rename, so an interrupted run never leaves a half-written file under its final name. And the
one reader of torch files (checkpoints, codebooks), which never runs code a file holds.
"""
import contextlib
import json
import os
import pickle
import wave

import numpy as np


def atomic_path(path):
    """A temporary sibling name for writing `path`; os.replace(tmp, path) publishes it."""
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path, suffix=""):
    """Write `path` through a temporary sibling: yields the temporary name (+ suffix, for writers that append
    one, e.g. np.save's .npy); when the block ends it is renamed over `path`, so a reader sees the old file or
    the whole new one; a block that fails leaves no temporary file behind."""
    tmp = atomic_path(path) + suffix
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_text(path, text):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path, obj, **dumps_kw):
    write_text(path, json.dumps(obj, **dumps_kw))


def write_npy(path, array):
    with atomic_write(path, ".npy") as tmp:   # np.save appends .npy to a name without it
        np.save(tmp, array)


def write_wav(path, audio, sr=24000):   # the raw layout's rate (rawdata.RAW_SR)
    """float audio in [-1, 1] (mono, [T]) -> 16-bit PCM wav, atomically."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"{path}: expected mono audio [T], got shape {audio.shape}")
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with atomic_write(path) as tmp, wave.open(tmp, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def write_png(path, array):
    """uint8 [H, W, 3] (RGB) or uint16 [H, W] (depth) -> png, atomically."""
    from PIL import Image
    array = np.asarray(array)
    if array.dtype == np.uint16 and array.ndim == 2:
        img = Image.fromarray(array.astype(np.uint16))  # 16-bit grayscale ("I;16")
    elif array.dtype == np.uint8:
        img = Image.fromarray(array)
    else:
        raise ValueError(f"{path}: write_png takes uint8 images or uint16 [H, W] depth, got "
                         f"{array.dtype} {array.shape}")
    with atomic_write(path) as tmp:
        # zlib level 1, not PIL's 6: the same pixels (PNG is lossless), ~28% larger files, written 2.4x
        # faster (a fifth of ToyZoo's data generation was spent compressing its 33,000 pictures)
        img.save(tmp, format="PNG", compress_level=1)


class UntrustedFileError(ValueError):
    """A checkpoint or codebook that needs more than tensors and plain containers to load."""


def load_torch_file(path, map_location="cpu", trust=False, flag="--trust_checkpoint=True"):
    """torch.load(weights_only=True): a file cannot run code when opened. trust=True: a pickled file of your own."""
    import torch   # here, not at the top: the writers need no torch
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).strip().splitlines()
        why = next((line for line in why if "GLOBAL" in line or "Unsupported" in line), why[0] if why else "")
        raise UntrustedFileError(
            f"{path}: refused to load: it holds more than tensors and plain containers, and unpickling it "
            f"could run code ({why.strip()}). Open only files you trust; if this one is yours (e.g. written "
            f"by an older version of this project), pass {flag}") from None
