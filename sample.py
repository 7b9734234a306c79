"""
Any-to-any generation with a trained nano4M, decoded to wav / png / text, with an index.html gallery beside
the ground truth. The decoding itself (MaskGIT / ROAR) is generation.generate.

    python sample.py --mode=class_only                       # audio from the caption alone (the hardest case)
    python sample.py --mode=continuation                     # first 80% of the audio + rgb + caption given
    python sample.py --cond=rgb,caption --target=audio       # the general form
    python sample.py --cond=audio --target=rgb
    python sample.py --cond=rgb --target=depth --per_class=2 --num_samples=1
    python sample.py --cond=audio --target=caption

Every setting below can be overridden by a config file or --key=value (configurator.py); --help lists them.
"""
import html
import os
import sys
import time

import numpy as np
import torch

import configurator
import modalities as M
import streams as S
from generation import checkpoint_dataset, continuation_prefix, expected_patches, full_name, generate, patch_read_out
from files import write_json, write_npy, write_png, write_text, write_wav

# ---------------------------------------------------------------------------------------------------
# settings

out_dir = "out/toyzoo"      # checkpoint dir (default: the quickstart run): reads out_dir/ckpt.pt; its config names dataset / data_root
mode = ""                   # 'class_only' | 'continuation' | '' (then --cond / --target)
cond = "caption"            # comma list of conditioning modalities (rgb, depth, normal, audio, caption); '' = unconditional
target = "audio"
split = "test"
num_clips = 8               # clips drawn (seeded) from the split ...
per_class = 0               # ... or, if > 0, this many clips of every class (overrides num_clips)
view = 0                    # which of the 10 views (keyframe + its audio window) of each clip
num_samples = 2             # generations per clip
batch_size = 32
steps = 16                  # decoding steps
schedule = "maskgit"        # 'maskgit' (confidence-ranked), 'roar' (random order) or 'raster' (time order)
count_schedule = "cosine"   # 'cosine' or 'linear': how many positions stay masked after each step
temperature = 1.0
temperature_end = None      # anneal linearly to this over the steps (None = constant)
top_k = 0                   # 0 = off
top_p = 1.0                 # 1.0 = off
guidance_scale = 3.0        # classifier-free guidance; 1.0 = the conditional model alone (README: 3.0 helps class-only audio)
remask_noise = 0.0          # MaskGIT's annealed Gumbel noise on the confidences
read_out = "auto"           # 'mean': depth / normal (patch codebooks) as each cell's expected patch, one pass with
                            # every cell masked; 'shape_mode': its expected mean code with the likeliest shape code
                            # (sharper outlines); 'sample': MaskGIT; 'auto': what evaluate.py scores (depth
                            # shape_mode, normals mean; sample where the tokenizer has no patch vectors)
codebook_true = True        # audio: each slot samples only its own codebook's ids (False: all of the modality's ids)
by_level = False            # audio: one codebook level at a time (a model trained with train.py's --audio_levels)
continuation_frac = 0.8     # continuation: the fraction of the audio frames given
seed = 1337
device = "auto"             # 'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'
dtype = "float32"           # 'float32' or 'bfloat16' (autocast on CUDA)
samples_dir = ""            # default out_dir/samples/<mode or cond-target>/
dataset = ""                # '' = the checkpoint's
data_root = ""              # '' = the checkpoint's
trust_checkpoint = False    # True: also load a pickled checkpoint / codebook of your own (older runs); never
                            # someone else's, whose pickle could run code (the default is weights_only=True)
DEFAULTS = configurator.settings(globals())
GEN_KEYS = ("steps", "schedule", "count_schedule", "temperature", "temperature_end", "top_k", "top_p",
            "guidance_scale", "remask_noise", "codebook_true", "by_level")


# ---------------------------------------------------------------------------------------------------
# pictures and sounds for the gallery

# a small perceptual colormap (dark purple -> red -> yellow, roughly "inferno"), as RGB anchors
_CMAP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def colormap(x):
    """x in [0, 1], any shape -> uint8 [..., 3]."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float32)), 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_CMAP) - 2)
    w = (x - lo)[..., None]
    return ((1 - w) * _CMAP[lo] + w * _CMAP[lo + 1]).round().astype(np.uint8)


def spectrogram_image(wave, mark_frame=None, dynamic_range=10.0):
    """Waveform [T] at 24 kHz -> uint8 RGB picture of its log-mel spectrogram (time left to right, low
    frequencies at the bottom), the top `dynamic_range` nats of each clip shown (~43 dB). Uses the audio
    tokenizer's own front-end (modality_tokenizers.log_mel: 75 Hz frames, 80 mel bands). A white line at
    mark_frame shows where a continuation starts."""
    from modality_tokenizers import log_mel
    spec = log_mel(torch.as_tensor(np.asarray(wave, dtype=np.float32))).numpy().T[::-1]   # [80, frames]
    top = spec.max()
    img = colormap((spec - (top - dynamic_range)) / dynamic_range)
    img = np.repeat(img, 2, axis=0)                                                      # 160 px tall
    if mark_frame is not None and 0 < mark_frame < img.shape[1]:
        img[:, mark_frame] = 255
    return np.ascontiguousarray(img)


def depth_picture(depth):
    """uint16 depth [H, W] -> false-colour uint8 [H, W, 3] (near = bright), scaled per image between the
    2nd and 98th percentile of log depth."""
    d = np.log1p(np.asarray(depth, dtype=np.float32))
    lo, hi = np.percentile(d, 2), np.percentile(d, 98)
    return colormap(1.0 - (d - lo) / max(hi - lo, 1e-6))


class Gallery:
    """Writes one modality's decoded output (wav + spectrogram, png, or text) and returns the HTML cell."""

    def __init__(self, root):
        self.root = root

    def media(self, rel, modality, value, mark_frame=None, label=""):
        """value: float wave [T] (audio), uint8/uint16 image (rgb/depth/normal), str (caption)."""
        path = os.path.join(self.root, rel)
        cap = f"<div class='lbl'>{label}</div>" if label else ""
        if modality == "tok_audio":
            write_wav(path + ".wav", value)
            write_png(path + "_spec.png", spectrogram_image(value, mark_frame))
            return (f"{cap}<audio controls preload='none' src='{rel}.wav'></audio><br>"
                    f"<img class='spec' src='{rel}_spec.png'>")
        if modality == "caption":
            write_text(path + ".txt", value)
            return f"{cap}<div class='cap'>{html.escape(value)}</div>"
        if modality == "tok_depth":
            write_png(path + ".png", np.asarray(value, dtype=np.uint16))   # the 16-bit map itself
            write_png(path + "_vis.png", depth_picture(value))
            return f"{cap}<img src='{rel}_vis.png'>"
        write_png(path + ".png", np.asarray(value, dtype=np.uint8))
        return f"{cap}<img src='{rel}.png'>"




# ---------------------------------------------------------------------------------------------------
# the command line

def resolve_task(cfg):
    """-> (conditioning modality names, target name, number of given target tokens, run name)."""
    mode = cfg["mode"]
    if mode == "class_only":
        return ["caption"], "tok_audio", 0, "class_only"
    if mode == "continuation":
        if not 0.0 < cfg["continuation_frac"] < 1.0:
            raise ValueError(f"--continuation_frac must lie in (0, 1), got {cfg['continuation_frac']}")
        return ["tok_rgb", "caption"], "tok_audio", continuation_prefix(cfg["continuation_frac"]), "continuation"
    if mode:
        raise ValueError(f"--mode must be 'class_only', 'continuation' or '' (then --cond/--target), got {mode!r}")
    target = full_name(cfg["target"])
    cond = [full_name(c.strip()) for c in cfg["cond"].split(",") if c.strip()]
    if target in cond:
        raise ValueError(f"--target={cfg['target']} is also in --cond={cfg['cond']}")
    if len(set(cond)) != len(cond):
        raise ValueError(f"--cond={cfg['cond']} names a modality twice")
    short = {v: k for k, v in M.SHORT_NAMES.items()}
    name = ("+".join(short[c] for c in cond) or "nothing") + "-to-" + short[target]
    return cond, target, 0, name


def choose_clips(labels, num_classes, num_clips, per_class, seed):
    """Row indices into the split: a seeded shuffle, then either the first num_clips or the first
    per_class of every class. Returned sorted (sequential memmap reads)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if per_class > 0:
        picked = []
        for c in range(num_classes):
            picked += [int(i) for i in order if labels[i] == c][:per_class]
        return np.array(sorted(picked), dtype=np.int64)
    return np.sort(order[:num_clips])


def generate_all(model, tokens, cond, target, n_prefix, cfg, device, features=None, factors=None):
    """Every clip num_samples times, in batches, from one seeded generator -> LongTensor [N * S, L] on the CPU
    (clip i's samples in rows i * S .. i * S + S - 1) and the seconds it took. features [codes, D] given: each
    row's expected patches instead (read_out='mean'; factors: 'shape_mode'), Float [N * S, L, D]."""
    S, N, L = cfg["num_samples"], len(tokens[target]), M.BY_NAME[target].length
    rows = np.repeat(np.arange(N), S)
    generated = torch.zeros(N * S, L, *([] if features is None else [features.size(1)]),
                            dtype=torch.long if features is None else torch.float32)
    g = torch.Generator().manual_seed(cfg["seed"])
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    use_autocast = cfg["dtype"] != "float32" and device.startswith("cuda")
    from tqdm import tqdm
    t0 = time.time()
    for start in tqdm(range(0, N * S, cfg["batch_size"]), desc="generating", unit="batch"):
        r = rows[start:start + cfg["batch_size"]]
        known = torch.zeros(len(r), L, dtype=torch.bool)
        known[:, :n_prefix] = True
        with torch.autocast(device_type="cuda", dtype=ptdtype, enabled=use_autocast):
            if features is not None:
                out, _ = expected_patches(model, {c: tokens[c][r] for c in cond}, target, features, device, factors)
            else:
                out = generate(model, {c: tokens[c][r] for c in cond + [target]}, {target: known}, target,
                               generator=g, **{k: cfg[k] for k in GEN_KEYS})
        generated[start:start + len(r)] = out.cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return generated, time.time() - t0


class Decoder:
    """Token ids -> media (wave, image, text) with the dataset's tokenizers, and the raw files of a view."""

    def __init__(self, tok_path, meta, modalities, dataset, data_root, view, device, trust):
        from modality_tokenizers import load_tokenizer   # only when decoding: the tokenizers are a long read
        from rawdata import raw_dir, read_manifest   # the raw layout: only for the ground truth's raw files
        rdir = raw_dir(dataset, data_root)
        self.toks = {m: load_tokenizer(tok_path, meta, m, device, trust) for m in modalities if m != "caption"}
        self.rdir, self.view, self.device = rdir, view, device
        self.manifest = {}
        if os.path.exists(os.path.join(rdir, "manifest.jsonl")):
            self.manifest = {row["clip_id"]: row for row in read_manifest(os.path.join(rdir, "manifest.jsonl"))}
        else:
            print(f"note: {rdir}/manifest.jsonl not found: the gallery shows the tokenized ground truth only")

    def __call__(self, modality, ids):
        if modality == "caption":
            return [S.decode_caption(row) for row in ids.numpy()]
        tok, x = self.toks[modality], ids.to(self.device)
        return list(tok.decode_vectors(x) if x.is_floating_point() else tok.decode(x))   # floats: read_out='mean'

    def raw(self, clip_id, modality):
        """The raw file of this view (for audio: the very window tokenize_all.py tokenized), or None."""
        from rawdata import audio_windows, load_audio, read_png
        row = self.manifest.get(clip_id)
        try:
            if row is None:
                return None
            if modality == "tok_audio":
                return audio_windows(load_audio(row, self.rdir), row["keyframe_times"])[self.view]
            if modality == "caption":
                return row.get("caption")
            key = {"tok_rgb": "frames", "tok_depth": "depths", "tok_normal": "normals"}[modality]
            return read_png(os.path.join(self.rdir, row[key][self.view])) if row.get(key) else None
        except (FileNotFoundError, ValueError, KeyError, IndexError, TypeError) as e:
            print(f"note: raw ground truth of {clip_id} unavailable ({e})")
            return None


def clip_row(gallery, decode, i, cid, label, ids, tokens, cond, target, n_prefix, view):
    """One clip's gallery row: its conditioning (raw where the raw file is there), its generated samples, and
    the ground truth (tokenized, decoded with the same tokenizer, and raw)."""
    sub = f"{i:03d}_{''.join(ch if ch.isalnum() or ch in '-_.' else '_' for ch in str(cid))}"
    os.makedirs(os.path.join(gallery.root, sub), exist_ok=True)
    write_npy(os.path.join(gallery.root, sub, generated_name(ids)), as_saved(ids))
    L = M.BY_NAME[target].length
    mark = n_prefix // M.AUDIO_CODEBOOKS if n_prefix else None
    cells = []
    for c in cond:
        raw = decode.raw(cid, c) if c != "caption" else None
        value = raw if raw is not None else decode(c, tokens[c][i:i + 1])[0]
        cells.append(gallery.media(f"{sub}/cond_{c}", c, value, label="" if c == "caption" else
                                   "raw" if raw is not None else "tokens"))
    if n_prefix:
        cells.append(f"<div class='lbl'>+ first {n_prefix} of {L} audio tokens</div>")
    what = "expected patches" if ids.is_floating_point() else "sample"
    gen_cells = [gallery.media(f"{sub}/gen_{j}", target, v, mark, label=f"{what} {j}")
                 for j, v in enumerate(decode(target, ids))]
    gt_cells = [gallery.media(f"{sub}/gt_tokens", target, decode(target, tokens[target][i:i + 1])[0],
                              mark, label="tokenized")]
    raw = decode.raw(cid, target)
    if raw is not None:
        gt_cells.append(gallery.media(f"{sub}/gt_raw", target, raw, mark, label="raw"))
    return (f"<tr><td>{i}<br><b>{html.escape(label)}</b><br><small>{html.escape(cid)}<br>view {view}</small></td>"
            f"<td>{'<br>'.join(cells) or '(nothing)'}</td>"
            f"<td>{'<hr>'.join(gen_cells)}</td><td>{'<hr>'.join(gt_cells)}</td></tr>")


def generated_name(x):
    return "expected_patches.npy" if x.is_floating_point() else "generated_ids.npy"


def as_saved(x):
    return x.numpy().astype(np.float32 if x.is_floating_point() else np.int64)


def index_page(info, cfg, table_rows):
    t = info["task"]
    settings = ", ".join(f"{k}={cfg[k]}" for k in GEN_KEYS[:-1] + ("seed",))
    mark = "; the white line marks where generation starts" if t["given_target_tokens"] else ""
    N, S = len(info["clip_ids"]), cfg["num_samples"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>nano4M samples: {t['name']}</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}} img{{max-width:224px}} img.spec{{max-width:256px}}
.lbl{{font-size:80%;color:#555}} .cap{{font-family:monospace}}</style></head><body>
<h2>{t['name']}: {html.escape(t['target'])} from {html.escape(', '.join(t['cond']) or 'nothing')}</h2>
<p>checkpoint {html.escape(info['checkpoint'])} (iter {info['iter_num']}), dataset {html.escape(info['dataset'])},
split {info['split']}, {N} clips x {S} samples, {settings}.<br>{info['samples_per_s']:.2f} samples/s on {info['device']}.
Spectrograms: log-mel, 75 Hz frames, top 10 nats of each clip{mark}.</p>
<table><tr><th>clip</th><th>conditioning</th><th>generated</th><th>ground truth</th></tr>
{chr(10).join(table_rows)}
</table></body></html>
"""


def main(argv=None):
    from model import load_checkpoint
    cfg = configurator.apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv)
    cond, target, n_prefix, run_name = resolve_task(cfg)
    device = M.pick_device(cfg["device"])
    if cfg["num_samples"] < 1 or cfg["batch_size"] < 1 or cfg["steps"] < 1:
        raise ValueError("--num_samples, --batch_size and --steps must be >= 1")
    if cfg["read_out"] not in ("auto", "sample", "mean", "shape_mode"):
        raise ValueError(f"--read_out must be 'auto', 'sample', 'mean' or 'shape_mode', got {cfg['read_out']!r}")
    if not 0 <= cfg["view"] < M.NUM_VIEWS:
        raise ValueError(f"--view must lie in [0, {M.NUM_VIEWS}), got {cfg['view']}")

    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    model, ckpt = load_checkpoint(ckpt_path, device, cfg["trust_checkpoint"])
    dataset, data_root = checkpoint_dataset(ckpt, cfg["dataset"], cfg["data_root"], ckpt_path)
    tok_path, meta, arrays = M.open_tokenized(dataset, data_root, [cfg["split"]])
    arrays, class_names = arrays[cfg["split"]], meta["class_names"]
    clips = choose_clips(np.asarray(arrays["label"]), len(class_names), cfg["num_clips"], cfg["per_class"], cfg["seed"])
    if len(clips) == 0:
        raise ValueError(f"{tok_path}/{cfg['split']}: no clips chosen (num_clips / per_class)")
    tokens, labels = M.gather_views(arrays, clips, np.full(len(clips), cfg["view"]))
    clip_ids = [arrays["clip_ids"][i] for i in clips]
    samples_dir = cfg["samples_dir"] or os.path.join(cfg["out_dir"], "samples", run_name)
    os.makedirs(samples_dir, exist_ok=True)
    index_path = os.path.join(samples_dir, "index.html")
    if os.path.exists(index_path):
        os.remove(index_path)   # a run that dies half-way leaves no gallery pointing at mixed files

    decode = Decoder(tok_path, meta, cond + [target], dataset, data_root, cfg["view"], device,
                     cfg["trust_checkpoint"])
    read_out, features, factors = patch_read_out(cfg["read_out"], decode.toks.get(target), target)
    if read_out != "sample":
        if cfg["num_samples"] > 1:
            print(f"note: --read_out={cfg['read_out']} gives one map per clip (it draws nothing): --num_samples=1")
            cfg = {**cfg, "num_samples": 1}

    S, N, L = cfg["num_samples"], len(clips), M.BY_NAME[target].length
    how = f"read out as {read_out}" if features is not None else f"{cfg['schedule']} {cfg['steps']} steps"
    print(f"{run_name}: {N} clips x {S} samples of {target} from [{', '.join(cond) or 'nothing'}], "
          f"{how}, model {model.get_num_params() / 1e6:.1f}M params on {device}")
    generated, dt = generate_all(model, tokens, cond, target, n_prefix, cfg, device, features, factors)
    print(f"generated {N * S} samples in {dt:.2f}s: {N * S / dt:.2f} samples/s "
          f"({N * S * (L - n_prefix) / dt:.0f} tokens/s) on {device}")

    from tqdm import tqdm
    gallery, t1 = Gallery(samples_dir), time.time()
    table_rows = [clip_row(gallery, decode, i, clip_ids[i], class_names[int(labels[i])], generated[i * S:(i + 1) * S],
                           tokens, cond, target, n_prefix, cfg["view"])
                  for i in tqdm(range(N), desc="decoding", unit="clip")]
    print(f"decoded and wrote {N * (S + 1)} outputs in {time.time() - t1:.1f}s")

    # run-level records, then the gallery last
    write_npy(os.path.join(samples_dir, generated_name(generated)),
              as_saved(generated.view(N, S, *generated.shape[1:])))
    info = dict(settings=cfg, task=dict(cond=cond, target=target, given_target_tokens=n_prefix, name=run_name,
                                        read_out=read_out),
                checkpoint=ckpt_path, iter_num=ckpt.get("iter_num"),
                dataset=dataset, split=cfg["split"], clip_ids=clip_ids, rows=clips.tolist(),
                labels=[int(x) for x in labels], classes=[class_names[int(x)] for x in labels],
                samples_per_s=N * S / dt, device=device)
    write_json(os.path.join(samples_dir, "samples.json"), info, indent=1)
    write_text(index_path, index_page(info, cfg, table_rows))
    print(f"wrote {index_path}")
    return info


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"sample.py: {e}")
