"""
Raw clips -> tokenized dataset.

    python tokenize_all.py --dataset=toyzoo [--audio_tokenizer=mel_rvq|encodec|speechtokenizer|mimi]
                           [--image_tokenizer=patch_kmeans|divae] [--batch_size=8] [--device=auto]

Reads data/<dataset>/raw/manifest.jsonl (rawdata.py's layout) and writes data/<dataset>/tok/:
    <split>/tok_rgb.bin ... tok_audio.bin   uint16 [N, 10, L]     caption.bin uint16 [N, 16]
    <split>/label.bin uint16 [N]            <split>/clip_ids.json
    codebooks/<modality>.pt                 the fitted offline codebooks
    meta.json                               written last: its presence means the dataset is complete; it
                                            records the audio layout (K codebooks x T frames) of the tokenizer

View v of a clip is keyframe v, its depth and normal maps, and the 3.41 s audio window centred on the
keyframe's time (clamped to the clip). The offline codebooks are fitted on the train split first and reused
when present with the same settings. Resumable: each split is written through preallocated `.partial`
memmaps and a progress file, flushed after every batch; a rerun continues where the last one stopped.
The same command gives the same files on the same kind of device; a codebook fitted on a GPU differs from
one fitted on the CPU (float summation order), so keep one dataset's tokens from one run.
"""
import dataclasses
import hashlib
import json
import os
import sys
import time
import types
import wave

import numpy as np
import torch
from tqdm import tqdm

import configurator
import files
import modalities as M
import streams as S
import modality_tokenizers as T
import rawdata

IMAGE_MODALITIES = ("tok_rgb", "tok_depth", "tok_normal")
FILE_KEYS = {"tok_rgb": "frames", "tok_depth": "depths", "tok_normal": "normals"}


# ---------------------------------------------------------------------------------------------------
# settings (a config file and/or --key=value, configurator.py; --help lists them)

dataset = "toyzoo"
data_root = "data"
audio_tokenizer = "mel_rvq"       # mel_rvq: fitted offline (acoustic); encodec: the report's (acoustic); speechtokenizer /
                                  # mimi: pretrained semantic codecs, level 1 distilled from HuBERT / WavLM (extras)
image_tokenizer = "patch_kmeans"  # or divae
batch_size = 8                    # clips per batch (x10 views)
device = "auto"
seed = 1337
rgb_codes = "%dx%d" % T.DEFAULT_CODES["tok_rgb"]         # offline patch codebooks, MEANSxSHAPES
depth_codes = "%dx%d" % T.DEFAULT_CODES["tok_depth"]
normal_codes = "%dx%d" % T.DEFAULT_CODES["tok_normal"]
audio_codes = T.DEFAULT_CODES["tok_audio"]               # mel_rvq, per level, <= 1024
audio_level1 = "shape"            # what mel_rvq's level 1 codes (modality_tokenizers.MelRVQTokenizer.LEVEL1_MODES)
audio_rvq_levels = 2              # mel_rvq levels: 2 (the report's 2 codebooks) or 1 (one id a frame; audio_level1=spectrum)
depth_norm = "global"             # patch_kmeans depth: log depth on one scale (the train set's typical mean and std),
                                  # so a patch's code is its own depth; "image": standardised per image (before #33)
kmeans_iters = 20
fit_clips = 100                   # train clips read to fit the codebooks
fit_vectors = 40000               # vectors (frames / patches) per codebook fit
griffin_lim_iters = 32            # mel_rvq decoding
DEFAULTS = configurator.settings(globals())
CHOICES = {"audio_tokenizer": ("mel_rvq", "encodec", "speechtokenizer", "mimi"),
           "image_tokenizer": ("patch_kmeans", "divae"), "audio_level1": T.MelRVQTokenizer.LEVEL1_MODES,
           "depth_norm": T.PatchKMeansTokenizer.DEPTH_NORMS, "audio_rvq_levels": (1, 2)}


def codes_arg(key, text):
    """'64x256' -> (64, 256)"""
    try:
        a, b = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise configurator.ConfigError(f"--{key}: expected MEANSxSHAPES like 64x256, got {text!r}") from None
    return a, b


def parse_args(argv=None):
    """The settings with argv applied -> a namespace; a bad setting exits with one line naming it."""
    try:
        cfg = configurator.apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv)
        configurator.check_choices(cfg, CHOICES)
        for m in IMAGE_MODALITIES:
            cfg[m[4:] + "_codes"] = codes_arg(m[4:] + "_codes", cfg[m[4:] + "_codes"])
    except configurator.ConfigError as e:
        raise SystemExit(f"tokenize_all.py: {e}") from None
    return types.SimpleNamespace(**cfg)


# ---------------------------------------------------------------------------------------------------
# reading one clip, refusing bad input with the clip named

def check_rows(rows, raw):
    """Refuse bad input before any work, from file headers only (cheap): every file present, 10 views with
    keyframe times, audio at a usable rate and at least one window long, images 224x224."""
    from PIL import Image
    for r in tqdm(rows, desc="checking raw clips", unit="clip", leave=False):
        cid = r["clip_id"]
        path = os.path.join(raw, r["audio"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"clip {cid}: audio file {path} missing")
        try:
            with wave.open(path, "rb") as w:
                sr, n = w.getframerate(), w.getnframes()
        except (wave.Error, EOFError) as e:
            raise ValueError(f"clip {cid}: {path} is not a readable PCM wav ({e})") from None
        rawdata.check_rate_and_length(cid, path, sr, n)
        times = r.get("keyframe_times")
        if not times or len(times) != M.NUM_VIEWS:
            raise ValueError(f"clip {cid}: keyframe_times must list {M.NUM_VIEWS} times, got {times!r}")
        for m, key in FILE_KEYS.items():
            paths = r.get(key)
            if not paths:
                raise ValueError(f"clip {cid}: no {key} in the manifest ({m} needs them; a source without "
                                 f"depth/normal maps cannot be tokenized for all five modalities)")
            if len(paths) != M.NUM_VIEWS:
                raise ValueError(f"clip {cid}: {len(paths)} {key}, expected {M.NUM_VIEWS}")
            for p in paths:
                path = os.path.join(raw, p)
                if not os.path.exists(path):
                    raise FileNotFoundError(f"clip {cid}: {key} file {path} missing")
                try:
                    with Image.open(path) as img:      # reads the header only
                        size = img.size
                except Exception as e:
                    raise ValueError(f"clip {cid}: {path} is not a readable image ({e})") from None
                if size != (T.IMAGE_SIZE, T.IMAGE_SIZE):
                    raise ValueError(f"clip {cid}: {path}: expected {T.IMAGE_SIZE}x{T.IMAGE_SIZE}, "
                                     f"got {size[0]}x{size[1]}")


def load_images(row, raw, modality):
    """10 views of one image modality: uint8 [10, 224, 224, 3] (rgb, normals) / uint16 [10, 224, 224]."""
    cid = row["clip_id"]
    out = []
    for p in row[FILE_KEYS[modality]]:
        try:
            a = rawdata.read_png(os.path.join(raw, p), size=T.IMAGE_SIZE)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"clip {cid}: {e}") from None
        if modality == "tok_depth" and a.dtype != np.uint16:
            raise ValueError(f"clip {cid}: {os.path.join(raw, p)} is not a 16-bit grayscale depth map")
        if modality != "tok_depth" and a.dtype != np.uint8:
            raise ValueError(f"clip {cid}: {os.path.join(raw, p)} is not an 8-bit RGB image")
        out.append(a)
    return np.stack(out)


def load_clip(row, raw):
    x = rawdata.load_audio(row, raw)
    clip = {"tok_audio": rawdata.audio_windows(x, row["keyframe_times"])}
    for m in IMAGE_MODALITIES:
        clip[m] = load_images(row, raw, m)
    return clip


# ---------------------------------------------------------------------------------------------------
# fitting the offline codebooks on the train split

def codebook_settings(args, modality, train_ids):
    s = {"seed": args.seed, "iters": args.kmeans_iters, "fit_clips": args.fit_clips,
         "fit_vectors": args.fit_vectors,
         "train_clips_sha1": hashlib.sha1("\n".join(train_ids).encode()).hexdigest()}
    if modality == "tok_audio":
        s.update(kind="mel_rvq", codes=args.audio_codes, level1=args.audio_level1)
        if args.audio_rvq_levels != 2:   # (older codebooks record none: 2)
            s.update(levels=args.audio_rvq_levels)
    else:
        s.update(kind="patch_kmeans", codes=list(getattr(args, modality[4:] + "_codes")))
        if modality == "tok_depth" and args.depth_norm != "image":   # (older codebooks record none: "image")
            s.update(depth_norm=args.depth_norm)
    return s


def fit_codebooks(args, rows, raw, tok_path, device):
    """Fit (or reuse) every offline codebook that the chosen tokenizers need. Returns {modality: tokenizer}."""
    need = []
    if args.audio_tokenizer == "mel_rvq":
        need.append("tok_audio")
    if args.image_tokenizer == "patch_kmeans":
        need += list(IMAGE_MODALITIES)
    train = [r for r in rows if r["split"] == "train"]
    if need and not train:
        raise ValueError("the manifest has no train clips to fit the offline codebooks on")
    train_ids = [r["clip_id"] for r in train]
    toks, todo = {}, []
    for m in need:
        path = os.path.join(tok_path, "codebooks", m + ".pt")
        want = codebook_settings(args, m, train_ids)
        if os.path.exists(path):
            try:
                d = files.load_torch_file(path)
            except files.UntrustedFileError as e:   # a codebook this script did not write as plain tensors: refit
                print(f"{e.args[0].split(':')[0]}: not loadable with weights_only=True; fitting it again")
                d = {}
            if d.get("settings", {}).get("fit") == want:
                cls = T.MelRVQTokenizer if m == "tok_audio" else T.PatchKMeansTokenizer
                toks[m] = cls.load(path, device)
                print(f"reusing {path}")
                continue
        todo.append(m)
    if not todo:
        return toks

    # read a seeded subsample of the train clips once, collecting each modality's vectors
    rng = np.random.default_rng(args.seed)
    pick = rng.permutation(len(train))[:args.fit_clips]
    vecs = {m: [] for m in todo}
    depth_stats = []
    helpers = {m: T.PatchKMeansTokenizer.helper(m, device) for m in todo if m != "tok_audio"}
    for i in tqdm(sorted(pick), desc="reading train clips for codebooks"):
        row = train[i]
        if "tok_audio" in todo:
            w = rawdata.audio_windows(rawdata.load_audio(row, raw), row["keyframe_times"])
            f = T.log_mel(torch.from_numpy(w).to(device))
            # frames and their level-1 keys side by side: the keys may look at earlier frames of the window
            keys = T.MelRVQTokenizer.level1_input(f, args.audio_level1)
            vecs["tok_audio"].append(torch.cat([f, keys], -1).reshape(-1, T.N_MELS + keys.shape[-1]).cpu())
        for m in helpers:
            v, stats = helpers[m].patch_vectors(load_images(row, raw, m))
            vecs[m].append(v.reshape(-1, v.shape[-1]).cpu())
            if stats is not None:
                depth_stats.append(torch.stack(stats, 1).cpu())
    for m in todo:
        x = torch.cat(vecs[m])
        ref = (0.0, 1.0)
        if m == "tok_depth":   # the train set's typical per-image mean and std of log depth
            s = torch.cat(depth_stats)                                       # [images, 2], in the order of x
            ref = (s[:, 0].median().item(), s[:, 1].median().item())
            if args.depth_norm == "global":   # each image's patches back to log depth, then one fixed scale
                per = s.repeat_interleave(len(x) // len(s), 0)
                x = T.PatchKMeansTokenizer.global_scale(x, per[:, :1], per[:, 1:], ref)
        g = torch.Generator().manual_seed(args.seed)
        x = x[torch.randperm(len(x), generator=g)[:args.fit_vectors]]
        fit = codebook_settings(args, m, train_ids)
        t0 = time.time()
        if m == "tok_audio":
            tok = T.MelRVQTokenizer.fit(x[:, :T.N_MELS], keys=x[:, T.N_MELS:], codes=args.audio_codes,
                                        iters=args.kmeans_iters, seed=args.seed, device=device, fit=fit,
                                        level1=args.audio_level1, levels=args.audio_rvq_levels,
                                        griffin_lim_iters=args.griffin_lim_iters)
            err = f"mse {tok.settings['mse_level1']:.3f} -> {tok.settings['mse_level2']:.3f}"
        else:
            extra = dict(depth_norm=args.depth_norm) if m == "tok_depth" else {}
            tok = T.PatchKMeansTokenizer.fit(m, x, *fit["codes"], iters=args.kmeans_iters, seed=args.seed,
                                             device=device, depth_ref=ref, fit=fit, **extra)
            err = f"mse {tok.settings['mse']:.4f}"
        print(f"fitted {m}: {fit['codes']} codes on {len(x)} vectors in {time.time() - t0:.1f}s "
              f"({err}, data variance {tok.settings['variance']:.3f})")
        tok.save(os.path.join(tok_path, "codebooks", m + ".pt"))
        toks[m] = tok
    return toks


def make_tokenizers(args, rows, raw, tok_path, device):
    toks = fit_codebooks(args, rows, raw, tok_path, device)
    if args.audio_tokenizer in ("encodec", "speechtokenizer", "mimi"):
        toks["tok_audio"] = T.TOKENIZER_KINDS[args.audio_tokenizer](device)
    if args.image_tokenizer == "divae":
        for m in IMAGE_MODALITIES:
            toks[m] = T.DivaeTokenizer(m, device)
    toks["caption"] = T.CaptionTokenizer()
    return toks


# ---------------------------------------------------------------------------------------------------
# writing one split, resumably

def run_signature(args, toks):
    """What must match for a partial split to be continued."""
    sig = {"audio": args.audio_tokenizer, "image": args.image_tokenizer}
    for m, tok in toks.items():
        sig[m] = tok.settings.get("fit", tok.settings)
    return json.loads(json.dumps(sig, sort_keys=True, default=str))


def tokenize_split(split, rows, class_names, raw, out, toks, args, signature):
    os.makedirs(out, exist_ok=True)
    n = len(rows)
    shapes = {m.name: ((n, M.NUM_VIEWS, m.length) if m.per_view else (n, m.length)) for m in M.MODALITIES}
    progress_path = os.path.join(out, "progress.json")
    finals = [os.path.join(out, m + ".bin") for m in shapes]
    clip_ids = [r["clip_id"] for r in rows]
    done = 0
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            prog = json.load(f)
        if prog.get("signature") == signature and prog.get("clip_ids") == clip_ids:
            done = prog["done"]
    if done == n and all(os.path.exists(p) for p in finals):
        print(f"{split}: {n} clips already tokenized")
        return 0
    partials = [os.path.join(out, m + ".bin.partial") for m in shapes]
    if not all(os.path.exists(p) for p in partials):
        done = 0
    if n == 0:  # np.memmap cannot map an empty file
        for p in partials:
            open(p, "wb").close()
    mode = "r+" if done > 0 else "w+"
    arrays = {m: np.memmap(p, dtype=np.uint16, mode=mode, shape=s) if n else None
              for (m, s), p in zip(shapes.items(), partials)}
    if done:
        print(f"{split}: resuming at clip {done}/{n}")
    stop_after = int(os.environ.get("NANO4M_TOKENIZE_STOP_AFTER", "0"))  # tests: simulate a kill
    encoded = 0
    bar = tqdm(total=n, initial=done, desc=f"tokenizing {split}", unit="clip")
    for start in range(done, n, args.batch_size):
        batch = rows[start:start + args.batch_size]
        clips = [load_clip(r, raw) for r in batch]
        B = len(batch)
        for m in M.MODALITIES:
            if m.name == "caption":
                ids = toks["caption"].encode([r.get("caption") or S.caption_text(r["class"]) for r in batch])
                arrays[m.name][start:start + B] = ids.cpu().numpy()
                continue
            x = np.concatenate([c[m.name] for c in clips])            # [B * 10, ...]
            ids = toks[m.name].encode(x).cpu().numpy()
            if ids.shape != (B * M.NUM_VIEWS, m.length) or ids.min() < 0 or ids.max() >= m.vocab:
                raise RuntimeError(f"{m.name}: tokenizer gave shape {ids.shape} / ids outside [0, {m.vocab})")
            arrays[m.name][start:start + B] = ids.reshape(B, M.NUM_VIEWS, m.length)
        for a in arrays.values():
            a.flush()
        # only once the rows are on disk does the progress file say so
        rawdata.write_json(progress_path, {"signature": signature, "clip_ids": clip_ids, "done": start + B}, indent=1)
        encoded += B
        bar.update(B)
        if stop_after and encoded // args.batch_size >= stop_after:
            print(f"stopping after {encoded} clips (NANO4M_TOKENIZE_STOP_AFTER)", flush=True)
            os._exit(3)
    bar.close()
    del arrays
    labels = np.array([class_names.index(r["class"]) for r in rows], dtype=np.uint16)
    with rawdata.atomic_write(os.path.join(out, "label.bin")) as tmp:
        labels.tofile(tmp)
    rawdata.write_json(os.path.join(out, "clip_ids.json"), clip_ids, indent=1)
    for m in shapes:
        os.replace(os.path.join(out, m + ".bin.partial"), os.path.join(out, m + ".bin"))
    print(f"{split}: encoded {encoded} clips")
    return encoded


def main(argv=None):
    args = parse_args(argv)
    device = T.pick_device(args.device)
    torch.manual_seed(args.seed)
    raw = rawdata.raw_dir(args.dataset, args.data_root)
    tok_path = M.tok_dir(args.dataset, args.data_root)
    rows = rawdata.read_manifest(os.path.join(raw, "manifest.jsonl"))
    if not rows:
        raise ValueError(f"{raw}/manifest.jsonl has no clips")
    seen = set()
    for r in rows:
        if r["clip_id"] in seen:
            raise ValueError(f"clip {r['clip_id']}: appears twice in {raw}/manifest.jsonl")
        seen.add(r["clip_id"])
    check_rows(rows, raw)
    class_names = sorted({r["class"] for r in rows})
    os.makedirs(tok_path, exist_ok=True)
    meta_path = os.path.join(tok_path, "meta.json")

    toks = make_tokenizers(args, rows, raw, tok_path, device)
    M.set_audio_layout(toks["tok_audio"].layout)   # the stream's shape: K codebooks x T frames of this tokenizer
    signature = run_signature(args, toks)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("signature") != signature:
            os.remove(meta_path)   # the arrays are about to change: the dataset is incomplete until the end

    t0 = time.time()
    splits = {}
    for split in rawdata.SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        splits[split] = len(split_rows)
        tokenize_split(split, split_rows, class_names, raw, os.path.join(tok_path, split), toks, args, signature)

    meta = {"dataset": args.dataset, "class_names": class_names, "num_views": M.NUM_VIEWS, "splits": splits,
            "modalities": {}, "signature": signature}
    for m in M.MODALITIES:
        kind = toks[m.name].kind
        info = {"shape": [M.NUM_VIEWS, m.length] if m.per_view else [m.length], "vocab": m.vocab,
                "tokenizer": kind,
                "codebook": f"codebooks/{m.name}.pt" if kind in ("mel_rvq", "patch_kmeans") else None}
        if kind in ("mel_rvq", "patch_kmeans"):
            info["codebook_size"] = toks[m.name].settings["codes"]
        if kind in ("divae", "speechtokenizer", "mimi"):    # the weights' commit, loaded again when decoding
            info["revision"] = toks[m.name].settings["revision"]
        if m.name == "caption":
            info["pad_id"] = M.CAPTION_PAD
        if m.name == "tok_audio":   # seq[K*t + k] = c[k, t] + k * V; modalities.load_meta reads it back
            info["layout"] = dataclasses.asdict(M.AUDIO_LAYOUT)
        meta["modalities"][m.name] = info
    rawdata.write_json(meta_path, meta, indent=1)
    print(f"wrote {tok_path} ({', '.join(f'{k}: {v}' for k, v in splits.items())} clips) "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"tokenize_all.py: error: {e}", file=sys.stderr)
        sys.exit(1)
