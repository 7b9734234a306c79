"""
Every probe of the report, each printed beside its random baseline, written to one JSON and one HTML page.

    python evaluate.py --out_dir=out                        # all probes on the test split
    python evaluate.py --out_dir=out --probes=class,retrieval --gallery=50
    python evaluate.py --out_dir=out --split=val --num_clips=200 --device=cuda

Reads out_dir/ckpt.pt (the dataset and data_root recorded in its config locate the tokenized data) and
writes out_dir/eval/<split>/results.json and report.html (self-contained: inline SVG, PNG spectrograms and
wav players as data URIs).

Probes (--probes=all or a comma list):
  ce         per-modality eval cross-entropy, masking as in training (masking.build_batch, fixed seed),
             length-normalized per modality as in training. Baseline: log(vocab) (a uniform guess).
  entropy    empirical marginal entropy of the audio ids on the split, the cross-entropy of the split under
             the train split's marginal (a context-free predictor), and the gap to the model's audio CE.
  class      audio -> class: every class's caption, tokenized exactly as in training (with its end-of-text),
             scored by its summed log-likelihood given all 512 audio tokens; top-1/top-5, confusion matrix,
             per-class accuracy as a multiple of chance; also rgb -> class, the same captions given the
             picture (retrieval needs the class from both sides). Baseline: k / #classes.
  retrieval  audio -> rgb and rgb -> audio over a gallery (the first --gallery clips of the split taken
             round-robin over the classes, one seeded view each): score(q, c) = mean log-prob of c's whole
             target stream given q. R@1/5/10 and the curve R@k; also with each candidate's prior removed, and
             with both directions' prior-removed scores summed; through the class (each side's class
             posterior from the caption likelihoods, log sum_k p(k|a) p(k|r) / p(k)); and that pivot fused
             with the both-directions score (each standardised per query); and for whole clips, each
             pair's scores summed over --retrieval_views views (audio window v with frame v). Baseline: k / G.
             --reference_reader=True adds a diagnostic: the fused ranking with the rgb side's class posterior
             from a small reader fit to the train split's pictures (fit_grid_reader), not from the model.
  structure  rgb -> depth and rgb -> normal token top-1 (all 196 rgb tokens in, all 196 tokens out, the argmax
             at each), beside the train split's per-position majority token (the baseline to beat: it
             never sees the picture) and its single most frequent token. Then the same predictions decoded
             with the dataset's tokenizer against the decoded ground truth: depth RMSE, AbsRel and pixels
             within 1.25x; normal mean angular error and pixels within 11.25 degrees; each beside the
             per-position mean of decoded train maps (the one to beat) and a constant map.
  memo       audio-suffix completion top-1 (first 80% of the audio + rgb + caption in, last 20% out) on train
             vs split clips. Baselines: 1/2048, train-majority token, the per-position train majority,
             repeating the last given frame.
  generation class-only and continuation samples (sample.generate), decoded with the dataset's audio
             tokenizer and judged by a logistic regression on log-mel statistics fit to decoded train ground
             truth (not the model): class accuracy, diversity within a class and energy spread vs ground truth.
             A second judge reads only the frames' order (chirp rises and falls, rhythm): its ceiling is
             decoded ground truth, its floor the same frames shuffled in time.
             Class-only also at guidance 1 beside --gen_guidance (the report trained no unconditional model).
  fad        Frechet distance of generated vs ground-truth audio over clip-level embeddings (one log-mel
             statistics vector per clip), each with its n and a 95% jackknife interval, beside a real-vs-real
             floor at the same n (ground truth vs decoded train clips of the same classes); and CLAP (when
             transformers and its weights are present).
Where a figure is not defined as the report's (head, gallery size, number of classes, guidance), the report's
number is printed with how it differs, never as a like-for-like comparison.
  resnet     ImageNet ResNet-50 top-5 check of generated RGB (audio -> rgb, caption -> rgb), when torchvision
             and its weights are available.
Every figure carries its sample count and a 95% CI (Wilson for accuracies, normal approx / bootstrap for means,
jackknife for the Frechet distances).
The answer of a scorer is ranked with ties shared fairly: a tied correct answer counts as the expected hit
of a random tie-break, so a constant scorer scores exactly chance.
"""
import base64
import html
import io
import json
import math
import os
import sys
import time
import traceback

import numpy as np
import torch
from tqdm import tqdm

import modalities as M

# -----------------------------------------------------------------------------------------------------
# settings (override with --key=value, see configurator.py)
out_dir = 'out/toyzoo'          # the checkpoint dir to evaluate (default: the quickstart run)
split = 'test'
probes = 'all'
num_clips = 0            # 0 = every clip of the split; else the first num_clips (see clip_order)
gallery = 100            # retrieval gallery size G
structure_views = 2      # views per clip for rgb -> depth / normal (110 test clips x 2 = 220 images, 43k tokens)
structure_train_maps = 200  # decoded train maps behind the per-position mean map baseline
memo_clips = 0           # clips per side of the memorization probe (0 = as many as the eval set)
suffix_frac = 0.2        # the memorization probe / continuation predict this last fraction of the audio
gen_per_class = 2        # generation probes: clips (and class-only samples) per class
gen_steps = 16
gen_schedule = 'maskgit'
gen_temperature = 1.0
gen_guidance = 3.0       # classifier-free guidance scale, as sample.py's default (1.0 = conditional pass alone)
clf_per_class = 10       # decoded train clips per class for the offline audio classifier
class_views = 10         # class probe: also score this many views per clip (all 10: a tighter per-view figure
                         # and a whole-clip one); 1 = only the seeded view
retrieval_views = 10     # retrieval: also rank whole clips, each pair's scores summed over this many views
                         # (audio window v with frame v, as training pairs them); 1 = only the seeded view
reference_reader = False # retrieval: also rank with the rgb side's class read by a small reader fit to the
                         # train split's pictures instead of by the model (a diagnostic of what limits
                         # retrieval; fit on the CPU, ~4 min on 2 cores for ToyZoo's 8,800 train pictures)
reader_epochs = 4
batch_size = 32
ce_batches = 8           # ce probe: batches of batch_size masked (clip, view) draws
dataset = ''             # '' = the checkpoint's
data_root = ''           # '' = the checkpoint's
device = 'auto'          # auto = cuda if available
trust_checkpoint = False # True: also load a pickled checkpoint / codebook of your own (older runs); never someone
                         # else's, whose pickle could run code (the default is weights_only=True)
seed = 1337
audio_players = 1        # wav players (16 kHz) per class and setting in report.html (0 = none: smaller page)
resnet_weights = 'imagenet'  # 'imagenet' (torchvision's IMAGENET1K_V2, downloaded once) or 'random' (untrained:
                             # exercises the probe offline, figures meaningless)
REPORT = {  # the report's own figures, shown beside ours
    "audio_ce": 5.2, "audio_marginal_entropy": 6.2, "class_top1": 0.104, "class_top5": 0.484,
    "retrieval_r5": 0.045, "rgb_depth_top1": 0.11, "rgb_normal_top1": 0.18, "memo_train": 0.029,
    "memo_test": 0.041, "resnet_top5": 0.0, "energy_class_only": 0.75, "energy_continuation": 0.58,
}
ALL_PROBES = ("ce", "entropy", "class", "retrieval", "structure", "memo", "generation", "fad", "resnet")


# -----------------------------------------------------------------------------------------------------
# statistics (pure)

def wilson_ci(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n (k may be fractional: expected hits)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return (max(centre - half, 0.0), min(centre + half, 1.0))


def mean_ci(x, z=1.96):
    """(mean, lo, hi) with the normal approximation; nan bounds below 2 samples."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - z * se, m + z * se


def ratio_ci(sums, counts, z=1.96):
    """(sum(sums) / sum(counts), lo, hi): a token-weighted mean whose sampling units are rows (a row's tokens
    are not independent), with the ratio estimator's normal-approximation CI; nan bounds below 2 rows."""
    s, n = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    r = float(s.sum() / max(n.sum(), 1e-12))
    if len(s) < 2:
        return r, float("nan"), float("nan")
    se = math.sqrt(((s - r * n) ** 2).sum() / (len(s) * (len(s) - 1))) / max(n.mean(), 1e-12)
    return r, r - z * se, r + z * se


def clustered_accuracy(correct, valid=None, z=1.96):
    """Token accuracy over rows (images / clips) of correct [N, L]: (acc, lo, hi). Tokens of one row are not
    independent, so the CI treats rows as the sampling unit (ratio estimator, normal approx)."""
    c = np.asarray(correct, dtype=np.float64)
    v = np.ones_like(c) if valid is None else np.asarray(valid, dtype=np.float64)
    k, n = (c * v).sum(axis=1), v.sum(axis=1)
    w_lo, w_hi = wilson_ci(k.sum(), n.sum(), z)       # never narrower than the token-level Wilson interval
    acc, lo, hi = ratio_ci(k, n, z)
    if len(k) < 2:
        return acc, w_lo, w_hi
    return acc, min(max(lo, 0.0), w_lo), max(min(hi, 1.0), w_hi)


def bootstrap_ci(stat, sizes, reps=200, seed=0):
    """95% percentile interval of stat(*index_arrays) over resampled index arrays, one per set size."""
    rng = np.random.default_rng(seed)
    vals = [stat(*[rng.integers(0, n, n) for n in sizes]) for _ in range(reps)]
    vals = np.asarray([v for v in vals if np.isfinite(v)])
    if len(vals) == 0:
        return float("nan"), float("nan")
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def jackknife_ci(stat, n, z=1.96):
    """(stat(all), lo, hi): the normal interval with the leave-one-out jackknife's standard error, stat taking
    an index array into n rows. For statistics that a bootstrap's repeated rows bias, such as the Frechet
    distance (its percentile interval missed its point: continuation 58.9 [66.0, 248.0] on 22 clips)."""
    idx = np.arange(n)
    point = float(stat(idx))
    if n < 2:
        return point, float("nan"), float("nan")
    vals = np.array([stat(np.delete(idx, i)) for i in range(n)], dtype=np.float64)
    se = math.sqrt((n - 1) / n * ((vals - vals.mean()) ** 2).sum())
    return point, point - z * se, point + z * se


def marginal_entropy(ids, vocab):
    """Plug-in entropy (nats) of the empirical distribution of ids over [0, vocab)."""
    counts = np.bincount(np.asarray(ids).reshape(-1).astype(np.int64), minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def entropy_bias_corrected(rows, vocab, reps=50, seed=0):
    """(entropy, lo, hi) of the ids of rows [N, L] with the plug-in's bias removed: resampled rows repeat, so
    their plug-in entropy falls short of the sample's by about as much as the sample's falls short of the
    population's. The basic bootstrap interval [2 h - q97.5, 2 h - q2.5] carries the same correction."""
    h = marginal_entropy(rows, vocab)
    rng = np.random.default_rng(seed)
    boot = np.array([marginal_entropy(rows[rng.integers(0, len(rows), len(rows))], vocab) for _ in range(reps)])
    return 2 * h - float(boot.mean()), 2 * h - float(np.percentile(boot, 97.5)), 2 * h - float(np.percentile(boot, 2.5))


def cross_entropy_to_marginal(ids, ref_ids, vocab, smoothing=0.5):
    """Mean -log p_ref(id) of ids under the (add-`smoothing`) empirical marginal of ref_ids."""
    ref = np.bincount(np.asarray(ref_ids).reshape(-1).astype(np.int64), minlength=vocab) + smoothing
    logp = np.log(ref / ref.sum())
    return float(-logp[np.asarray(ids).reshape(-1).astype(np.int64)].mean())


# -----------------------------------------------------------------------------------------------------
# ranking probes on score matrices (pure: any scorer, model or fixture)

def fair_hits(scores, correct, ks):
    """scores [N, C] (higher = better), correct [N] -> expected hit@k [N, len(ks)] under a uniformly random
    tie-break: with g strictly better candidates and e others tied with the answer, hit@k =
    clip((k - g) / (e + 1), 0, 1). A constant scorer therefore gets exactly k / C, never a lucky 100%."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    own = s[np.arange(len(s)), correct][:, None]
    better = (s > own).sum(axis=1)
    ties = (s == own).sum(axis=1) - 1
    ks = np.asarray(ks, dtype=np.float64)[None, :]
    return np.clip((ks - better[:, None]) / (ties[:, None] + 1), 0.0, 1.0)


def predict_fair(scores, rng):
    """argmax per row with ties broken uniformly at random (for the confusion matrix)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    top = s == s.max(axis=1, keepdims=True)
    return np.array([rng.choice(np.flatnonzero(row)) for row in top], dtype=np.int64)


def classification_metrics(scores, labels, class_names, ks=(1, 5), seed=0):
    """scores [N, C] of each class hypothesis per sample -> top-k with CIs, confusion, per-class accuracy."""
    labels = np.asarray(labels, dtype=np.int64)
    C = len(class_names)
    ks = tuple(k for k in ks if k <= C)
    hits = fair_hits(scores, labels, ks)
    out = {"n": int(len(labels)), "num_classes": C}
    for j, k in enumerate(ks):
        acc = float(hits[:, j].mean())
        out[f"top{k}"] = {"value": acc, "ci": wilson_ci(hits[:, j].sum(), len(labels)), "chance": k / C}
    pred = predict_fair(scores, np.random.default_rng(seed))
    conf = np.zeros((C, C), dtype=np.int64)
    np.add.at(conf, (labels, pred), 1)
    out["confusion"] = conf.tolist()
    per = {}
    for c, name in enumerate(class_names):
        sel = labels == c
        if sel.any():
            acc = float(hits[sel, 0].mean())
            per[name] = {"n": int(sel.sum()), "top1": acc, "ci": wilson_ci(hits[sel, 0].sum(), int(sel.sum())),
                         "x_chance": acc * C}
    out["per_class"] = per
    return out


def recall_curve(scores):
    """scores [G, G], scores[i, j] = score(query i, candidate j), the answer on the diagonal ->
    expected R@k for k = 1..G (fair ties) and the per-query hits [G, G]."""
    G = len(scores)
    hits = fair_hits(scores, np.arange(G), np.arange(1, G + 1))
    return hits.mean(axis=0), hits


def retrieval_metrics(scores, ks=(1, 5, 10)):
    G = len(scores)
    curve, hits = recall_curve(scores)
    out = {"gallery": G, "curve": curve.tolist()}
    for k in ks:
        if k <= G:
            out[f"R@{k}"] = {"value": float(curve[k - 1]), "ci": wilson_ci(hits[:, k - 1].sum(), G),
                             "chance": k / G}
    return out


def class_level_retrieval(scores, labels, ks=(1, 5, 10)):
    """What a retrieval score matrix knows of the class alone. top1_same_class: how often the best candidate
    (ties shared fairly) is of the query's class, against the chance of drawing one. class_only_ceiling: the
    R@k of a scorer that knows the class perfectly and nothing else (min(1, k / same-class candidates)): an
    R@k above it needs the very clip, not only its class. class_effect / clip_effect: see below (given when
    every score is finite)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    labels = np.asarray(labels)
    G = len(s)
    same = labels[:, None] == labels[None, :]
    top = s == s.max(axis=1, keepdims=True)
    hit = (top & same).sum(axis=1) / top.sum(axis=1)
    n_same = same.sum(axis=1)
    # how far the score moves with the class and with the very clip, in its own units (nats per token for
    # the model's scores), once each query's and each candidate's own level is removed (double centring);
    # beside the spread of unrelated pairs, the noise that a class or clip effect must stand out of
    c = s - s.mean(axis=1, keepdims=True) - s.mean(axis=0, keepdims=True) + s.mean()
    eye = np.eye(G, dtype=bool)
    effects = {}
    if np.isfinite(s).all() and (same & ~eye).any() and (~same).any():
        effects = {"class_effect": float(c[same & ~eye].mean() - c[~same].mean()),
                   "clip_effect": float(c[eye].mean() - c[same & ~eye].mean()),
                   "other_class_sd": float(c[~same].std())}
    return {"top1_same_class": {"value": float(hit.mean()), "ci": wilson_ci(hit.sum(), G),
                                "chance": float((n_same / G).mean())},
            "class_only_ceiling": {f"R@{k}": float(np.minimum(1.0, k / n_same).mean()) for k in ks if k <= G},
            **effects}


def class_pivot_scores(logp_q, logp_c):
    """Retrieval through the class: how well two clips agree on it, log sum_k p(k|q) p(k|c) / p(k), from each
    side's class posterior (logp_q [Q, C], logp_c [G, C]: log-likelihoods of the class captions; softmax over
    classes with a uniform prior, p(k) = 1/C). It is the pointwise mutual information of the pair when the
    two sides share only the class: log C for a confident agreement, very negative for a confident clash."""
    lq = torch.log_softmax(torch.as_tensor(logp_q, dtype=torch.float64), dim=1)
    lc = torch.log_softmax(torch.as_tensor(logp_c, dtype=torch.float64), dim=1)
    return (torch.logsumexp(lq[:, None, :] + lc[None, :, :], dim=2) + math.log(lq.shape[1])).numpy()


def fuse_scores(*scores):
    """Sum of score matrices [Q, G], each standardised per query row first (mean 0, sd 1 over its
    candidates), so that a score in nats per token and one in nats per pair weigh alike without a weight
    tuned on the gallery. A row with no spread contributes nothing."""
    out = 0.0
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        sd = s.std(axis=1, keepdims=True)
        out = out + (s - s.mean(axis=1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
    return out


def token_histograms(ids, vocab):
    """ids [N, L] -> float [N, vocab]: each row's share of every id (a bag of tokens)."""
    ids = np.asarray(ids, dtype=np.int64)
    h = np.zeros((len(ids), vocab))
    np.add.at(h, (np.arange(len(ids))[:, None], ids), 1.0)
    return h / max(ids.shape[1], 1)


def fit_token_judge(ids, labels, num_classes, vocab):
    """A judge that is not the model under test and needs no decoder: multinomial logistic regression on the
    token histograms of ground-truth clips. Returns a function ids [N, L] -> predicted class [N]."""
    from audio_features import fit_logreg, predict_proba
    clf = fit_logreg(token_histograms(ids, vocab), labels, num_classes)
    return lambda x: predict_proba(clf, token_histograms(x, vocab)).argmax(1)


def fit_grid_reader(ids, labels, num_classes, vocab, features=None, epochs=4, width=128, lr=1e-3, seed=0,
                    desc="reader"):
    """A reader of the class in an image grid that is not the model under test (the retrieval probe's
    diagnostic): each id read as its tokenizer's vector (standardised; a learnt row per id where the tokenizer
    has none), two 3x3 convolutions over the 14x14 grid, two pre-norm transformer layers, mean-pooled, linear.
    Fit to (ids [N, 196], labels [N]) with AdamW and a cosine schedule; the global torch RNG is left as found.
    Returns a function ids [n, 196] -> class log-probs [n, C] (numpy). Why convolutions: fit to ToyZoo's 8,800
    train pictures (4 epochs, a scratch run), the two transformer layers alone name the class of a test
    picture 40.6% of the time, with the convolutions in front 59.7%."""
    import torch.nn as nn
    import torch.nn.functional as F
    W, G = width, M.GRID
    table = None                    # the standardised vector of each id, when the tokenizer gives them
    if features is not None:
        table = torch.zeros(vocab, features.shape[1])
        table[:len(features)] = features.float()
        used = table.abs().sum(1) > 0
        mu, sd = table[used].mean(0), table[used].std(0).clamp_min(1e-6)
        table = torch.where(used[:, None], (table - mu) / sd, 0.0)

    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, W) if table is None else nn.Linear(table.shape[1], W)
            self.pos = nn.Parameter(torch.randn(G * G, W) * 0.02)
            self.conv = nn.Sequential(nn.Conv2d(W, W, 3, padding=1), nn.GELU(), nn.Conv2d(W, W, 3, padding=1))
            layer = nn.TransformerEncoderLayer(W, 2, 4 * W, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.ln, self.head = nn.LayerNorm(W), nn.Linear(W, num_classes)

        def forward(self, x):
            e = self.embed(x if table is None else table[x])
            g = e.view(-1, G, G, W).permute(0, 3, 1, 2)
            e = e + self.conv(g).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.ln(self.blocks(e)).mean(1))

    x = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(len(ids), G * G)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = Reader()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
        gen = torch.Generator().manual_seed(seed)
        steps = epochs * math.ceil(len(x) / 64)
        warm = min(100, steps // 10 + 1)
        k = 0
        for _ in tqdm(range(epochs), desc=desc, leave=False):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                for group in opt.param_groups:
                    group["lr"] = lr * min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * k / steps))
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                k += 1
    net.eval()

    @torch.no_grad()
    def read(q):
        q = torch.as_tensor(np.asarray(q), dtype=torch.long).reshape(len(q), G * G)
        return torch.cat([F.log_softmax(net(b), -1) for b in q.split(256)]).numpy()
    return read


# -----------------------------------------------------------------------------------------------------
# caption hypotheses: the exact tokenized caption of each class, as training saw it

def caption_hypotheses(class_names):
    """-> list of int arrays: each class's caption as training scores it, modalities.encode_caption(
    caption_text(c)) with its trailing padding (after the first end-of-text) set to M.IGNORE_ID: queried,
    not scored (modalities.caption_scored). Two classes with identical ids are an error."""
    hyps = []
    for c in class_names:
        ids = torch.from_numpy(M.encode_caption(M.caption_text(c)))
        hyps.append(M.caption_targets(ids).numpy().astype(np.int64))
    seen = {}
    for c, h in zip(class_names, hyps):
        key = tuple(h.tolist())
        if key in seen:
            raise ValueError(f"classes {seen[key]!r} and {c!r} tokenize to the same caption: cannot tell apart")
        seen[key] = c
    return hyps


def caption_class_scores(score_fn, class_names):
    """scores [N, C]: score_fn(length, hyp_ids [H, length]) -> [N, H] summed log-probs of each hypothesis
    given each sample's input, with the decoder queried at caption positions 0..length-1. Hypotheses of equal
    length share one call (the decoder sees target positions, never target ids). Classes are matched by index."""
    hyps = caption_hypotheses(class_names)
    by_len = {}
    for c, h in enumerate(hyps):
        by_len.setdefault(len(h), []).append(c)
    scores = None
    for length, cls in sorted(by_len.items()):
        s = np.asarray(score_fn(length, np.stack([hyps[c] for c in cls])))
        if scores is None:
            scores = np.full((s.shape[0], len(class_names)), np.nan)
        scores[:, cls] = s
    return scores


# -----------------------------------------------------------------------------------------------------
# model adapters: the only code that calls the network

def positions(name, idx=None):
    """Global positions of a modality's stream indices (all when idx is None)."""
    m = M.modality_index(name)
    idx = torch.arange(M.MODALITIES[m].length) if idx is None else torch.as_tensor(idx)
    return M.POS_OFFSETS[m] + idx


def _flat_inputs(inputs, device):
    """inputs: {name: (ids Long [B, L], given Bool [B, L])} -> packed enc_ids, enc_pos, enc_valid."""
    from sample import pack
    ids, pos, given = [], [], []
    for name, (x, g) in inputs.items():
        x, g = x.to(device).long(), g.to(device).bool()
        if name == "caption":
            g = g & M.caption_valid(x)
        ids.append(x)
        pos.append(positions(name).to(device).expand_as(x))
        given.append(g)
    valid, _, (e_ids, e_pos) = pack(torch.cat(given, 1), torch.cat(ids, 1), torch.cat(pos, 1))
    return e_ids, e_pos, valid


@torch.no_grad()
def iter_target_logits(model, inputs, target, target_idx, device, bs):
    """Yields (start, end, logits float32 [b, n_t, vocab_target]) for row chunks of the inputs, the decoder
    queried at the stream indices target_idx of modality `target` (the same for every row)."""
    t = M.modality_index(target)
    vocab = M.MODALITIES[t].vocab
    target_idx = torch.as_tensor(target_idx)
    n_t = len(target_idx)
    B = next(iter(inputs.values()))[0].size(0)
    bs = max(1, min(bs, (1 << 25) // max(n_t * vocab, 1)))   # keep a chunk's logits <= 128 MB
    for s in range(0, B, bs):
        e = min(s + bs, B)
        chunk = {k: (x[s:e], g[s:e]) for k, (x, g) in inputs.items()}
        e_ids, e_pos, e_valid = _flat_inputs(chunk, device)
        d_pos = positions(target, target_idx).to(device).expand(e - s, n_t)
        d_valid = torch.ones_like(d_pos, dtype=torch.bool)
        h = model.decode_hidden(e_ids, e_pos, e_valid, d_pos, d_valid)
        yield s, e, model.modality_logits(h, t).float()


def score_hypotheses(model, inputs, target, target_idx, hyp_ids, device, bs, reduce="sum", desc=None):
    """[B, H] log-likelihood of each hypothesis hyp_ids [H, n_t] (ids at target_idx) given each row's input;
    positions where a hypothesis holds M.IGNORE_ID are queried but not scored (reduce="mean" averages over
    the scored ones). One decoder pass per row scores all H hypotheses (the decoder never sees target ids)."""
    hyp = torch.as_tensor(np.asarray(hyp_ids), dtype=torch.long, device=device)       # [H, n_t]
    B = next(iter(inputs.values()))[0].size(0)
    out = np.zeros((B, hyp.size(0)))
    cols = torch.arange(hyp.size(1), device=device)[None, :]
    scored, hyp = (hyp >= 0).float(), hyp.clamp_min(0)                                # [H, n_t]
    for s, e, logits in tqdm(iter_target_logits(model, inputs, target, target_idx, device, bs),
                             desc=desc, disable=desc is None, leave=False):
        logp = torch.log_softmax(logits, dim=-1)                                     # [b, n_t, V]
        per = logp[:, cols, hyp] * scored                                            # [b, H, n_t]
        red = per.sum(-1) if reduce == "sum" else per.sum(-1) / scored.sum(-1)
        out[s:e] = red.double().cpu().numpy()
    return out


def argmax_ids(model, inputs, target, target_idx, device, bs, desc=None):
    """Long [B, n_t]: the decoder's argmax id at each target position (one pass, every target masked)."""
    B = next(iter(inputs.values()))[0].size(0)
    out = torch.zeros(B, len(target_idx), dtype=torch.long)
    for s, e, logits in tqdm(iter_target_logits(model, inputs, target, target_idx, device, bs),
                             desc=desc, disable=desc is None, leave=False):
        out[s:e] = logits.argmax(-1).cpu()
    return out


def argmax_correct(model, inputs, target, target_idx, true_ids, device, bs, desc=None):
    """Bool [B, n_t]: is the decoder's argmax at each target position the true id?"""
    pred = argmax_ids(model, inputs, target, target_idx, device, bs, desc)
    return (pred == torch.as_tensor(true_ids).long()).numpy()


# -----------------------------------------------------------------------------------------------------
# the evaluation context: data, selections, the table of figures

def seeded_views(n, salt, seed):
    """A reproducible view per clip."""
    return np.random.default_rng([seed, salt]).integers(0, M.NUM_VIEWS, n)


def clip_order(arrays):
    """Row indices of a split in the documented selection order: round-robin over the classes, each class
    in clip_id order (the 1st clip of every class, then the 2nd, ...). So the first N clips of a split (a
    --num_clips subset, the retrieval gallery) hold every class about equally; clip_id order alone would
    take the first classes of the alphabet only."""
    ids, labels = arrays["clip_ids"], np.asarray(arrays["label"])
    by_id = sorted(range(len(ids)), key=lambda i: ids[i])
    rank, seen = {}, {}
    for i in by_id:
        rank[i] = seen.get(labels[i], 0)
        seen[labels[i]] = rank[i] + 1
    return np.array(sorted(by_id, key=lambda i: (rank[i], labels[i])), dtype=np.int64)


def add_row(ctx, probe, metric, value, ci=None, n=None, random=None, random_name="", report=None, unit="%",
            extra=None, differs=None):
    """One line of the summary table, printed with its baseline. differs: how this figure's definition differs
    from the report's (head, gallery size, guidance, classes), said beside the report's number so it is never
    read as a like-for-like comparison; None when it is measured the report's way."""
    row = {"probe": probe, "metric": metric, "model": value, "ci": list(ci) if ci is not None else None,
           "n": n, "random": random, "random_name": random_name, "report": report, "unit": unit,
           "report_differs": differs if report is not None else None}
    if extra:
        row.update(extra)
    ctx["table"].append(row)
    f = (lambda v: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v))
         else (f"{100 * v:.1f}%" if unit == "%" else f"{v:.3f}"))
    cis = f" [{f(ci[0])}, {f(ci[1])}]" if ci is not None else ""
    rep = f" | report {f(report)}" if report is not None else ""
    if report is not None and differs:
        rep += f" (not comparable: {differs})"
    print(f"  {metric:<42s} model {f(value)}{cis} (n={n}) | {random_name or 'random'} {f(random)}{rep}")


REPORT_CLASSES, REPORT_GALLERY = 11, 200   # the report's 11 classes (chance 9.1%); R@5 chance 2.5% = 5 / 200


def head_differs(ctx):
    """How this model's CE differs from the report's (None when it trained the report's head)."""
    if getattr(ctx["model"].config, "head", "modality") == "full":
        return None
    return ("the report's CE is over one softmax of all 50,304 ids; this model's head (head='modality') scores "
            "each token over its own modality's ids only (audio: 2,048), a smaller figure for the same fit")


def classes_differ(ctx):
    C = len(ctx["class_names"])
    return None if C == REPORT_CLASSES else f"{C} classes here (chance {100 / C:.1f}%), the report's 11 (9.1%)"


def tokens_of(ctx, split_name, clips, views):
    arrays = ctx["arrays"][split_name]
    tokens, labels = M.gather_views(arrays, clips, views)
    return tokens, labels.numpy()


def all_given(x):
    return torch.ones_like(x, dtype=torch.bool)


# -----------------------------------------------------------------------------------------------------
# the probes (each returns a JSON-able dict; figures go to the table via add_row)

def probe_ce(ctx):
    import masking
    mcfg = masking.MaskingConfig.from_settings(ctx["ckpt"].get("config", {}))   # grouped or (older) flat
    gen = torch.Generator().manual_seed(ctx["seed"] + 7919)
    rng = np.random.default_rng([ctx["seed"], 11])
    clips_all = ctx["eval_clips"]
    sums = {n: 0.0 for n in M.MODALITY_NAMES}
    counts = {n: 0 for n in M.MODALITY_NAMES}
    per_sample = {n: [] for n in M.MODALITY_NAMES}
    model, device = ctx["model"], ctx["device"]
    for _ in tqdm(range(ctx["ce_batches"]), desc="ce", leave=False):
        idx = rng.integers(0, len(clips_all), ctx["batch_size"])
        clips, views = clips_all[idx], rng.integers(0, M.NUM_VIEWS, len(idx))
        tokens, _ = tokens_of(ctx, ctx["split"], clips, views)
        b = masking.build_batch(tokens, mcfg, gen)
        b = {k: v.to(device) for k, v in b.items()}
        with torch.no_grad():
            h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
            mod = M.position_modality(b["dec_pos"])
            for m, name in enumerate(M.MODALITY_NAMES):
                sel = b["dec_valid"] & (mod == m) & (b["dec_ids"] >= 0)   # scored targets, as in training
                if not sel.any():
                    continue
                if getattr(model.config, "head", "modality") == "full":   # as trained: over every row
                    logits = h[sel].float() @ model.lm_head.weight.float().t()
                    target = b["dec_ids"][sel] + model.row_offset[m]
                else:
                    logits, target = model.modality_logits(h[sel], m), b["dec_ids"][sel]
                ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").double()
                rows = sel.nonzero()[:, 0]
                sums[name] += float(ce.sum())
                counts[name] += int(ce.numel())
                row_sum = torch.zeros(sel.size(0), dtype=torch.float64, device=device).index_add_(0, rows, ce)
                row_n = torch.bincount(rows, minlength=sel.size(0))
                per_sample[name] += list(zip(row_sum[row_n > 0].cpu().tolist(), row_n[row_n > 0].cpu().tolist()))
    out = {"masking": "masking.build_batch with the checkpoint's masking settings, generator seed "
                      f"{ctx['seed'] + 7919}; {ctx['ce_batches']} batches of {ctx['batch_size']} (clip, view) draws",
           "per_modality": {}}
    for m in M.MODALITIES:
        if counts[m.name] == 0:
            continue
        ce = sums[m.name] / counts[m.name]
        # the CI of the same token-weighted mean over (clip, view) rows (the mean of per-row means is another
        # figure: its interval used to miss the point, e.g. normals 4.43 [3.20, 4.16])
        _, lo, hi = ratio_ci(*zip(*per_sample[m.name]))
        # a uniform guess over the ids the CE is taken over: the modality's own, or every row (head='full')
        full = getattr(model.config, "head", "modality") == "full"
        uniform = math.log(model.lm_head.weight.shape[0] if full else m.vocab)
        out["per_modality"][m.name] = {"ce": ce, "ci": [lo, hi], "n_tokens": counts[m.name],
                                       "n_samples": len(per_sample[m.name]), "uniform": uniform}
        rep = REPORT["audio_ce"] if m.name == "tok_audio" else None
        add_row(ctx, "ce", f"eval CE {m.name} (nats)", ce, (lo, hi), counts[m.name], uniform,
                "log(all ids)" if full else "log(vocab)", rep, unit="nats", differs=head_differs(ctx))
    return out


def probe_entropy(ctx):
    V = M.BY_NAME["tok_audio"].vocab
    a = np.asarray(ctx["arrays"][ctx["split"]]["tok_audio"][ctx["eval_clips"]]).reshape(len(ctx["eval_clips"]), -1)
    h = marginal_entropy(a, V)
    # The plug-in falls with fewer clips (default test split: 27 clips 6.83, 55 7.00, all 110 7.10; the 880
    # train clips 7.24). The report's figure is a plug-in, so it stays the headline and the gap's reference;
    # the corrected value comes beside it. (A percentile interval, [6.94, 7.05], excluded the point itself.)
    corrected, lo, hi = entropy_bias_corrected(a, V, seed=ctx["seed"])
    out = {"marginal_entropy": h, "bias_corrected": corrected, "bias_corrected_ci": [lo, hi],
           "n_tokens": int(a.size), "n_clips": len(a), "log_vocab": math.log(V)}
    add_row(ctx, "entropy", "audio marginal entropy, plug-in on the split (nats)", h, None, int(a.size),
            math.log(V), f"log {V}", REPORT["audio_marginal_entropy"], unit="nats")
    add_row(ctx, "entropy", "... bootstrap bias-corrected (nats)", corrected, (lo, hi), int(a.size),
            math.log(V), f"log {V}", None, unit="nats")
    if "train" in ctx["arrays"] and ctx["split"] != "train":
        tr = np.asarray(ctx["arrays"]["train"]["tok_audio"])
        xe = cross_entropy_to_marginal(a, tr, V)
        out["ce_under_train_marginal"] = xe
        add_row(ctx, "entropy", "audio CE of a train-marginal predictor", xe, None, int(a.size), math.log(V),
                f"log {V}", None, unit="nats")
    ce = ctx["results"].get("ce", {}).get("per_modality", {}).get("tok_audio")
    if ce:
        gap = h - ce["ce"]
        out["conditional_gap"] = gap
        add_row(ctx, "entropy", "conditional gap: entropy - audio CE (nats)", gap,
                (h - ce["ci"][1], h - ce["ci"][0]), ce["n_tokens"], 0.0, "no structure",
                REPORT["audio_marginal_entropy"] - REPORT["audio_ce"], unit="nats", differs=head_differs(ctx))
    else:
        out["conditional_gap"] = None
        out["note"] = "run the ce probe too for the conditional gap"
    return out


def token_judge(ctx):
    """fit_token_judge on the audio ids of every train clip, one seeded view each (cached per evaluation)."""
    if "token_judge" not in ctx:
        src = "train" if "train" in ctx["arrays"] else ctx["split"]
        arrays = ctx["arrays"][src]
        clips = clip_order(arrays)
        tokens, y = tokens_of(ctx, src, clips, seeded_views(len(arrays["label"]), 3, ctx["seed"])[clips])
        judge = fit_token_judge(tokens["tok_audio"].numpy(), y, len(ctx["class_names"]), M.BY_NAME["tok_audio"].vocab)
        ctx["token_judge"] = (judge, f"logistic regression on audio token histograms of {len(y)} {src} clips "
                                     "(one view each)")
    return ctx["token_judge"]


def class_scores(ctx, ids, names, source="tok_audio"):
    """[N, C] log-likelihood of each class's caption given each row of the source's ids [N, length]."""
    inputs = {source: (ids, all_given(ids))}

    def score_fn(length, hyp_ids):
        return score_hypotheses(ctx["model"], inputs, "caption", np.arange(length), hyp_ids, ctx["device"],
                                ctx["batch_size"], reduce="sum", desc=f"class from {source} (caption length {length})")

    return caption_class_scores(score_fn, names)


def probe_class(ctx):
    clips, views = ctx["eval_clips"], ctx["eval_views"]
    tokens, labels = tokens_of(ctx, ctx["split"], clips, views)
    names = ctx["class_names"]
    scores = class_scores(ctx, tokens["tok_audio"], names)
    out = classification_metrics(scores, labels, names, seed=ctx["seed"])
    out["selection"] = ctx["selection"]
    # the hypotheses must be what training saw: compare with the stored captions of these clips
    hyps = caption_hypotheses(names)
    cap = tokens["caption"]
    same = [np.array_equal(M.caption_targets(cap[i]).numpy(), hyps[labels[i]]) for i in range(len(labels))]
    out["hypothesis_equals_stored_caption"] = float(np.mean(same))
    if not all(same):
        print(f"  warning: {100 * (1 - np.mean(same)):.1f}% of the clips' stored captions differ from "
              "encode_caption(caption_text(class)); the class hypotheses may not be what training saw")
    C = len(names)
    add_row(ctx, "class", "audio -> class top-1", out["top1"]["value"], out["top1"]["ci"], out["n"], 1 / C,
            "chance 1/C", REPORT["class_top1"], differs=classes_differ(ctx))
    if "top5" in out:
        add_row(ctx, "class", "audio -> class top-5", out["top5"]["value"], out["top5"]["ci"], out["n"],
                min(5 / C, 1.0), "chance 5/C", REPORT["class_top5"], differs=classes_differ(ctx))
    # what the tokens allow: the same clips classified by a linear probe on their audio token histograms
    judge, how = token_judge(ctx)
    k = int((judge(tokens["tok_audio"].numpy()) == labels).sum())
    out["token_histogram_probe"] = {"value": k / len(labels), "ci": wilson_ci(k, len(labels)), "n": int(len(labels)),
                                    "judge": how}
    add_row(ctx, "class", "reference: linear probe on token histograms", k / len(labels),
            wilson_ci(k, len(labels)), int(len(labels)), 1 / C, "chance 1/C")
    # more views of the same clips: the seeded view's figure rests on one 3.4 s window per clip; averaging
    # every view tightens it, and summing a clip's views' log-likelihoods classifies the whole 10 s clip
    V = min(int(ctx["class_views"]), M.NUM_VIEWS)
    if V > 1:
        extra = [(views + j) % M.NUM_VIEWS for j in range(1, V)]
        more, _ = tokens_of(ctx, ctx["split"], np.tile(clips, V - 1), np.concatenate(extra))
        s_all = np.concatenate([scores[None], class_scores(ctx, more["tok_audio"], names).reshape(V - 1, len(clips), C)])
        hits = np.stack([fair_hits(s, labels, (1,))[:, 0] for s in s_all], 1)              # [clips, V]
        acc, lo, hi = clustered_accuracy(hits)       # the views of a clip are not independent draws
        out["views"] = {"views_per_clip": V, "top1": {"value": acc, "ci": (lo, hi)}}
        add_row(ctx, "class", f"audio -> class top-1, mean of {V} views", acc, (lo, hi), int(hits.size),
                1 / C, "chance 1/C")
        clip_hits = fair_hits(s_all.sum(axis=0), labels, (1,))[:, 0]
        out["whole_clip"] = {"views_summed": V, "top1": {"value": float(clip_hits.mean()),
                                                         "ci": wilson_ci(clip_hits.sum(), len(labels))}}
        add_row(ctx, "class", f"audio -> class top-1, whole clip ({V} views)", float(clip_hits.mean()),
                wilson_ci(clip_hits.sum(), len(labels)), int(len(labels)), 1 / C, "chance 1/C")
    # the same captions given the picture: retrieval needs the class from both sides
    r = classification_metrics(class_scores(ctx, tokens["tok_rgb"], names, "tok_rgb"), labels, names, seed=ctx["seed"])
    out["rgb_to_class"] = {k: r[k] for k in ("top1", "n")}
    add_row(ctx, "class", "rgb -> class top-1 (for retrieval)", r["top1"]["value"], r["top1"]["ci"], r["n"], 1 / C,
            "chance 1/C")
    return out


def probe_retrieval(ctx):
    order = ctx["order"][ctx["split"]]
    G = min(ctx["gallery"], len(order))
    clips = order[:G]
    views = ctx["views_of"][clips]
    tokens, labels = tokens_of(ctx, ctx["split"], clips, views)
    out = {"gallery": f"the first {G} clips of the {ctx['split']} split, round-robin over the classes, one view each "
                      f"(view drawn per clip from seed {ctx['seed']}); score(q, c) = mean log-prob of all of c's "
                      "target tokens given all of q's tokens (exact: G decoder passes, each scoring every candidate)"}
    scores = {}
    for q, c in (("tok_audio", "tok_rgb"), ("tok_rgb", "tok_audio")):
        s = direct_scores(ctx, tokens, q, c)
        key = f"{q[4:]}->{c[4:]}"
        r = retrieval_metrics(s)
        # the same scores with each candidate's mean score over queries removed (its prior likelihood)
        s_pr = prior_removed(s)
        r["prior_removed"] = retrieval_metrics(s_pr)
        # does the score know the class at all? (the goal's R@5 >= 80% is above what the class alone can give)
        r["class_level"] = class_level_retrieval(s, labels)
        r["prior_removed"]["class_level"] = class_level_retrieval(s_pr, labels)
        out[key] = r
        for k in (1, 5, 10):
            if f"R@{k}" in r:
                add_row(ctx, "retrieval", f"{key} R@{k}", r[f"R@{k}"]["value"], r[f"R@{k}"]["ci"], G, k / G,
                        "chance k/G", REPORT["retrieval_r5"] if k == 5 else None,
                        differs=None if G == REPORT_GALLERY else f"a gallery of {G} here (R@5 chance {500 / G:.1f}%), "
                                                                 f"the report's {REPORT_GALLERY} (2.5%)")
        if "R@5" in r:
            p = r["prior_removed"]["R@5"]
            add_row(ctx, "retrieval", f"{key} R@5, candidate prior removed", p["value"], p["ci"], G, 5 / G,
                    "chance k/G")
        c = r["prior_removed"]["class_level"]
        add_row(ctx, "retrieval", f"{key} top-1 of the same class, prior removed", c["top1_same_class"]["value"],
                c["top1_same_class"]["ci"], G, c["top1_same_class"]["chance"], "chance")
        if "R@5" in c["class_only_ceiling"]:
            print(f"  {key}: a scorer that knew only the class would reach R@5 "
                  f"{100 * c['class_only_ceiling']['R@5']:.1f}% on this gallery")
        if "class_effect" in c:
            print(f"  {key}: the score moves {c['class_effect']:.3f} nats/token with the class and "
                  f"{c['clip_effect']:.3f} more with the very clip; unrelated pairs spread {c['other_class_sd']:.3f}")
        scores[key] = s_pr
    # Both directions at once: each prior-removed score estimates the same pointwise mutual information,
    # log p(c | q) - log p(c) = log p(q | c) - log p(q), from the other side, so their sum averages two
    # noisy estimates (the G decoder passes of each direction are already paid for above).
    both = scores["audio->rgb"] + scores["rgb->audio"].T
    for key, m in (("audio->rgb", both), ("rgb->audio", both.T)):
        r = retrieval_metrics(m)
        r["class_level"] = class_level_retrieval(m, labels)
        out[key]["both_directions"] = r
        if "R@5" in r:
            add_row(ctx, "retrieval", f"{key} R@5, both directions' scores summed", r["R@5"]["value"],
                    r["R@5"]["ci"], G, 5 / G, "chance k/G")
    # Through the class (the class probe's captions scored from each side): the direct scores above follow
    # what the two streams share token by token (in ToyZoo mostly the habitat) and barely the class; the
    # pivot adds the class as each side names it, and the fused score both.
    names = ctx["class_names"]
    logp = {m: class_scores(ctx, tokens[m], names, m) for m in ("tok_audio", "tok_rgb")}
    pivot = class_pivot_scores(logp["tok_audio"], logp["tok_rgb"])                     # [audio, rgb]
    out["class_pivot"] = {"how": "log sum_k p(k|audio) p(k|rgb) / p(k): class posteriors from the caption "
                                 "likelihoods given each side, uniform class prior"}
    out["fused"] = {"how": "per-query standardised sum of the both-directions score and the class pivot"}
    for key, b, piv in (("audio->rgb", both, pivot), ("rgb->audio", both.T, pivot.T)):
        for name, m, label in (("class_pivot", piv, "through the class alone"),
                               ("fused", fuse_scores(b, piv), "both directions + through the class")):
            r = retrieval_metrics(m)
            r["class_level"] = class_level_retrieval(m, labels)
            out[name][key] = r
            if "R@5" in r:
                add_row(ctx, "retrieval", f"{key} R@5, {label}", r["R@5"]["value"], r["R@5"]["ci"], G, 5 / G,
                        "chance k/G")
    if ctx["reference_reader"]:
        out["reference_reader"] = reader_diagnostic(ctx, tokens, labels, logp["tok_audio"], both)
    # Whole clips: one view says little of the class in a picture (an animal seen end-on, half hidden);
    # a clip's views together say more. Each pair's both-directions score is summed over the views
    # (audio window v with frame v) and the caption log-likelihoods too (the class posterior of all the views,
    # as the class probe's whole clip), then ranked as above.
    V = min(int(ctx["retrieval_views"]), M.NUM_VIEWS)
    if V > 1:
        both_v, logp_v = both.copy(), {m: v.copy() for m, v in logp.items()}
        for j in range(1, V):
            t, _ = tokens_of(ctx, ctx["split"], clips, (views + j) % M.NUM_VIEWS)
            s_ar, s_ra = direct_scores(ctx, t, "tok_audio", "tok_rgb"), direct_scores(ctx, t, "tok_rgb", "tok_audio")
            both_v += prior_removed(s_ar) + prior_removed(s_ra).T
            for m in logp_v:
                logp_v[m] += class_scores(ctx, t[m], names, m)
        pivot_v = class_pivot_scores(logp_v["tok_audio"], logp_v["tok_rgb"])
        out["whole_clip"] = {"views_summed": V}
        for m in logp_v:          # how well each side names the class, one view vs the whole clip
            one, whole = (fair_hits(x, labels, (1,))[:, 0] for x in (logp[m], logp_v[m]))
            out["whole_clip"][f"{m[4:]}_class_top1"] = {"one_view": float(one.mean()), "whole_clip": float(whole.mean())}
            add_row(ctx, "retrieval", f"{m[4:]} -> class top-1 on the gallery, whole clip ({V} views)",
                    float(whole.mean()), wilson_ci(whole.sum(), G), G, 1 / len(names), "chance 1/C")
        for key, b, piv in (("audio->rgb", both_v, pivot_v), ("rgb->audio", both_v.T, pivot_v.T)):
            for name, m in (("both_directions", b), ("class_pivot", piv), ("fused", fuse_scores(b, piv))):
                r = retrieval_metrics(m)
                out["whole_clip"].setdefault(name, {})[key] = r
                if "R@5" in r:
                    add_row(ctx, "retrieval", f"{key} R@5, whole clip ({V} views), {name.replace('_', ' ')}",
                            r["R@5"]["value"], r["R@5"]["ci"], G, 5 / G, "chance k/G")
    return out


def reader_diagnostic(ctx, tokens, labels, logp_audio, both):
    """The fused ranking again, with the rgb side's class posterior from fit_grid_reader fit to every view of
    every train clip instead of from the model's caption likelihoods; the audio side and the both-directions
    score stay the model's. How far retrieval would go if the model read the class from a picture as well
    as a small reader does: a diagnostic of what limits it, not a figure of the model."""
    if "train" not in ctx["arrays"] or ctx["split"] == "train":
        why = "needs a train split other than the evaluated one to fit the reader on"
        print(f"  reference reader skipped: {why}")
        return {"skipped": why}
    import modality_tokenizers as T
    train, L = ctx["arrays"]["train"], M.BY_NAME["tok_rgb"].length
    x = np.asarray(train["tok_rgb"]).reshape(-1, L)
    y = np.repeat(np.asarray(train["label"]).astype(np.int64), M.NUM_VIEWS)
    feats = T.code_features(ctx["tok_path"], ctx["meta"], names=("tok_rgb",), trust=ctx["trust_checkpoint"])["tok_rgb"]
    C = len(ctx["class_names"])
    read = fit_grid_reader(x, y, C, M.BY_NAME["tok_rgb"].vocab, feats, epochs=ctx["reader_epochs"],
                           seed=ctx["seed"], desc="reference reader: rgb -> class")
    logp_rgb = read(tokens["tok_rgb"].numpy())
    hit = fair_hits(logp_rgb, labels, (1,))[:, 0]
    G = len(labels)
    out = {"how": f"{fit_grid_reader.__name__} fit to the {len(x)} train pictures ({ctx['reader_epochs']} epochs, "
                  f"ids read as {'their tokenizer vectors' if feats is not None else 'learnt rows'}); fused as "
                  "the fused score, with this rgb class posterior in the class pivot",
           "rgb_class_top1": {"value": float(hit.mean()), "ci": wilson_ci(hit.sum(), G), "n": G}}
    add_row(ctx, "retrieval", "rgb -> class top-1 of the reference reader (not the model)", float(hit.mean()),
            wilson_ci(hit.sum(), G), G, 1 / C, "chance 1/C")
    pivot = class_pivot_scores(logp_audio, logp_rgb)
    for key, b, piv in (("audio->rgb", both, pivot), ("rgb->audio", both.T, pivot.T)):
        r = retrieval_metrics(fuse_scores(b, piv))
        out[key] = r
        if "R@5" in r:
            add_row(ctx, "retrieval", f"{key} R@5, fused, the rgb class from the reference reader (diagnostic)",
                    r["R@5"]["value"], r["R@5"]["ci"], G, 5 / G, "chance k/G")
    return out


def prior_removed(s):
    """Scores [Q, G] less each candidate's mean over the queries (its prior likelihood)."""
    return s - s.mean(axis=0, keepdims=True)


def direct_scores(ctx, tokens, q, c):
    """[G, G] retrieval score of every (query, candidate) pair: the mean log-prob of all of the candidate's
    c tokens given all of the query's q tokens."""
    inputs = {q: (tokens[q], all_given(tokens[q]))}
    return score_hypotheses(ctx["model"], inputs, c, np.arange(M.BY_NAME[c].length), tokens[c].numpy(),
                            ctx["device"], ctx["batch_size"], reduce="mean", desc=f"retrieval {q}->{c}")


def train_majority(ctx, name):
    src = "train" if "train" in ctx["arrays"] else ctx["split"]
    a = np.asarray(ctx["arrays"][src][name]).reshape(-1)
    counts = np.bincount(a.astype(np.int64), minlength=M.BY_NAME[name].vocab)
    return int(counts.argmax()), src


def per_position_majority(ids):
    """ids [N, L] -> [L]: the most frequent id at each stream position (a predictor that never looks at
    the input, but knows where in the stream it is: a floor near the bottom of a picture, say)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.array([np.bincount(ids[:, j]).argmax() for j in range(ids.shape[1])], dtype=np.int64)


def train_position_majority(ctx, name, max_rows=4000):
    """per_position_majority over (a seeded subsample of) the train split's views of modality `name`."""
    src = "train" if "train" in ctx["arrays"] else ctx["split"]
    a = np.asarray(ctx["arrays"][src][name])
    a = a.reshape(-1, a.shape[-1])
    if len(a) > max_rows:
        a = a[np.sort(np.random.default_rng([ctx["seed"], 7]).choice(len(a), max_rows, replace=False))]
    return per_position_majority(a), src


def depth_metrics(pred, gt):
    """Per-image depth errors of decoded maps pred, gt [N, H, W] (the same units): RMSE, AbsRel
    (mean |p - g| / g) and the share of pixels with max(p / g, g / p) < 1.25, over pixels with g > 0."""
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    valid = g > 0
    n = valid.sum((1, 2)).clip(min=1)
    d = np.where(valid, p - g, 0.0)
    rmse = np.sqrt((d ** 2).sum((1, 2)) / n)
    absrel = np.where(valid, np.abs(d) / np.where(valid, g, 1.0), 0.0).sum((1, 2)) / n
    ratio = np.maximum(p, 1e-9) / np.where(valid, g, 1.0)
    within = (valid & (np.maximum(ratio, 1 / ratio) < 1.25)).sum((1, 2)) / n
    return {"rmse": rmse, "absrel": absrel, "delta1": within}


def unit_vectors(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(min=1e-9)


def normal_vectors(images):
    """uint8 normal images [N, H, W, 3] (c = 255 (n + 1) / 2) -> unit vectors float [N, H, W, 3]."""
    return unit_vectors(np.asarray(images, dtype=np.float64) / 255.0 * 2 - 1)


def normal_metrics(pred, gt):
    """Per-image normal errors of unit-vector maps pred, gt [N, H, W, 3]: mean angular error in degrees and
    the share of pixels within 11.25 degrees."""
    cos = (np.asarray(pred) * np.asarray(gt)).sum(-1).clip(-1, 1)
    ang = np.degrees(np.arccos(cos))
    return {"angle": ang.mean((1, 2)), "within_11.25": (ang < 11.25).mean((1, 2))}


def decoded_maps(ctx, name, ids):
    """Decoded depth (float [N, H, W]) or normal (unit vectors [N, H, W, 3]) maps of ids [N, 196]."""
    tok = load_decoder(ctx, name)
    outs = []
    for s in range(0, len(ids), 32):
        x = tok.decode(torch.as_tensor(np.asarray(ids[s:s + 32])).long().to(ctx["device"]))
        outs.append(np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x))
    x = np.concatenate(outs)
    return x.astype(np.float64) if name == "tok_depth" else normal_vectors(x)


STRUCTURE_METRICS = {  # decoded metric -> (label, unit, lower is better)
    "tok_depth": {"rmse": ("depth RMSE (decoded units)", "", True), "absrel": ("depth AbsRel", "", True),
                  "delta1": ("depth pixels within 1.25x", "%", False)},
    "tok_normal": {"angle": ("normal mean angular error (degrees)", "", True),
                   "within_11.25": ("normal pixels within 11.25 degrees", "%", False)},
}


def structure_decoded(ctx, tgt, pred_ids, true_ids):
    """Decoded metrics of the predicted ids against the decoded ground truth, beside two baselines that
    never look at the picture: the per-position mean map of decoded train maps (the one to beat) and one
    constant map (the mean over every train pixel)."""
    src = "train" if "train" in ctx["arrays"] else ctx["split"]
    a = np.asarray(ctx["arrays"][src][tgt]).reshape(-1, M.BY_NAME[tgt].length)
    pick = np.random.default_rng([ctx["seed"], 8]).permutation(len(a))[:ctx["structure_train_maps"]]
    train_maps = decoded_maps(ctx, tgt, a[np.sort(pick)])
    gt, pred = decoded_maps(ctx, tgt, true_ids), decoded_maps(ctx, tgt, pred_ids)
    mean_map = train_maps.mean(0)
    const = train_maps.reshape(-1, *train_maps.shape[3:]).mean(0) if tgt == "tok_normal" else train_maps.mean()
    const_map = np.broadcast_to(const, mean_map.shape)
    if tgt == "tok_normal":   # a mean of unit vectors is shorter than one: renormalise
        mean_map, const_map = unit_vectors(mean_map), unit_vectors(const_map)
    fn = depth_metrics if tgt == "tok_depth" else normal_metrics
    runs = {"model": fn(pred, gt), "per_position_mean": fn(np.broadcast_to(mean_map, gt.shape), gt),
            "constant": fn(np.broadcast_to(const_map, gt.shape), gt)}
    out = {"n_images": int(len(gt)), "train_maps": int(len(train_maps)), "train_split": src,
           "baseline_to_beat": "per_position_mean"}
    for key, (label, unit, _) in STRUCTURE_METRICS[tgt].items():
        vals = {who: mean_ci(r[key]) for who, r in runs.items()}
        out[key] = {who: {"value": v[0], "ci": [v[1], v[2]]} for who, v in vals.items()}
        add_row(ctx, "structure", f"rgb -> {tgt[4:]}, decoded: {label}", vals["model"][0], vals["model"][1:],
                int(len(gt)), vals["per_position_mean"][0], "per-position train mean map (the one to beat)",
                unit=unit, extra={"constant": vals["constant"][0]})
    return out


def probe_structure(ctx):
    nv = max(1, min(ctx["structure_views"], M.NUM_VIEWS))
    clips = np.repeat(ctx["eval_clips"], nv)
    views = np.concatenate([(ctx["eval_views"][i] + np.arange(nv)) % M.NUM_VIEWS for i in range(len(ctx["eval_clips"]))])
    tokens, _ = tokens_of(ctx, ctx["split"], clips, views)
    out = {"n_images": int(len(clips)), "views_per_clip": nv}
    for tgt, rep in (("tok_depth", REPORT["rgb_depth_top1"]), ("tok_normal", REPORT["rgb_normal_top1"])):
        L = M.BY_NAME[tgt].length
        pred = argmax_ids(ctx["model"], {"tok_rgb": (tokens["tok_rgb"], all_given(tokens["tok_rgb"]))},
                          tgt, np.arange(L), ctx["device"], ctx["batch_size"], desc=f"rgb->{tgt[4:]}")
        truth = tokens[tgt].long()
        correct = (pred == truth).numpy()
        acc, lo, hi = clustered_accuracy(correct)
        maj, src = train_majority(ctx, tgt)
        maj_acc = float((truth.numpy() == maj).mean())
        pos_maj, _ = train_position_majority(ctx, tgt)
        pos_acc = float((truth.numpy() == pos_maj[None]).mean())
        V = M.BY_NAME[tgt].vocab
        out[tgt] = {"top1": acc, "ci": [lo, hi], "n_tokens": int(correct.size), "n_images": int(len(clips)),
                    "uniform": 1 / V, "majority_token": maj, "majority_from": src, "majority_acc": maj_acc,
                    "per_position_majority_acc": pos_acc}
        add_row(ctx, "structure", f"rgb -> {tgt[4:]} token top-1", acc, (lo, hi), int(correct.size), pos_acc,
                f"per-position {src}-majority (the one to beat)", rep, extra={"majority": maj_acc, "uniform": 1 / V})
        add_row(ctx, "structure", f"rgb -> {tgt[4:]}: {src}-majority token baseline", maj_acc, None,
                int(correct.size), 1 / V, "1/vocab")
        try:
            out[tgt]["decoded"] = structure_decoded(ctx, tgt, pred.numpy(), truth.numpy())
        except ProbeSkipped as e:
            out[tgt]["decoded"] = {"status": "skipped", "reason": str(e)}
            print(f"  rgb -> {tgt[4:]}: decoded metrics skipped: {e}")
    return out


def suffix_split():
    """Stream index where the predicted audio suffix starts (frame-aligned)."""
    keep_frames = int(round((1 - suffix_frac) * M.AUDIO_FRAMES))
    return keep_frames * M.AUDIO_CODEBOOKS


def probe_memo(ctx):
    start = suffix_split()
    L = M.BY_NAME["tok_audio"].length
    tgt_idx = np.arange(start, L)
    n = ctx["memo_clips"] or len(ctx["eval_clips"])
    sides = {ctx["split"]: (ctx["eval_clips"][:n], ctx["eval_views"][:n])}
    if "train" in ctx["arrays"] and ctx["split"] != "train":
        rng = np.random.default_rng([ctx["seed"], 5])
        tr = rng.choice(len(ctx["arrays"]["train"]["label"]), size=min(n, len(ctx["arrays"]["train"]["label"])),
                        replace=False)
        sides = {"train": (np.sort(tr), seeded_views(len(tr), 6, ctx["seed"])), **sides}
    maj, src = train_majority(ctx, "tok_audio")
    pos_maj = train_position_majority(ctx, "tok_audio")[0][start:]
    out = {"suffix_start": int(start), "targets_per_clip": int(L - start)}
    for side, (clips, views) in sides.items():
        tokens, _ = tokens_of(ctx, side, clips, views)
        audio = tokens["tok_audio"]
        given = torch.zeros_like(audio, dtype=torch.bool)
        given[:, :start] = True
        inputs = {"tok_rgb": (tokens["tok_rgb"], all_given(tokens["tok_rgb"])),
                  "tok_audio": (audio, given), "caption": (tokens["caption"], all_given(tokens["caption"]))}
        truth = audio[:, start:]
        correct = argmax_correct(ctx["model"], inputs, "tok_audio", tgt_idx, truth, ctx["device"],
                                 ctx["batch_size"], desc=f"memo {side}")
        acc, lo, hi = clustered_accuracy(correct)
        last = audio[:, start - M.AUDIO_CODEBOOKS:start].repeat(1, (L - start) // M.AUDIO_CODEBOOKS)
        rep_acc = float((last == truth).float().mean())
        V = M.BY_NAME["tok_audio"].vocab
        maj_acc = float((truth == maj).float().mean())
        pos_acc = float((truth.numpy() == pos_maj[None]).mean())
        out[side] = {"top1": acc, "ci": [lo, hi], "n_clips": int(len(clips)), "n_tokens": int(correct.size),
                     "repeat_last_frame": rep_acc, "majority": maj_acc, "per_position_majority": pos_acc}
        add_row(ctx, "memo", f"audio suffix top-1 ({side})", acc, (lo, hi), int(correct.size), 1 / V, f"1/{V}",
                REPORT["memo_train"] if side == "train" else REPORT["memo_test"],
                extra={"majority": maj_acc, "repeat_last_frame": rep_acc})
        add_row(ctx, "memo", f"audio suffix ({side}): repeat-last-frame baseline", rep_acc, None,
                int(correct.size), 1 / V, f"1/{V}")
        add_row(ctx, "memo", f"audio suffix ({side}): per-position {src}-majority baseline", pos_acc, None,
                int(correct.size), 1 / V, f"1/{V}")
    return out


# ---- generation (shared by the generation, fad and resnet probes)

def gen_selection(ctx):
    """gen_per_class clips of each class: the first ones of the class in clip_id order, their seeded view."""
    order = ctx["order"][ctx["split"]]
    labels = np.asarray(ctx["arrays"][ctx["split"]]["label"])
    picked = []
    for c in range(len(ctx["class_names"])):
        picked += [i for i in order if labels[i] == c][:ctx["gen_per_class"]]
    picked = np.array(picked, dtype=np.int64)
    return picked, ctx["views_of"][picked]


class ProbeSkipped(Exception):
    """A probe that does not apply here (a tokenizer that cannot decode offline, a missing extra)."""


def load_decoder(ctx, name):
    """The dataset's tokenizer for modality `name`, or ProbeSkipped naming why it cannot decode here."""
    key = f"tok:{name}"
    if key not in ctx:
        import modality_tokenizers
        kind = ctx["meta"]["modalities"].get(name, {}).get("tokenizer")
        try:
            ctx[key] = modality_tokenizers.load_tokenizer(ctx["tok_path"], ctx["meta"], name, ctx["device"],
                                                          ctx["trust_checkpoint"])
        except Exception as e:
            raise ProbeSkipped(f"the {name} tokenizer ({kind}) cannot be loaded to decode here: "
                               f"{type(e).__name__}: {str(e)[:300]}") from e
    return ctx[key]


def audio_tokenizer(ctx):
    return load_decoder(ctx, "tok_audio")


def decode_audio(ctx, ids, bs=16):
    tok = audio_tokenizer(ctx)
    outs = []
    for s in range(0, len(ids), bs):
        w = tok.decode(torch.as_tensor(ids[s:s + bs]).long().to(ctx["device"]))
        outs.append(np.asarray(w.detach().cpu().numpy() if torch.is_tensor(w) else w, dtype=np.float32))
    return np.concatenate(outs)


def generations(ctx):
    """Class-only and continuation samples of the selected clips, decoded, plus decoded ground truth."""
    if "gen" in ctx:
        return ctx["gen"]
    import sample
    clips, views = gen_selection(ctx)
    tokens, labels = tokens_of(ctx, ctx["split"], clips, views)
    g = torch.Generator().manual_seed(ctx["seed"])
    kw = dict(steps=ctx["gen_steps"], schedule=ctx["gen_schedule"], temperature=ctx["gen_temperature"],
              guidance_scale=ctx["gen_guidance"], generator=g)
    start = suffix_split()
    audio = tokens["tok_audio"]
    res = {"clips": clips, "views": views, "labels": labels, "gt_ids": audio.numpy(), "suffix_start": start}
    t0 = time.time()
    cls_ids, cls1_ids, cont_ids = [], [], []
    for s in tqdm(range(0, len(clips), ctx["batch_size"]), desc="generate", leave=False):
        e = min(s + ctx["batch_size"], len(clips))
        cap = tokens["caption"][s:e]
        zeros = torch.zeros_like(audio[s:e])
        cls_ids.append(sample.generate(ctx["model"], {"caption": cap, "tok_audio": zeros},
                                       {"caption": all_given(cap), "tok_audio": zeros.bool()}, "tok_audio", **kw))
        if ctx["gen_guidance"] != 1.0:   # the conditional model alone beside it: what guidance adds
            cls1_ids.append(sample.generate(ctx["model"], {"caption": cap, "tok_audio": zeros},
                                            {"caption": all_given(cap), "tok_audio": zeros.bool()}, "tok_audio",
                                            **dict(kw, guidance_scale=1.0)))
        given = torch.zeros_like(audio[s:e], dtype=torch.bool)
        given[:, :start] = True
        out = sample.generate(ctx["model"], {"caption": cap, "tok_rgb": tokens["tok_rgb"][s:e], "tok_audio": audio[s:e]},
                              {"caption": all_given(cap), "tok_rgb": all_given(tokens["tok_rgb"][s:e]),
                               "tok_audio": given}, "tok_audio", **kw)
        out = out.cpu()
        out[:, :start] = audio[s:e, :start]     # the given prefix is ground truth, whatever the sampler returns
        cont_ids.append(out)
    res["seconds"] = time.time() - t0
    res["class_only_ids"] = torch.cat(cls_ids).cpu().numpy()
    res["continuation_ids"] = torch.cat(cont_ids).numpy()
    res["samples_per_s"] = (2 + bool(cls1_ids)) * len(clips) / max(res["seconds"], 1e-9)
    res["class_only_settings"] = ["class_only"]
    if cls1_ids:
        res["class_only_g1_ids"] = torch.cat(cls1_ids).cpu().numpy()
        res["class_only_g1_wave"] = decode_audio(ctx, res["class_only_g1_ids"])
        res["class_only_settings"].append("class_only_g1")
    res["gt_wave"] = decode_audio(ctx, res["gt_ids"])
    res["class_only_wave"] = decode_audio(ctx, res["class_only_ids"])
    res["continuation_wave"] = decode_audio(ctx, res["continuation_ids"])
    ctx["gen"] = res
    return res


def train_reference(ctx):
    """Decoded ground truth of clf_per_class train clips per class (first in clip_id order, seeded view)."""
    if "train_ref" in ctx:
        return ctx["train_ref"]
    src = "train" if "train" in ctx["arrays"] else ctx["split"]
    arrays = ctx["arrays"][src]
    order = clip_order(arrays)
    labels = np.asarray(arrays["label"])
    picked = []
    for c in range(len(ctx["class_names"])):
        picked += [i for i in order if labels[i] == c][:ctx["clf_per_class"]]
    picked = np.array(picked, dtype=np.int64)
    views = seeded_views(len(labels), 3, ctx["seed"])[picked]
    tokens, y = tokens_of(ctx, src, picked, views)
    wave = decode_audio(ctx, tokens["tok_audio"].numpy())
    ctx["train_ref"] = {"split": src, "labels": y, "wave": wave}
    return ctx["train_ref"]


def probe_generation(ctx):
    from audio_features import (EMBED_NAME, clip_embedding, energy_spread, fit_logreg, mean_pairwise_distance,
                                predict_proba)
    gen = generations(ctx)
    ref = train_reference(ctx)
    C = len(ctx["class_names"])
    clf = fit_logreg(clip_embedding(ref["wave"]), ref["labels"], C)
    y = gen["labels"]
    out = {"embedding": EMBED_NAME, "classifier": f"multinomial logistic regression (L2) on the embedding, fit to "
                                                   f"{len(ref['labels'])} decoded {ref['split']} clips",
           "n_per_setting": int(len(y)), "samples_per_s": gen["samples_per_s"],
           "sampler": {k: ctx[k] for k in ("gen_steps", "gen_schedule", "gen_temperature", "gen_guidance")}}
    emb = {}
    g = ctx["gen_guidance"]
    names = {"gt": "decoded ground truth (classifier ceiling)", "class_only": f"class_only samples (guidance {g:g})",
             "class_only_g1": "class_only samples (guidance 1)", "continuation": f"continuation samples (guidance {g:g})"}
    settings = ["gt"] + gen["class_only_settings"] + ["continuation"]
    for setting in settings:
        emb[setting] = clip_embedding(gen[f"{setting}_wave"])
        pred = predict_proba(clf, emb[setting]).argmax(1)
        k = int((pred == y).sum())
        acc = k / len(y)
        # how the predictions spread over the classes: a collapsed generator (or a judge thrown off by the
        # decoder) puts most samples in one class
        out[f"{setting}_class_acc"] = {"value": acc, "ci": wilson_ci(k, len(y)), "n": int(len(y)),
                                       "predicted": np.bincount(pred, minlength=C).tolist()}
        label = names[setting]
        add_row(ctx, "generation", f"classifier acc on {label}", acc, wilson_ci(k, len(y)), int(len(y)), 1 / C,
                "chance 1/C")
    # the same question in token space: no decoder in the loop, so a miss here is the model's, not the decoder's
    judge, how = token_judge(ctx)
    out["token_judge"] = how
    for setting in ["gt"] + gen["class_only_settings"]:
        pred = judge(gen[f"{setting}_ids"])
        k = int((pred == y).sum())
        out[f"{setting}_token_judge_acc"] = {"value": k / len(y), "ci": wilson_ci(k, len(y)), "n": int(len(y)),
                                             "predicted": np.bincount(pred, minlength=C).tolist()}
        label = "ground-truth ids (judge ceiling)" if setting == "gt" else names[setting].replace("samples", "ids")
        add_row(ctx, "generation", f"token judge acc on {label}", k / len(y), wilson_ci(k, len(y)), int(len(y)),
                1 / C, "chance 1/C")
    # diversity within a class, standardized features, generated / ground truth
    z = {s: (e - clf["mean"]) / clf["std"] for s, e in emb.items()}
    for setting in gen["class_only_settings"] + ["continuation"]:
        ratios = []
        for c in range(C):
            sel = y == c
            d_gt, d_gen = mean_pairwise_distance(z["gt"][sel]), mean_pairwise_distance(z[setting][sel])
            if np.isfinite(d_gt) and d_gt > 0 and np.isfinite(d_gen):
                ratios.append(d_gen / d_gt)
        m, lo, hi = mean_ci(ratios)
        out[f"{setting}_diversity_ratio"] = {"value": m, "ci": [lo, hi], "n_classes": len(ratios)}
        add_row(ctx, "generation", f"diversity {names[setting]} / ground truth", m, (lo, hi), len(ratios), 1.0,
                "no collapse = 100%")
    # energy spread: std over time of frame RMS, generated / ground truth (continuation: the generated tail only).
    # The report trained no unconditional model, so its samples had no guidance: its figure is like-for-like
    # only at guidance 1
    guided = None if g == 1.0 else (f"guidance {g:g} here; the report trained no unconditional model, so it "
                                    "sampled without guidance (compare the guidance 1 row)")
    tail = M.audio_sample_of(gen["suffix_start"])
    for setting, s0, rep, differs in (
            [("class_only", 0, REPORT["energy_class_only"], guided)] +
            ([("class_only_g1", 0, REPORT["energy_class_only"], None)] if "class_only_g1_ids" in gen else []) +
            [("continuation", tail, REPORT["energy_continuation"], guided)]):
        a, b = energy_spread(gen[f"{setting}_wave"], s0), energy_spread(gen["gt_wave"], s0)
        ratio = float(a.mean() / max(b.mean(), 1e-12))
        lo, hi = bootstrap_ci(lambda i, j: a[i].mean() / max(b[j].mean(), 1e-12), [len(a), len(b)], seed=ctx["seed"])
        out[f"{setting}_energy_spread"] = {"value": ratio, "ci": [lo, hi], "n": int(len(a)), "from_sample": int(s0)}
        add_row(ctx, "generation", f"energy spread {names[setting]} / ground truth", ratio, (lo, hi), int(len(a)),
                1.0, "ground truth = 100%", rep, differs=differs)
    out["structure_judge"] = structure_judge(ctx, gen, ref)
    add_row(ctx, "generation", "generation speed (samples/s)", gen["samples_per_s"], None,
            (len(gen["class_only_settings"]) + 1) * int(len(y)), None, "", None, unit="")
    return out


def structure_scores(train_frames, train_labels, frames, labels, num_classes, seed=0):
    """The structure judge: a logistic regression on audio_features.structure_embedding (what only the order
    of the log-mel frames gives) fit to train frames. Scores each setting of `frames` ({name: [B, T, mels]},
    one label each), with its ceiling on 'gt' and its floor on the same ground-truth frames shuffled in time."""
    from audio_features import fit_logreg, predict_proba, shuffle_frames, structure_embedding
    clf = fit_logreg(structure_embedding(frames=train_frames), train_labels, num_classes)
    settings = dict(frames, gt_shuffled=shuffle_frames(frames["gt"], seed))
    out = {}
    for name, f in settings.items():
        pred = predict_proba(clf, structure_embedding(frames=f)).argmax(1)
        k = int((pred == labels).sum())
        out[name] = {"value": k / len(labels), "ci": wilson_ci(k, len(labels)), "n": int(len(labels))}
    ceil, floor = out["gt"]["value"], out["gt_shuffled"]["value"]
    for name in frames:
        if name != "gt" and ceil > floor:
            out[name]["floor_to_ceiling"] = (out[name]["value"] - floor) / (ceil - floor)
    return out


def structure_judge(ctx, gen, ref):
    """Class-only and continuation samples judged by their time structure (chirp shapes, rhythm), where the
    mean/std judge above cannot look: the same frames in any order give it the same answer."""
    from audio_features import STRUCTURE_NAME, log_mel_frames
    frames = {k: log_mel_frames(gen[f"{k}_wave"]) for k in ("gt", "class_only", "continuation")}
    res = structure_scores(log_mel_frames(ref["wave"]), ref["labels"], frames, gen["labels"],
                           len(ctx["class_names"]), ctx["seed"])
    floor = res["gt_shuffled"]["value"]
    for name, label in (("gt", "decoded ground truth (ceiling)"), ("gt_shuffled", "ground truth, frames shuffled (floor)"),
                        ("class_only", "class_only samples"), ("continuation", "continuation samples")):
        r = res[name]
        add_row(ctx, "generation", f"structure judge acc on {label}", r["value"], r["ci"], r["n"], floor,
                "shuffled-frame floor", extra={"floor_to_ceiling": r.get("floor_to_ceiling")})
    return {"features": STRUCTURE_NAME, **res}


def clap_embed(waves):
    """CLAP audio embeddings via transformers (laion/clap-htsat-unfused, 48 kHz), or raise ImportError /
    OSError when the package or the cached weights are missing (pip install transformers; internet once)."""
    import torchaudio
    from transformers import ClapModel, ClapProcessor
    name = "laion/clap-htsat-unfused"
    model = ClapModel.from_pretrained(name, local_files_only=True).eval()
    proc = ClapProcessor.from_pretrained(name, local_files_only=True)
    w48 = torchaudio.functional.resample(torch.as_tensor(waves), M.AUDIO_SR, 48000).numpy()
    embs = []
    with torch.no_grad():
        for s in range(0, len(w48), 16):
            inp = proc(audios=list(w48[s:s + 16]), sampling_rate=48000, return_tensors="pt")
            embs.append(model.get_audio_features(**inp).numpy())
    return np.concatenate(embs)


def paired_fad(a, b, z=1.96):
    """Frechet distance between clip embeddings a [n, d] and b [n, d] (row i of each a pair: a sample and its
    ground truth, or two real clips of one class), with a 95% normal interval from the leave-one-pair-out
    jackknife. -> (value, lo, hi, n). The interval is not clipped at 0: it is an approximation, said as is."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired_fad needs as many rows on both sides, got {len(a)} and {len(b)}")
    from audio_features import frechet_distance
    v, lo, hi = jackknife_ci(lambda i: frechet_distance(a[i], b[i]), len(a), z)
    return v, lo, hi, len(a)


def matched_rows(labels, ref_labels):
    """Row indices into ref_labels giving the same class counts as labels (the first rows of each class), or
    None when ref has too few of some class."""
    picked = []
    for c in labels:
        rows = [i for i in np.flatnonzero(ref_labels == c) if i not in picked]
        if not rows:
            return None
        picked.append(int(rows[0]))
    return np.array(picked, dtype=np.int64)


def probe_fad(ctx):
    from audio_features import EMBED_NAME, HOP, clip_embedding, log_mel_frames
    gen = generations(ctx)
    ref = train_reference(ctx)
    y = gen["labels"]
    start_frame = M.audio_sample_of(gen["suffix_start"]) // HOP    # a log-mel frame (hop HOP) index
    frames = {s: log_mel_frames(gen[f"{s}_wave"]) for s in ["gt"] + gen["class_only_settings"] + ["continuation"]}
    ref_rows = matched_rows(y, ref["labels"])
    if ref_rows is None:
        raise ProbeSkipped(f"the floor needs {len(y)} decoded {ref['split']} clips with the classes of the generated "
                           f"ones; raise --clf_per_class (now {ctx['clf_per_class']}) to at least --gen_per_class")
    frames["train"] = log_mel_frames(ref["wave"][ref_rows])
    n = len(y)
    out = {"embedding": f"clip level: {EMBED_NAME}, one vector per clip",
           "reference": f"decoded ground truth of the same {n} {ctx['split']} clips",
           "floor": f"the {n} {ctx['split']} ground-truth clips vs {n} decoded {ref['split']} clips of the same "
                    "classes (two real sets, the same n as the measurement: a Frechet distance's bias grows as n "
                    "falls, so only equal n compare)",
           "continuation_frames": f"only the generated tail (frames >= {start_frame}), on both sides",
           "ci": "95% normal interval, leave-one-pair-out jackknife (not clipped at 0)"}

    def emb(key, tail=False):
        return clip_embedding(frames=frames[key][:, start_frame:] if tail else frames[key])

    for tail in (False, True):
        v, lo, hi, k = paired_fad(emb("gt", tail), emb("train", tail))
        out["floor_tail" if tail else "floor"] = {"overall": v, "ci": [lo, hi], "n": k}
    for setting in gen["class_only_settings"] + ["continuation"]:
        tail = setting == "continuation"
        v, lo, hi, k = paired_fad(emb(setting, tail), emb("gt", tail))
        fl = out["floor_tail" if tail else "floor"]
        out[setting] = {"overall": v, "ci": [lo, hi], "n_clips": k, "floor": fl["overall"], "floor_ci": fl["ci"]}
        name = {"class_only_g1": "class_only (guidance 1)", "class_only": f"class_only (guidance {ctx['gen_guidance']:g})",
                "continuation": f"continuation tail (guidance {ctx['gen_guidance']:g})"}[setting]
        add_row(ctx, "fad", f"FAD-logmel clip-level, {name} vs ground truth", v, (lo, hi), k, fl["overall"],
                f"floor: real vs real, n={fl['n']} [{fl['ci'][0]:.3f}, {fl['ci'][1]:.3f}]", unit="")
    out["floor_overall"] = out["floor"]["overall"]
    try:
        e_gt = clap_embed(gen["gt_wave"])
        out["clap"] = {"embedding": "CLAP laion/clap-htsat-unfused audio embedding (512-d)"}
        for setting in ("class_only", "continuation"):
            from audio_features import frechet_distance
            v = frechet_distance(clap_embed(gen[f"{setting}_wave"]), e_gt)
            out["clap"][setting] = v
            add_row(ctx, "fad", f"FAD-CLAP {setting} vs ground truth", v, None, int(len(y)), None, "", unit="")
    except (ImportError, OSError, ValueError) as e:
        out["clap"] = {"skipped": f"CLAP embedder unavailable ({type(e).__name__}: {str(e)[:200]}); "
                                  "pip install transformers and cache laion/clap-htsat-unfused to enable"}
        print(f"  FAD-CLAP skipped: {out['clap']['skipped']}")
    return out


# ImageNet-1k indices that count as the class (top-5 must contain one); classes absent here are not scored
IMAGENET_CLASSES = {"pig": [341], "sheep": [348, 349], "dog": list(range(151, 269)), "cat": list(range(281, 286)),
                    "horse": [339, 603], "cow": [345, 346, 347], "chicken": [7, 8], "duck": [97, 98, 99],
                    "coyote": [272], "lion": [291]}


def probe_resnet(ctx):
    try:
        import torchvision
        from torchvision.models import resnet50, ResNet50_Weights
    except ImportError as e:
        return {"skipped": f"torchvision not installed ({e}); pip install torchvision (weights download once)"}
    weights = ResNet50_Weights.IMAGENET1K_V2
    if ctx["resnet_weights"] not in ("imagenet", "random"):
        raise ValueError(f"resnet_weights must be 'imagenet' or 'random', got {ctx['resnet_weights']!r}")
    try:
        net = resnet50(weights=weights if ctx["resnet_weights"] == "imagenet" else None).eval().to(ctx["device"])
    except Exception as e:  # no cached weights and no network
        return {"skipped": f"ResNet-50 ImageNet weights unavailable ({type(e).__name__}: {str(e)[:200]})"}
    import sample
    tok = load_decoder(ctx, "tok_rgb")
    clips, views = gen_selection(ctx)
    tokens, labels = tokens_of(ctx, ctx["split"], clips, views)
    keep = np.array([ctx["class_names"][c] in IMAGENET_CLASSES for c in labels])
    if not keep.any():
        return {"skipped": "no class of this dataset has ImageNet labels in IMAGENET_CLASSES"}
    g = torch.Generator().manual_seed(ctx["seed"])
    kw = dict(steps=ctx["gen_steps"], schedule=ctx["gen_schedule"], temperature=ctx["gen_temperature"],
              guidance_scale=ctx["gen_guidance"], generator=g)
    prep = weights.transforms()
    out = {"classes": {k: v for k, v in IMAGENET_CLASSES.items() if k in ctx["class_names"]},
           "weights": ctx["resnet_weights"] if ctx["resnet_weights"] == "random" else str(weights),
           "rule": "a hit when the top-5 ImageNet predictions contain one of the class's ImageNet labels; "
                   "chance = 5 x (number of such labels) / 1000, averaged over the samples"}
    if ctx["resnet_weights"] == "random":
        out["note"] = "UNTRAINED ResNet-50 (resnet_weights='random'): the figures test the code path only"
    for cond in ("tok_audio", "caption", None):
        if cond is None:
            ids = tokens["tok_rgb"]
        else:
            t = {cond: tokens[cond], "tok_rgb": torch.zeros_like(tokens["tok_rgb"])}
            ids = sample.generate(ctx["model"], t, {cond: all_given(tokens[cond]),
                                                    "tok_rgb": torch.zeros_like(tokens["tok_rgb"], dtype=torch.bool)},
                                  "tok_rgb", **kw).cpu()
        imgs = np.asarray(tok.decode(ids.to(ctx["device"])))
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(ctx["device"])
        with torch.no_grad():
            top5 = net(prep(x)).topk(5, dim=1).indices.cpu().numpy()
        hits = np.array([bool(set(top5[i]) & set(IMAGENET_CLASSES[ctx["class_names"][labels[i]]]))
                         for i in np.flatnonzero(keep)])
        chance = float(np.mean([5 * len(IMAGENET_CLASSES[ctx["class_names"][labels[i]]]) / 1000
                                for i in np.flatnonzero(keep)]))
        name = "decoded ground-truth rgb (ceiling)" if cond is None else f"{cond.replace('tok_', '')} -> rgb"
        k = int(hits.sum())
        out[name] = {"top5": k / len(hits), "ci": wilson_ci(k, len(hits)), "n": int(len(hits)), "chance": chance}
        add_row(ctx, "resnet", f"ResNet-50 top-5, {name}", k / len(hits), wilson_ci(k, len(hits)), int(len(hits)),
                chance, "random top-5", REPORT["resnet_top5"] if cond == "tok_audio" else None)
    return out


PROBES = {"ce": probe_ce, "entropy": probe_entropy, "class": probe_class, "retrieval": probe_retrieval,
          "structure": probe_structure, "memo": probe_memo, "generation": probe_generation, "fad": probe_fad,
          "resnet": probe_resnet}


# -----------------------------------------------------------------------------------------------------
# the HTML report: hand-written SVG, PNG spectrograms and wav players as data URIs (no plotting library)

def _esc(s):
    return html.escape(str(s))


def svg_bars(title, labels, values, refs=None, ref_name="", unit=""):
    W, H, left, bottom = 560, 260, 140, 30
    top = max([v for v in values if v is not None and math.isfinite(v)] +
              [r for r in (refs or []) if r is not None and math.isfinite(r)] + [1e-9])
    bh = (H - bottom - 20) / max(len(labels), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-size="11">',
             f'<text x="{W / 2}" y="12" text-anchor="middle" font-weight="bold">{_esc(title)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = 20 + i * bh
        w = 0 if v is None or not math.isfinite(v) else (W - left - 60) * v / top
        parts.append(f'<text x="{left - 5}" y="{y + bh * 0.6}" text-anchor="end">{_esc(lab)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{bh * 0.6:.1f}" fill="#4a7ab5"/>')
        parts.append(f'<text x="{left + w + 4}" y="{y + bh * 0.6}">{v:.3g}{unit}</text>' if v is not None else "")
        if refs and refs[i] is not None:
            x = left + (W - left - 60) * refs[i] / top
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + bh * 0.8}" stroke="#d33" '
                         f'stroke-width="2"><title>{_esc(ref_name)}</title></line>')
    if refs:
        parts.append(f'<text x="{left}" y="{H - 8}" fill="#d33">| {_esc(ref_name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_lines(title, series, xlabel="", ylabel="", logx=False):
    """series: {name: (xs, ys)}."""
    W, H, l, r, t, b = 560, 300, 50, 120, 20, 35
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        return ""
    fx = (lambda x: math.log10(max(x, 1e-9))) if logx else (lambda x: x)
    x0, x1 = min(fx(p[0]) for p in pts), max(fx(p[0]) for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    px = lambda x: l + (W - l - r) * (fx(x) - x0) / (x1 - x0)
    py = lambda y: H - b - (H - t - b) * (y - y0) / (y1 - y0)
    colors = ["#4a7ab5", "#d33", "#3a3", "#a5a", "#e90", "#0aa", "#777", "#b55"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-size="11">',
             f'<text x="{W / 2}" y="12" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
             f'<rect x="{l}" y="{t}" width="{W - l - r}" height="{H - t - b}" fill="none" stroke="#999"/>',
             f'<text x="{l}" y="{H - 5}">{x0 if not logx else 10 ** x0:.3g}</text>',
             f'<text x="{W - r}" y="{H - 5}" text-anchor="end">{x1 if not logx else 10 ** x1:.3g}</text>',
             f'<text x="{(W - r + l) / 2}" y="{H - 5}" text-anchor="middle">{_esc(xlabel)}</text>',
             f'<text x="{l - 3}" y="{t + 8}" text-anchor="end">{y1:.3g}</text>',
             f'<text x="{l - 3}" y="{H - b}" text-anchor="end">{y0:.3g}</text>',
             f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">{_esc(ylabel)}</text>']
    for i, (name, (xs, ys)) in enumerate(series.items()):
        c = colors[i % len(colors)]
        p = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if y is not None and math.isfinite(y))
        parts.append(f'<polyline points="{p}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        parts.append(f'<text x="{W - r + 5}" y="{t + 12 + 14 * i}" fill="{c}">{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_heatmap(matrix, labels, title):
    m = np.asarray(matrix, dtype=np.float64)
    n = len(labels)
    cell, left, top = 28, 80, 90
    W, H = left + n * cell + 10, top + n * cell + 20
    rows = m.sum(axis=1, keepdims=True)
    frac = m / np.maximum(rows, 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-size="10">',
             f'<text x="{W / 2}" y="12" text-anchor="middle" font-weight="bold">{_esc(title)}</text>']
    for j, lab in enumerate(labels):
        x = left + j * cell + cell / 2
        parts.append(f'<text x="{x}" y="{top - 4}" transform="rotate(-60 {x} {top - 4})">{_esc(lab)}</text>')
    for i, lab in enumerate(labels):
        y = top + i * cell
        parts.append(f'<text x="{left - 4}" y="{y + cell * 0.65}" text-anchor="end">{_esc(lab)}</text>')
        for j in range(n):
            v = frac[i, j]
            shade = int(255 * (1 - v))
            parts.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="rgb({shade},{shade},255)" stroke="#eee"><title>true {_esc(lab)}, predicted '
                         f'{_esc(labels[j])}: {int(m[i, j])}</title></rect>')
            if m[i, j]:
                parts.append(f'<text x="{left + j * cell + cell / 2}" y="{y + cell * 0.65}" text-anchor="middle" '
                             f'fill="{"#fff" if v > 0.5 else "#000"}">{int(m[i, j])}</text>')
    parts.append(f'<text x="{left}" y="{H - 4}">rows: true class, columns: predicted</text></svg>')
    return "".join(parts)


def spectrogram_png(wave, height=64):
    """Log-mel spectrogram as a base64 PNG data URI (low frequencies at the bottom)."""
    from PIL import Image
    from audio_features import log_mel_frames
    f = log_mel_frames(np.asarray(wave)[None])[0].T[::-1]           # [mels, frames]
    lo, hi = np.percentile(f, 5), f.max()
    v = np.clip((f - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.stack([v ** 0.5, v ** 1.5, 0.4 * (1 - v) + 0.6 * v ** 4], -1)   # dark blue -> yellow-white
    img = Image.fromarray((rgb * 255).astype(np.uint8)).resize((f.shape[1], height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_uri(wave, sr=16000):
    """A wav data URI, resampled from 24 kHz to sr (16 kHz keeps the page small; the codecs are band-limited)."""
    import wave as wavemod
    import torchaudio
    wave = torchaudio.functional.resample(torch.as_tensor(np.asarray(wave, dtype=np.float32)), M.AUDIO_SR, sr)
    pcm = (np.clip(wave.numpy(), -1, 1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wavemod.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def read_training_curves(path):
    """out_dir/log.jsonl rows {'iter', 'train': {...}, 'val': {...}} -> {'val tok_audio': (iters, ces), ...}."""
    curves = {}
    if not os.path.exists(path):
        return curves
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for split_name in ("val",):
                d = row.get(split_name)
                if isinstance(d, dict) and "iter" in row:
                    for k, v in d.items():
                        if isinstance(v, (int, float)):
                            xs, ys = curves.setdefault(f"{split_name} {k}", ([], []))
                            xs.append(row["iter"])
                            ys.append(float(v))
    return curves


def render_report(results, ctx):
    fmt = lambda v, unit: ("n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else
                           (f"{100 * v:.1f}%" if unit == "%" else f"{v:.3f}"))
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>nano4M-Audio evaluation</title><style>"
         "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}.skip{color:#a60}"
         ".err{color:#c00}img{image-rendering:pixelated}</style></head><body>",
         f"<h1>nano4M-Audio evaluation: {_esc(results['meta']['checkpoint'])}</h1>",
         f"<p>split <b>{_esc(results['meta']['split'])}</b>, {results['meta']['n_eval_clips']} clips; "
         f"{_esc(results['meta']['selection'])}. Seed {results['meta']['seed']}.</p>",
         "<h2>Probe table</h2><table><tr><th>probe</th><th>figure</th><th>model</th><th>95% CI</th><th>n</th>"
         "<th>random baseline</th><th>report</th></tr>"]
    for r in results["table"]:
        ci = "" if not r["ci"] else f"[{fmt(r['ci'][0], r['unit'])}, {fmt(r['ci'][1], r['unit'])}]"
        h.append(f"<tr><td>{r['probe']}</td><td>{_esc(r['metric'])}</td><td><b>{fmt(r['model'], r['unit'])}</b></td>"
                 f"<td>{ci}</td><td>{r['n']}</td><td>{fmt(r['random'], r['unit'])} {_esc(r['random_name'])}</td>"
                 f"<td>{fmt(r['report'], r['unit'])}"
                 f"{'<br><small>not comparable: ' + _esc(r['report_differs']) + '</small>' if r.get('report_differs') else ''}"
                 "</td></tr>")
    h.append("</table>")
    for name, p in results["probes"].items():
        if p.get("status") != "ok":
            cls = "skip" if p.get("status") == "skipped" else "err"
            h.append(f"<p class='{cls}'><b>{name}</b>: {p.get('status')}: {_esc(p.get('reason', ''))}</p>")
    P = results["probes"]
    if P.get("ce", {}).get("status") == "ok":
        pm = P["ce"]["per_modality"]
        h.append("<h2>Per-modality cross-entropy</h2>")
        h.append(svg_bars("eval CE (nats), red: log(vocab)", list(pm), [v["ce"] for v in pm.values()],
                          [v["uniform"] for v in pm.values()], "uniform guess log(vocab)"))
    curves = read_training_curves(os.path.join(ctx["out_dir"], "log.jsonl"))
    if curves:
        h.append(svg_lines("validation CE during training", curves, "iteration", "nats"))
    if P.get("structure", {}).get("status") == "ok":
        h.append("<h2>rgb -> depth / normal</h2><p>The baselines to beat never see the picture: the train "
                 "split's per-position majority token (token top-1) and the per-position mean of decoded train "
                 "maps (decoded metrics). A model under them has not read the scene from the picture.</p>")
    if P.get("class", {}).get("status") == "ok":
        c = P["class"]
        h.append("<h2>Audio -> class</h2>")
        h.append(svg_heatmap(c["confusion"], ctx["class_names"], "confusion matrix (audio -> class)"))
        pc = c["per_class"]
        h.append(svg_bars("per-class top-1 as a multiple of chance (red: chance = 1)", list(pc),
                          [v["x_chance"] for v in pc.values()], [1.0] * len(pc), "chance", "x"))
    if P.get("retrieval", {}).get("status") == "ok":
        R = P["retrieval"]
        series = {}
        for key in ("audio->rgb", "rgb->audio"):
            curve = R[key]["curve"]
            series[key] = (list(range(1, len(curve) + 1)), curve)
            if key in R.get("fused", {}):
                curve = R["fused"][key]["curve"]
                series[f"{key}, fused with the class pivot"] = (list(range(1, len(curve) + 1)), curve)
        G = len(series["audio->rgb"][1])
        series["chance k/G"] = (list(range(1, G + 1)), [k / G for k in range(1, G + 1)])
        h.append("<h2>Retrieval</h2><p>" + _esc(R["gallery"]) + "</p>")
        h.append(svg_lines("recall@k", series, "k", "recall"))
    gen = ctx.get("gen")
    if gen is not None:
        h.append("<h2>Generated audio per class</h2><p>log-mel spectrograms; continuation: the last "
                 f"{100 * suffix_frac:.0f}% is generated.</p><table><tr><th>class</th><th>ground truth</th>"
                 "<th>continuation</th><th>class-only</th></tr>")
        for c, name in enumerate(ctx["class_names"]):
            idx = np.flatnonzero(gen["labels"] == c)[:max(ctx["audio_players"], 1)]
            if not len(idx):
                continue
            cells = []
            for setting in ("gt", "continuation", "class_only"):
                cell = []
                for j, i in enumerate(idx):
                    w = gen[f"{setting}_wave"][i]
                    cell.append(f"<img src='{spectrogram_png(w)}' width='256' height='64'><br>")
                    if j < ctx["audio_players"]:
                        cell.append(f"<audio controls preload='none' src='{wav_uri(w)}'></audio><br>")
                cells.append("".join(cell))
            h.append(f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
        h.append("</table>")
    if P.get("fad", {}).get("status") == "ok":
        F = P["fad"]
        keys = [k for k in ("class_only_g1", "class_only", "continuation") if k in F]
        h.append("<h2>Frechet audio distance, clip level</h2><p>" + _esc(F["embedding"]) + "; " + _esc(F["floor"]) +
                 "</p>")
        h.append(svg_bars("FAD-logmel vs ground truth (red: real-vs-real floor at the same n)", keys,
                          [F[k]["overall"] for k in keys], [F[k]["floor"] for k in keys], "floor"))
    h.append("<h2>All results</h2><pre>" + _esc(json.dumps(results["probes"], indent=1, default=float)[:200000])
             + "</pre></body></html>")
    return "\n".join(h)


# -----------------------------------------------------------------------------------------------------
# running it

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


def _write_atomic(path, text):
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(settings):
    """Evaluate with the given settings (dict of this module's setting names). Returns the results dict."""
    s = dict(settings)
    from model import load_checkpoint
    dev = M.pick_device(s["device"])
    torch.manual_seed(s["seed"])
    ckpt_path = os.path.join(s["out_dir"], "ckpt.pt")
    model, ckpt = load_checkpoint(ckpt_path, dev, s["trust_checkpoint"])
    cfg = ckpt.get("config", {})
    ds = s["dataset"] or cfg.get("dataset", "toyzoo")
    root = s["data_root"] or cfg.get("data_root", "data")
    tok_path = M.tok_dir(ds, root)
    meta = M.load_meta(tok_path)
    arrays = {sp: M.open_split(tok_path, sp, meta) for sp in meta["splits"]
              if sp == s["split"] or sp == "train"}
    if s["split"] not in arrays:
        raise ValueError(f"split {s['split']!r} not in {tok_path}/meta.json (has {list(meta['splits'])})")
    wanted = ALL_PROBES if s["probes"] == "all" else tuple(p.strip() for p in s["probes"].split(",") if p.strip())
    bad = [p for p in wanted if p not in PROBES]
    if bad:
        raise ValueError(f"unknown probe(s) {bad}; valid: all or a comma list of {', '.join(ALL_PROBES)}")
    order = {sp: clip_order(a) for sp, a in arrays.items()}
    n_split = len(order[s["split"]])
    eval_clips = order[s["split"]][:s["num_clips"]] if s["num_clips"] > 0 else order[s["split"]]
    views_of = seeded_views(n_split, 1, s["seed"])
    global suffix_frac
    suffix_frac = s["suffix_frac"]
    ctx = dict(s, model=model, ckpt=ckpt, device=dev, tok_path=tok_path, meta=meta, arrays=arrays, order=order,
               class_names=list(meta["class_names"]), eval_clips=eval_clips, eval_views=views_of[eval_clips],
               views_of=views_of, table=[], results={},
               selection=f"the first {len(eval_clips)} clips of the split, round-robin over the classes, one view per clip drawn "
                         f"from numpy default_rng([seed, 1])")
    print(f"evaluating {ckpt_path} (iter {ckpt.get('iter_num')}) on {tok_path} split {s['split']}: "
          f"{len(eval_clips)} clips, device {dev}")
    failed = []
    for name in wanted:
        print(f"[{name}]")
        t0 = time.time()
        try:
            res = PROBES[name](ctx)
            status = "skipped" if "skipped" in res else "ok"
            res = {"status": status, **({"reason": res["skipped"]} if status == "skipped" else {}), **res}
        except (ProbeSkipped, ImportError, FileNotFoundError, NotImplementedError) as e:
            res = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
        except Exception as e:
            traceback.print_exc()
            res = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
            failed.append(name)
        if res["status"] != "ok":
            print(f"  {res['status']}: {res['reason']}")
        res["seconds"] = time.time() - t0
        ctx["results"][name] = res
    results = {"meta": {"checkpoint": ckpt_path, "iter_num": ckpt.get("iter_num"), "dataset": ds, "tok_path": tok_path,
                        "split": s["split"], "n_eval_clips": int(len(eval_clips)), "selection": ctx["selection"],
                        "seed": s["seed"], "device": dev, "settings": {k: v for k, v in s.items() if k != "REPORT"},
                        "tokenizers": {k: v.get("tokenizer") for k, v in meta["modalities"].items()},
                        "report_figures": REPORT},
               "table": ctx["table"], "probes": ctx["results"]}
    results = _jsonable(results)
    d = os.path.join(s["out_dir"], "eval", s["split"])
    os.makedirs(d, exist_ok=True)
    _write_atomic(os.path.join(d, "results.json"), json.dumps(results, indent=1))
    _write_atomic(os.path.join(d, "report.html"), render_report(results, ctx))
    print(f"wrote {d}/results.json and {d}/report.html")
    results["failed"] = failed
    return results


def default_settings():
    import configurator
    return {k: v for k, v in configurator.settings(globals()).items() if k not in ("REPORT", "ALL_PROBES", "PROBES",
                                                                                  "IMAGENET_CLASSES")}


if __name__ == "__main__":
    import configurator
    try:
        cfg = configurator.apply_overrides(default_settings(), sys.argv[1:])
    except configurator.ConfigError as e:
        sys.exit(f"evaluate.py: {e}")
    try:
        out = run(cfg)
    except (M.EmptySplitError, M.UntrustedFileError) as e:
        sys.exit(f"evaluate.py: {e}")
    if out["failed"]:
        sys.exit(f"evaluate.py: probe(s) failed: {', '.join(out['failed'])} (see the traceback above)")
