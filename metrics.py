"""
What evaluate.py's probes compute from arrays, with no model under test in it: intervals (Wilson, ratio,
clustered, bootstrap, jackknife), entropies, rankings with ties shared fairly, retrieval from score matrices,
the exact caption hypotheses of the classes, the documented clip selections, errors of decoded depth and
normal maps, and the judges that are not the model (a token-histogram regression, a small picture reader, the
time-structure judge, the paired Frechet distance). token_probe.py uses the same selections and judge.
"""
import math

import numpy as np
import torch
from tqdm import tqdm

import modalities as M
import streams as S


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


def prior_removed(s):
    """Scores [Q, G] less each candidate's mean over the queries (its prior likelihood)."""
    return s - s.mean(axis=0, keepdims=True)


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
    """-> list of int arrays: each class's caption as training scores it, streams.encode_caption(
    caption_text(c)) with its trailing padding (after the first end-of-text) set to M.IGNORE_ID: queried,
    not scored (modalities.caption_scored). Two classes with identical ids are an error."""
    hyps = []
    for c in class_names:
        ids = torch.from_numpy(S.encode_caption(S.caption_text(c)))
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
# the documented selections of clips and views

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


def first_of_each_class(order, labels, num_classes, k):
    """The first k rows of `order` of each class, class by class."""
    labels = np.asarray(labels)
    return np.array([i for c in range(num_classes) for i in [j for j in order if labels[j] == c][:k]],
                    dtype=np.int64)


# -----------------------------------------------------------------------------------------------------
# rgb -> depth / normal: the picture-blind baseline and the errors of decoded maps

def per_position_majority(ids):
    """ids [N, L] -> [L]: the most frequent id at each stream position (a predictor that never looks at
    the input, but knows where in the stream it is: a floor near the bottom of a picture, say)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.array([np.bincount(ids[:, j]).argmax() for j in range(ids.shape[1])], dtype=np.int64)


def depth_metrics(pred, gt, far=None, masks=None):
    """Per-image depth errors of decoded maps pred, gt [N, H, W] (the same units): RMSE, AbsRel
    (mean |p - g| / g) and the share of pixels with max(p / g, g / p) < 1.25, over pixels with g > 0.
    far: also the RMSE over the pixels whose truth is at least that far and over the rest (nan where an image
    has none), to show where the error lies: a far field such as the sky can hold most of it.
    masks (Bool [N, H, W], where the object is, when the world knows it): also its outline's edge F1, and the
    same on the images whose object is in the smallest third by area (nan on the others)."""
    p, g = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    valid = g > 0
    n = valid.sum((1, 2)).clip(min=1)
    d = np.where(valid, p - g, 0.0)
    rmse = np.sqrt((d ** 2).sum((1, 2)) / n)
    absrel = np.where(valid, np.abs(d) / np.where(valid, g, 1.0), 0.0).sum((1, 2)) / n
    ratio = np.maximum(p, 1e-9) / np.where(valid, g, 1.0)
    within = (valid & (np.maximum(ratio, 1 / ratio) < 1.25)).sum((1, 2)) / n
    out = {"rmse": rmse, "absrel": absrel, "delta1": within, "edge_f1": edge_f1(p, g)}
    if far is not None:
        for key, part in (("rmse_far", valid & (g >= far)), ("rmse_near", valid & (g < far))):
            k = part.sum((1, 2))
            out[key] = np.where(k > 0, np.sqrt(np.where(part, d ** 2, 0.0).sum((1, 2)) / k.clip(min=1)), np.nan)
    if masks is not None:
        out["outline_f1"] = outline_f1(p, g, masks)
        area = np.asarray(masks).sum((1, 2))
        out["outline_f1_small"] = np.where(area <= np.quantile(area, 1 / 3), out["outline_f1"], np.nan)
    return out


def depth_edges(d, ratio=1.25):
    """Bool [N, H, W]: pixels whose depth differs from their left or upper neighbour's by more than `ratio` times
    (delta1's 1.25): an object's outline against what lies behind it, where a floor's gradient stays under it."""
    step = np.log(ratio)
    log_d = np.log(np.maximum(d, 1e-9))
    e = np.zeros(log_d.shape, dtype=bool)
    e[:, :, 1:] |= np.abs(np.diff(log_d, axis=2)) > step
    e[:, 1:, :] |= np.abs(np.diff(log_d, axis=1)) > step
    return e


def near_pixels(e, r):
    """Bool [N, H, W] -> where a True pixel lies within r pixels (a (2r + 1)^2 square; nothing beyond the border)."""
    H, W = e.shape[1:]
    pad = np.pad(e, ((0, 0), (r, r), (r, r)))
    out = np.zeros_like(e)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= pad[:, dy:dy + H, dx:dx + W]
    return out


def matched_edge_f1(ep, eg, scored_p, scored_g, tol):
    """Per-image F1 of predicted edges ep against true edges eg (Bool [N, H, W]), an edge matched when one of the
    other map lies within tol pixels; precision over the predicted edges in scored_p, recall over the true ones in
    scored_g. nan where scored_g is empty."""
    n_p, n_g = scored_p.sum((1, 2)), scored_g.sum((1, 2))
    precision = (scored_p & near_pixels(eg, tol)).sum((1, 2)) / np.maximum(n_p, 1)
    recall = (scored_g & near_pixels(ep, tol)).sum((1, 2)) / np.maximum(n_g, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return np.where(n_g > 0, f1, np.nan)


def edge_f1(pred, gt, tol=2):
    """Per-image F1 of the predicted depth edges (depth_edges) against the true ones, an edge found when one of
    the other map lies within tol pixels (an outline one or two pixels off still counts); nan where the truth
    has no edge. A map that draws the silhouettes scores near 1, a smooth mean map near 0."""
    ep, eg = depth_edges(pred), depth_edges(gt)
    return matched_edge_f1(ep, eg, ep, eg, tol)


def outline_f1(pred, gt, masks, tol=2, band=4):
    """edge_f1 on one object's outline only (masks: Bool [N, H, W], where the object is, e.g. ToyZoo's animal):
    the true depth edges within 1 px of the mask's border are to be found, and the predicted edges within `band`
    px of it are to be right; the floor's and other objects' edges elsewhere do not count. nan where the truth
    draws no edge on the outline."""
    masks = np.asarray(masks, dtype=bool)
    border = masks & near_pixels(~masks, 1)
    ep, eg = depth_edges(pred), depth_edges(gt)
    return matched_edge_f1(ep, eg, ep & near_pixels(border, band), eg & near_pixels(border, 1), tol)


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


# -----------------------------------------------------------------------------------------------------
# judges of generated audio and distances between sets of clips

def audio_table_ce(train_codes, train_labels, codes, labels, frames, lam=0.8, smoothing=0.5):
    """Per-id CE (nats) of each level's code at `frames` of codes [n, K, T] (labels [n]) under tables fit on
    train_codes [N, K, T]: the class's unigram of that level (add-`smoothing` over the V = max code + 1 codes),
    and a class bigram on the previous frame's code of the same level, mixed lam : 1 - lam with that unigram.
    What a reader of the previous frame alone gets: the figure a model given every frame before should beat."""
    V = int(max(train_codes.max(), codes.max())) + 1
    C, K = int(max(train_labels.max(), labels.max())) + 1, train_codes.shape[1]
    ck = (train_labels[:, None] * K + np.arange(K))[:, :, None]                       # [N, K, 1]: class x level
    uni = np.full((C * K, V), float(smoothing))
    np.add.at(uni, (np.broadcast_to(ck, train_codes.shape), train_codes), 1)
    uni /= uni.sum(1, keepdims=True)
    pair_keys = ((ck * V + train_codes[:, :, :-1]) * V + train_codes[:, :, 1:]).ravel()
    pairs, pair_n = np.unique(pair_keys, return_counts=True)
    prevs, prev_n = np.unique(pair_keys // V, return_counts=True)
    t = np.asarray(frames)
    q_ck = np.broadcast_to((labels[:, None] * K + np.arange(K))[:, :, None], (len(labels), K, len(t)))
    cur, prev = codes[:, :, t], codes[:, :, t - 1]
    def look(table, n, keys):   # each key's count in the sorted table, 0 where it is absent
        i = np.minimum(np.searchsorted(table, keys), len(table) - 1)
        return np.where(table[i] == keys, n[i], 0)

    pk = (q_ck * V + prev) * V + cur
    n_pair, n_prev = look(pairs, pair_n, pk), look(prevs, prev_n, pk // V)
    p_uni = uni[q_ck, cur]
    p_big = np.where(n_prev > 0, n_pair / np.maximum(n_prev, 1), p_uni)   # an unseen previous code: the unigram
    return {"unigram": float(-np.log(p_uni).mean()), "bigram": float(-np.log(lam * p_big + (1 - lam) * p_uni).mean()),
            "lam": lam, "n_ids": int(p_uni.size)}


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
