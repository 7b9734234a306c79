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
             never sees the picture) and its single most frequent token. Then the predicted maps decoded
             with the dataset's tokenizer against the decoded ground truth (--structure_decode: by default
             each cell's expected mean with its likeliest shape for depth and its expected patch for normals
             where the tokenizer has patch vectors, else the argmax ids): depth RMSE, AbsRel, pixels within
             1.25x and the F1 of its edges; on a ToyZoo world also the F1 of the edges on the animal's outline
             (its masks re-rendered: toyzoo.animal_masks), overall and for the third of the pictures with the
             smallest animals; normal mean angular error and pixels within 11.25 degrees; each beside the
             per-position mean of decoded train maps (the one to beat) and a constant map.
  memo       audio-suffix completion top-1 (first 80% of the audio + rgb + caption in, last 20% out) on train
             vs split clips. Baselines: 1/2048, train-majority token, the per-position train majority,
             repeating the last given frame. Then the audio's order as the model reads it: the CE of every
             16th frame given the caption and every frame before it, beside a class bigram on the previous
             frame fit on train (the one to beat), and given the caption alone, beside the class unigram.
  generation class-only and continuation samples (generation.generate), decoded with the dataset's audio
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
import functools
import html
import io
import json
import math
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import generation
import modalities as M
import streams as S
from metrics import (wilson_ci, mean_ci, ratio_ci, clustered_accuracy, bootstrap_ci, marginal_entropy,
                     audio_table_ce, entropy_bias_corrected, cross_entropy_to_marginal, fair_hits, classification_metrics,
                     retrieval_metrics, class_level_retrieval, class_pivot_scores, fuse_scores, fit_token_judge,
                     fit_grid_reader, caption_hypotheses, caption_class_scores, seeded_views, clip_order,
                     first_of_each_class, prior_removed, per_position_majority, depth_metrics, unit_vectors,
                     normal_vectors, normal_metrics, structure_scores, paired_fad, matched_rows)

# -----------------------------------------------------------------------------------------------------
# settings (override with --key=value, see configurator.py)
out_dir = 'out/toyzoo'          # the checkpoint dir to evaluate (default: the quickstart run)
split = 'test'
probes = 'all'
num_clips = 0            # 0 = every clip of the split; else the first num_clips (see clip_order)
gallery = 100            # retrieval gallery size G
structure_views = 2      # views per clip for rgb -> depth / normal (110 test clips x 2 = 220 images, 43k tokens)
structure_train_maps = 200  # decoded train maps behind the per-position mean map baseline
structure_decode = 'auto'   # rgb -> depth / normal maps: 'mean' (each cell's expected patch), 'shape_mode' (its
                             # expected mean code with the likeliest shape code), 'argmax' (the likeliest id), 'mbr'
                             # (the id nearest the expected patch); 'auto' (chosen on val): depth 'shape_mode', normals
                             # 'mean' where the tokenizer has patch vectors (patch_kmeans), else 'argmax' (DiVAE)
memo_clips = 0           # clips per side of the memorization probe (0 = as many as the eval set)
suffix_frac = 0.2        # the memorization probe / continuation predict this last fraction of the audio
gen_per_class = 2        # generation probes: clips (and class-only samples) per class
gen_steps = 16
gen_schedule = 'maskgit'
gen_temperature = 1.0
gen_guidance = 3.0       # classifier-free guidance scale, as sample.py's default (1.0 = conditional pass alone)
gen_by_level = False     # audio one codebook level at a time (a model trained with train.py's --audio_levels)
gen_remask_noise = 0.0   # MaskGIT's annealed Gumbel noise on the confidences (sample.py's remask_noise)
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
# model adapters: the only code that calls the network

def positions(name, idx=None):
    """Global positions of a modality's stream indices (all when idx is None)."""
    m = M.modality_index(name)
    idx = torch.arange(M.MODALITIES[m].length) if idx is None else torch.as_tensor(idx)
    return M.POS_OFFSETS[m] + idx


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
        e_ids, e_pos, e_valid = generation.pack_inputs(chunk, device)
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


def expected_patches(model, rgb, target, device, bs, tok, shape_mode=False):
    """generation.expected_patches of target from the given pictures rgb [B, 196], in chunks of bs -> (Float
    [B, 196, D], Long [B, 196]). tok: the target's tokenizer, with a patch vector per id (id_features);
    shape_mode: the expected mean with the likeliest shape (a product code's factors)."""
    _, feats, factors = generation.patch_read_out("shape_mode" if shape_mode else "mean", tok, target,
                                                  "structure_decode")
    out = [generation.expected_patches(model, {"tok_rgb": rgb[s:s + bs]}, target, feats, device, factors)
           for s in range(0, len(rgb), bs)]
    return torch.cat([v for v, _ in out]).cpu(), torch.cat([a for _, a in out]).cpu()


def mbr_ids(model, rgb, target, device, bs, tok):
    """Long [B, 196]: per cell, the id nearest the expected patch (expected_patches)."""
    v, _ = expected_patches(model, rgb, target, device, bs, tok)
    return tok.ids_from_vectors(v.reshape(-1, v.size(-1)).to(tok.device)).view(v.shape[:2]).cpu()


# -----------------------------------------------------------------------------------------------------
# the data the probes read, and the lines of the summary table

@dataclass(frozen=True)
class EvalData:
    """The tokenized data the probes read: the evaluated split and the train split beside it, with the
    documented selections (clip_order, one seeded view per clip). The runner makes it once."""
    split: str              # the evaluated split
    arrays: dict            # split name -> modalities.open_split arrays: the evaluated split, and train
    class_names: list
    clips: np.ndarray       # the evaluated clips: the first num_clips of the split's clip_order
    views: np.ndarray       # their seeded view
    order: np.ndarray       # the split's clip_order (the retrieval gallery, the generated clips)
    views_of: np.ndarray    # the seeded view of every clip of the split
    seed: int
    tok_path: str
    meta: dict

    @property
    def train(self):
        """The split baselines, judges and references are fit on: train, else the evaluated one."""
        return "train" if "train" in self.arrays else self.split

    @property
    def held_out(self):
        return "train" in self.arrays and self.split != "train"

    @property
    def selection(self):
        return (f"the first {len(self.clips)} clips of the split, round-robin over the classes, one view per "
                "clip drawn from numpy default_rng([seed, 1])")

    def tokens(self, split, clips, views):
        """({modality: LongTensor [n, L]}, labels [n] numpy) of the (clip, view) pairs of a split."""
        tokens, labels = M.gather_views(self.arrays[split], clips, views)
        return tokens, labels.numpy()


def row(metric, value, ci=None, n=None, random=None, random_name="", report=None, unit="%", extra=None,
        differs=None):
    """One line of the summary table (the runner adds the probe's name). differs: how this figure's definition
    differs from the report's (head, gallery size, guidance, classes), said beside the report's number so it
    is never read as a like-for-like comparison; None when it is measured the report's way."""
    r = {"metric": metric, "model": value, "ci": list(ci) if ci is not None else None, "n": n, "random": random,
         "random_name": random_name, "report": report, "unit": unit,
         "report_differs": differs if report is not None else None}
    return {**r, **(extra or {})}


def fmt(v, unit):
    return ("n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else
            f"{100 * v:.1f}%" if unit == "%" else f"{v:.3f}")


def print_row(r):
    f = lambda v: fmt(v, r["unit"])
    cis = f" [{f(r['ci'][0])}, {f(r['ci'][1])}]" if r["ci"] is not None else ""
    rep = f" | report {f(r['report'])}" if r["report"] is not None else ""
    if r["report"] is not None and r["report_differs"]:
        rep += f" (not comparable: {r['report_differs']})"
    print(f"  {r['metric']:<42s} model {f(r['model'])}{cis} (n={r['n']}) | {r['random_name'] or 'random'} "
          f"{f(r['random'])}{rep}")


REPORT_CLASSES, REPORT_GALLERY = 11, 200   # the report's 11 classes (chance 9.1%); R@5 chance 2.5% = 5 / 200


def full_head(model):
    return getattr(model.config, "head", "modality") == "full"


def head_differs(model):
    """How this model's CE differs from the report's (None when it trained the report's head)."""
    if full_head(model):
        return None
    return ("the report's CE is over one softmax of all 50,304 ids; this model's head (head='modality') scores "
            "each token over its own modality's ids only (audio: 2,048), a smaller figure for the same fit")


def classes_differ(C):
    return None if C == REPORT_CLASSES else f"{C} classes here (chance {100 / C:.1f}%), the report's 11 (9.1%)"


def all_given(x):
    return torch.ones_like(x, dtype=torch.bool)


class ProbeSkipped(Exception):
    """A probe that does not apply here (a tokenizer that cannot decode offline, a missing extra)."""


# -----------------------------------------------------------------------------------------------------
# the probes: each takes what it reads and returns (its results, its lines of the summary table)

def masking_config(ckpt_config):
    """The masking the checkpoint trained with, from the settings train.py recorded in its config."""
    import masking
    return masking.MaskingConfig.from_settings(ckpt_config)   # grouped, or flat in older checkpoints


@torch.no_grad()
def row_ce(model, b):
    """{modality: [(CE sum, scored targets)] per row of batch b}: the model's own loss (the head it trained),
    one row at a time, so that rows (not their correlated tokens) are the interval's sampling unit."""
    per_row = {name: [] for name in M.MODALITY_NAMES}
    keys = ("enc_ids", "enc_pos", "enc_valid", "dec_pos", "dec_valid", "dec_ids")
    for i in range(b["enc_ids"].size(0)):
        _, per_modality = model(*(b[k][i:i + 1] for k in keys))
        for name, (s, n) in per_modality.items():
            if n > 0:
                per_row[name].append((float(s), int(n)))
    return per_row


def probe_ce(model, data, mask_cfg, batches, batch_size, device):
    import masking
    gen = torch.Generator().manual_seed(data.seed + 7919)
    rng = np.random.default_rng([data.seed, 11])
    per_row = {name: [] for name in M.MODALITY_NAMES}
    for _ in tqdm(range(batches), desc="ce", leave=False):
        idx = rng.integers(0, len(data.clips), batch_size)
        tokens, _ = data.tokens(data.split, data.clips[idx], rng.integers(0, M.NUM_VIEWS, len(idx)))
        b = masking.build_batch(tokens, mask_cfg, gen)
        for name, r in row_ce(model, {k: v.to(device) for k, v in b.items()}).items():
            per_row[name] += r
    out = {"masking": "masking.build_batch with the checkpoint's masking settings, generator seed "
                      f"{data.seed + 7919}; {batches} batches of {batch_size} (clip, view) draws",
           "per_modality": {}}
    rows, full = [], full_head(model)
    for m in M.MODALITIES:
        if not per_row[m.name]:
            continue
        sums, counts = zip(*per_row[m.name])
        # the token-weighted mean over (clip, view) rows, its CI by the ratio estimator (the mean of per-row
        # means is another figure: its interval used to miss the point, e.g. normals 4.43 [3.20, 4.16])
        ce, lo, hi = ratio_ci(sums, counts)
        # a uniform guess over the ids the CE is taken over: the modality's own, or every row (head='full')
        uniform = math.log(model.lm_head.weight.shape[0] if full else m.vocab)
        out["per_modality"][m.name] = {"ce": ce, "ci": [lo, hi], "n_tokens": int(sum(counts)),
                                       "n_samples": len(sums), "uniform": uniform}
        rows.append(row(f"eval CE {m.name} (nats)", ce, (lo, hi), int(sum(counts)), uniform,
                        "log(all ids)" if full else "log(vocab)", REPORT["audio_ce"] if m.name == "tok_audio" else None,
                        unit="nats", differs=head_differs(model)))
    return out, rows


def probe_entropy(data, audio_ce=None, ce_differs=None):
    """audio_ce: the ce probe's tok_audio figures ({'ce', 'ci', 'n_tokens'}) for the conditional gap, or None;
    ce_differs: how that CE differs from the report's."""
    V = M.BY_NAME["tok_audio"].vocab
    a = np.asarray(data.arrays[data.split]["tok_audio"][data.clips]).reshape(len(data.clips), -1)
    h = marginal_entropy(a, V)
    # The plug-in falls with fewer clips (default test split: 27 clips 6.83, 55 7.00, all 110 7.10; the 880
    # train clips 7.24). The report's figure is a plug-in, so it stays the headline and the gap's reference;
    # the corrected value comes beside it. (A percentile interval, [6.94, 7.05], excluded the point itself.)
    corrected, lo, hi = entropy_bias_corrected(a, V, seed=data.seed)
    out = {"marginal_entropy": h, "bias_corrected": corrected, "bias_corrected_ci": [lo, hi],
           "n_tokens": int(a.size), "n_clips": len(a), "log_vocab": math.log(V)}
    rows = [row("audio marginal entropy, plug-in on the split (nats)", h, None, int(a.size), math.log(V),
                f"log {V}", REPORT["audio_marginal_entropy"], unit="nats"),
            row("... bootstrap bias-corrected (nats)", corrected, (lo, hi), int(a.size), math.log(V), f"log {V}",
                None, unit="nats")]
    if data.held_out:
        xe = cross_entropy_to_marginal(a, np.asarray(data.arrays["train"]["tok_audio"]), V)
        out["ce_under_train_marginal"] = xe
        rows.append(row("audio CE of a train-marginal predictor", xe, None, int(a.size), math.log(V), f"log {V}",
                        None, unit="nats"))
    if audio_ce:
        gap = h - audio_ce["ce"]
        out["conditional_gap"] = gap
        rows.append(row("conditional gap: entropy - audio CE (nats)", gap,
                        (h - audio_ce["ci"][1], h - audio_ce["ci"][0]), audio_ce["n_tokens"], 0.0, "no structure",
                        REPORT["audio_marginal_entropy"] - REPORT["audio_ce"], unit="nats", differs=ce_differs))
    else:
        out["conditional_gap"] = None
        out["note"] = "run the ce probe too for the conditional gap"
    return out, rows


def token_judge(data):
    """(judge, how): fit_token_judge on the audio ids of every train clip, one seeded view each."""
    arrays = data.arrays[data.train]
    clips = clip_order(arrays)
    tokens, y = data.tokens(data.train, clips, seeded_views(len(arrays["label"]), 3, data.seed)[clips])
    judge = fit_token_judge(tokens["tok_audio"].numpy(), y, len(data.class_names), M.BY_NAME["tok_audio"].vocab)
    return judge, f"logistic regression on audio token histograms of {len(y)} {data.train} clips (one view each)"


def class_scores(model, ids, names, source, device, bs):
    """[N, C] log-likelihood of each class's caption given each row of the source's ids [N, length]."""
    inputs = {source: (ids, all_given(ids))}

    def score_fn(length, hyp_ids):
        return score_hypotheses(model, inputs, "caption", np.arange(length), hyp_ids, device, bs, reduce="sum",
                                desc=f"class from {source} (caption length {length})")

    return caption_class_scores(score_fn, names)


def probe_class(model, data, judge, class_views, device, bs):
    """judge: (function audio ids -> class, how), the token judge."""
    clips, views = data.clips, data.views
    tokens, labels = data.tokens(data.split, clips, views)
    names, C = data.class_names, len(data.class_names)
    scores = class_scores(model, tokens["tok_audio"], names, "tok_audio", device, bs)
    out = classification_metrics(scores, labels, names, seed=data.seed)
    out["selection"] = data.selection
    # the hypotheses must be what training saw: compare with the stored captions of these clips
    hyps = caption_hypotheses(names)
    cap = tokens["caption"]
    same = [np.array_equal(M.caption_targets(cap[i]).numpy(), hyps[labels[i]]) for i in range(len(labels))]
    out["hypothesis_equals_stored_caption"] = float(np.mean(same))
    if not all(same):
        print(f"  warning: {100 * (1 - np.mean(same)):.1f}% of the clips' stored captions differ from "
              "encode_caption(caption_text(class)); the class hypotheses may not be what training saw")
    rows = [row("audio -> class top-1", out["top1"]["value"], out["top1"]["ci"], out["n"], 1 / C, "chance 1/C",
                REPORT["class_top1"], differs=classes_differ(C))]
    if "top5" in out:
        rows.append(row("audio -> class top-5", out["top5"]["value"], out["top5"]["ci"], out["n"], min(5 / C, 1.0),
                        "chance 5/C", REPORT["class_top5"], differs=classes_differ(C)))
    # what the tokens allow: the same clips classified by a linear probe on their audio token histograms
    k = int((judge[0](tokens["tok_audio"].numpy()) == labels).sum())
    out["token_histogram_probe"] = {"value": k / len(labels), "ci": wilson_ci(k, len(labels)), "n": int(len(labels)),
                                    "judge": judge[1]}
    rows.append(row("reference: linear probe on token histograms", k / len(labels), wilson_ci(k, len(labels)),
                    int(len(labels)), 1 / C, "chance 1/C"))
    # more views of the same clips: the seeded view's figure rests on one 3.4 s window per clip; averaging
    # every view tightens it, and summing a clip's views' log-likelihoods classifies the whole 10 s clip
    V = min(int(class_views), M.NUM_VIEWS)
    if V > 1:
        extra = [(views + j) % M.NUM_VIEWS for j in range(1, V)]
        more, _ = data.tokens(data.split, np.tile(clips, V - 1), np.concatenate(extra))
        more_scores = class_scores(model, more["tok_audio"], names, "tok_audio", device, bs)
        s_all = np.concatenate([scores[None], more_scores.reshape(V - 1, len(clips), C)])
        hits = np.stack([fair_hits(s, labels, (1,))[:, 0] for s in s_all], 1)              # [clips, V]
        acc, lo, hi = clustered_accuracy(hits)       # the views of a clip are not independent draws
        out["views"] = {"views_per_clip": V, "top1": {"value": acc, "ci": (lo, hi)}}
        rows.append(row(f"audio -> class top-1, mean of {V} views", acc, (lo, hi), int(hits.size), 1 / C,
                        "chance 1/C"))
        clip_hits = fair_hits(s_all.sum(axis=0), labels, (1,))[:, 0]
        ci = wilson_ci(clip_hits.sum(), len(labels))
        out["whole_clip"] = {"views_summed": V, "top1": {"value": float(clip_hits.mean()), "ci": ci}}
        rows.append(row(f"audio -> class top-1, whole clip ({V} views)", float(clip_hits.mean()), ci,
                        int(len(labels)), 1 / C, "chance 1/C"))
    # the same captions given the picture: retrieval needs the class from both sides
    r = classification_metrics(class_scores(model, tokens["tok_rgb"], names, "tok_rgb", device, bs), labels, names,
                               seed=data.seed)
    out["rgb_to_class"] = {k: r[k] for k in ("top1", "n")}
    rows.append(row("rgb -> class top-1 (for retrieval)", r["top1"]["value"], r["top1"]["ci"], r["n"], 1 / C,
                    "chance 1/C"))
    return out, rows


# ---- retrieval

def direct_scores(model, tokens, q, c, device, bs):
    """[G, G] retrieval score of every (query, candidate) pair: the mean log-prob of all of the candidate's
    c tokens given all of the query's q tokens."""
    inputs = {q: (tokens[q], all_given(tokens[q]))}
    return score_hypotheses(model, inputs, c, np.arange(M.BY_NAME[c].length), tokens[c].numpy(), device, bs,
                            reduce="mean", desc=f"retrieval {q}->{c}")


def ranked(m, labels=None):
    """retrieval_metrics of a score matrix, with its class_level_retrieval when labels are given."""
    r = retrieval_metrics(m)
    if labels is not None:
        r["class_level"] = class_level_retrieval(m, labels)
    return r


def r5_rows(key, r, label):
    """The R@5 line of a ranking (none when the gallery is under 5)."""
    G = r["gallery"]
    return [row(f"{key} R@5, {label}", r["R@5"]["value"], r["R@5"]["ci"], G, 5 / G, "chance k/G")] if "R@5" in r else []


def one_direction(s, labels, key):
    """The figures of one direction's direct scores s [G, G]: -> (figures, table lines)."""
    G = len(s)
    r = ranked(s, labels)
    # the same scores with each candidate's mean score over queries removed (its prior likelihood)
    r["prior_removed"] = ranked(prior_removed(s), labels)
    differs = None if G == REPORT_GALLERY else \
        f"a gallery of {G} here (R@5 chance {500 / G:.1f}%), the report's {REPORT_GALLERY} (2.5%)"
    rows = [row(f"{key} R@{k}", r[f"R@{k}"]["value"], r[f"R@{k}"]["ci"], G, k / G, "chance k/G",
                REPORT["retrieval_r5"] if k == 5 else None, differs=differs) for k in (1, 5, 10) if f"R@{k}" in r]
    rows += r5_rows(key, r["prior_removed"], "candidate prior removed")
    # does the score know the class at all? (the goal's R@5 >= 80% is above what the class alone can give)
    c = r["prior_removed"]["class_level"]
    rows.append(row(f"{key} top-1 of the same class, prior removed", c["top1_same_class"]["value"],
                    c["top1_same_class"]["ci"], G, c["top1_same_class"]["chance"], "chance"))
    if "R@5" in c["class_only_ceiling"]:
        print(f"  {key}: a scorer that knew only the class would reach R@5 "
              f"{100 * c['class_only_ceiling']['R@5']:.1f}% on this gallery")
    if "class_effect" in c:
        print(f"  {key}: the score moves {c['class_effect']:.3f} nats/token with the class and "
              f"{c['clip_effect']:.3f} more with the very clip; unrelated pairs spread {c['other_class_sd']:.3f}")
    return r, rows


def probe_retrieval(model, data, gallery, views_per_clip, device, bs, rgb_reader=None):
    """rgb_reader: None, or a function -> (rgb ids -> class log-probs, how) for the reference-reader diagnostic."""
    G = min(gallery, len(data.order))
    clips = data.order[:G]
    views = data.views_of[clips]
    tokens, labels = data.tokens(data.split, clips, views)
    out = {"gallery": f"the first {G} clips of the {data.split} split, round-robin over the classes, one view each "
                      f"(view drawn per clip from seed {data.seed}); score(q, c) = mean log-prob of all of c's "
                      "target tokens given all of q's tokens (exact: G decoder passes, each scoring every candidate)"}
    rows = []
    s_ar, s_ra = (direct_scores(model, tokens, q, c, device, bs) for q, c in (("tok_audio", "tok_rgb"),
                                                                             ("tok_rgb", "tok_audio")))
    for key, s in (("audio->rgb", s_ar), ("rgb->audio", s_ra)):
        out[key], r = one_direction(s, labels, key)
        rows += r
    # Both directions at once: each prior-removed score estimates the same pointwise mutual information,
    # log p(c | q) - log p(c) = log p(q | c) - log p(q), from the other side, so their sum averages two
    # noisy estimates (the G decoder passes of each direction are already paid for above).
    both = prior_removed(s_ar) + prior_removed(s_ra).T
    for key, m in (("audio->rgb", both), ("rgb->audio", both.T)):
        out[key]["both_directions"] = ranked(m, labels)
        rows += r5_rows(key, out[key]["both_directions"], "both directions' scores summed")
    # Through the class (the class probe's captions scored from each side): the direct scores above follow
    # what the two streams share token by token (in ToyZoo mostly the habitat) and barely the class; the
    # pivot adds the class as each side names it, and the fused score both.
    logp = {m: class_scores(model, tokens[m], data.class_names, m, device, bs) for m in ("tok_audio", "tok_rgb")}
    pivot = class_pivot_scores(logp["tok_audio"], logp["tok_rgb"])                     # [audio, rgb]
    out["class_pivot"] = {"how": "log sum_k p(k|audio) p(k|rgb) / p(k): class posteriors from the caption "
                                 "likelihoods given each side, uniform class prior"}
    out["fused"] = {"how": "per-query standardised sum of the both-directions score and the class pivot"}
    for key, b, piv in (("audio->rgb", both, pivot), ("rgb->audio", both.T, pivot.T)):
        for name, m, label in (("class_pivot", piv, "through the class alone"),
                               ("fused", fuse_scores(b, piv), "both directions + through the class")):
            out[name][key] = ranked(m, labels)
            rows += r5_rows(key, out[name][key], label)
    if rgb_reader is not None:
        try:
            out["reference_reader"], r = reader_diagnostic(rgb_reader(), tokens, labels, logp["tok_audio"], both)
            rows += r
        except ProbeSkipped as e:
            print(f"  reference reader skipped: {e}")
            out["reference_reader"] = {"skipped": str(e)}
    V = min(int(views_per_clip), M.NUM_VIEWS)
    if V > 1:
        out["whole_clip"], r = whole_clip_retrieval(model, data, clips, views, labels, both, logp, V, device, bs)
        rows += r
    return out, rows


def whole_clip_retrieval(model, data, clips, views, labels, both, logp, V, device, bs):
    """Whole clips: one view says little of the class in a picture (an animal seen end-on, half hidden); a
    clip's views together say more. Each pair's both-directions score is summed over the views (audio window v
    with frame v) and the caption log-likelihoods too (the class posterior of all the views, as the class
    probe's whole clip), then ranked as the single view. -> (figures, table lines)."""
    G, names = len(clips), data.class_names
    both_v, logp_v = both.copy(), {m: v.copy() for m, v in logp.items()}
    for j in range(1, V):
        t, _ = data.tokens(data.split, clips, (views + j) % M.NUM_VIEWS)
        s_ar = direct_scores(model, t, "tok_audio", "tok_rgb", device, bs)
        s_ra = direct_scores(model, t, "tok_rgb", "tok_audio", device, bs)
        both_v += prior_removed(s_ar) + prior_removed(s_ra).T
        for m in logp_v:
            logp_v[m] += class_scores(model, t[m], names, m, device, bs)
    pivot_v = class_pivot_scores(logp_v["tok_audio"], logp_v["tok_rgb"])
    out, rows = {"views_summed": V}, []
    for m in logp_v:          # how well each side names the class, one view vs the whole clip
        one, whole = (fair_hits(x, labels, (1,))[:, 0] for x in (logp[m], logp_v[m]))
        out[f"{m[4:]}_class_top1"] = {"one_view": float(one.mean()), "whole_clip": float(whole.mean())}
        rows.append(row(f"{m[4:]} -> class top-1 on the gallery, whole clip ({V} views)", float(whole.mean()),
                        wilson_ci(whole.sum(), G), G, 1 / len(names), "chance 1/C"))
    for key, b, piv in (("audio->rgb", both_v, pivot_v), ("rgb->audio", both_v.T, pivot_v.T)):
        for name, m in (("both_directions", b), ("class_pivot", piv), ("fused", fuse_scores(b, piv))):
            r = out.setdefault(name, {})[key] = ranked(m)
            rows += r5_rows(key, r, f"whole clip ({V} views), {name.replace('_', ' ')}")
    return out, rows


def fit_rgb_reader(data, epochs, trust):
    """-> (read, how): fit_grid_reader fit to every view of every train clip's picture, each id read as its
    tokenizer's vector where the tokenizer gives them; ProbeSkipped without a train split apart from the
    evaluated one."""
    if not data.held_out:
        raise ProbeSkipped("needs a train split other than the evaluated one to fit the reader on")
    import modality_tokenizers as T
    train, L = data.arrays["train"], M.BY_NAME["tok_rgb"].length
    x = np.asarray(train["tok_rgb"]).reshape(-1, L)
    y = np.repeat(np.asarray(train["label"]).astype(np.int64), M.NUM_VIEWS)
    feats = T.code_features(data.tok_path, data.meta, names=("tok_rgb",), trust=trust)["tok_rgb"]
    read = fit_grid_reader(x, y, len(data.class_names), M.BY_NAME["tok_rgb"].vocab, feats, epochs=epochs,
                           seed=data.seed, desc="reference reader: rgb -> class")
    return read, (f"{fit_grid_reader.__name__} fit to the {len(x)} train pictures ({epochs} epochs, ids read as "
                  f"{'their tokenizer vectors' if feats is not None else 'learnt rows'}); fused as the fused "
                  "score, with this rgb class posterior in the class pivot")


def reader_diagnostic(reader, tokens, labels, logp_audio, both):
    """The fused ranking again, with the rgb side's class posterior from a reader fit to the train pictures
    (reader = (read, how), fit_rgb_reader) instead of from the model's caption likelihoods; the audio side
    and the both-directions score stay the model's. How far retrieval would go if the model read the class
    from a picture as well as a small reader does: a diagnostic of what limits it, not a figure of the model."""
    read, how = reader
    logp_rgb = read(tokens["tok_rgb"].numpy())
    hit = fair_hits(logp_rgb, labels, (1,))[:, 0]
    G, C = len(labels), logp_rgb.shape[1]
    out = {"how": how, "rgb_class_top1": {"value": float(hit.mean()), "ci": wilson_ci(hit.sum(), G), "n": G}}
    rows = [row("rgb -> class top-1 of the reference reader (not the model)", float(hit.mean()),
                wilson_ci(hit.sum(), G), G, 1 / C, "chance 1/C")]
    pivot = class_pivot_scores(logp_audio, logp_rgb)
    for key, b, piv in (("audio->rgb", both, pivot), ("rgb->audio", both.T, pivot.T)):
        out[key] = ranked(fuse_scores(b, piv))
        rows += r5_rows(key, out[key], "fused, the rgb class from the reference reader (diagnostic)")
    return out, rows


# ---- rgb -> depth / normal

def train_majority(data, name):
    """The most frequent id of modality `name` in the train split."""
    a = np.asarray(data.arrays[data.train][name]).reshape(-1)
    return int(np.bincount(a.astype(np.int64), minlength=M.BY_NAME[name].vocab).argmax())


def train_position_majority(data, name, max_rows=4000):
    """per_position_majority over (a seeded subsample of) the train split's views of modality `name`."""
    a = np.asarray(data.arrays[data.train][name])
    a = a.reshape(-1, a.shape[-1])
    if len(a) > max_rows:
        a = a[np.sort(np.random.default_rng([data.seed, 7]).choice(len(a), max_rows, replace=False))]
    return per_position_majority(a)


def decoded_maps(tok, name, ids, device="cpu", vectors=False):
    """Decoded depth (float [N, H, W]) or normal (unit vectors [N, H, W, 3]) maps of ids [N, 196] (vectors=True:
    of patch vectors [N, 196, D], tok.decode_vectors)."""
    outs = []
    for s in range(0, len(ids), 32):
        x = torch.as_tensor(np.asarray(ids[s:s + 32])).to(device)
        x = tok.decode_vectors(x.float()) if vectors else tok.decode(x.long())
        outs.append(np.asarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x))
    x = np.concatenate(outs)
    return x.astype(np.float64) if name == "tok_depth" else normal_vectors(x)


STRUCTURE_METRICS = {  # decoded metric -> (label, unit, lower is better)
    "tok_depth": {"rmse": ("depth RMSE (decoded units)", "", True), "absrel": ("depth AbsRel", "", True),
                  "delta1": ("depth pixels within 1.25x", "%", False),
                  "edge_f1": ("depth edges (jumps > 1.25x) F1, within 2 px", "%", False),
                  "outline_f1": ("depth edges on the animal's outline F1 (ToyZoo's masks)", "%", False),
                  "outline_f1_small": ("the same, the third of the pictures with the smallest animals", "%", False),
                  "rmse_far": ("depth RMSE where the truth is far (train's farthest 10%)", "", True),
                  "rmse_near": ("depth RMSE where the truth is nearer", "", True)},
    "tok_normal": {"angle": ("normal mean angular error (degrees)", "", True),
                   "within_11.25": ("normal pixels within 11.25 degrees", "%", False)},
}


def structure_decoded(tok, tgt, pred_ids, true_ids, train_ids, train_split="train", train_maps=200, seed=0,
                      device="cpu", pred_vectors=False, masks=None):
    """Decoded metrics (tok: the dataset's tokenizer of tgt) of the predicted ids (pred_vectors=True: patch
    vectors [N, 196, D]) against the decoded ground truth, beside two baselines that never look at the
    picture: the per-position mean map of train_maps decoded train maps (train_ids: the train split's ids of
    tgt; the one to beat) and one constant map (the mean over every train pixel). masks: where the animal is in
    each image (toyzoo_masks), for the depth outline's F1. -> (figures, table lines)."""
    a = np.asarray(train_ids).reshape(-1, M.BY_NAME[tgt].length)
    pick = np.random.default_rng([seed, 8]).permutation(len(a))[:train_maps]
    train_maps = decoded_maps(tok, tgt, a[np.sort(pick)], device)
    gt, pred = decoded_maps(tok, tgt, true_ids, device), decoded_maps(tok, tgt, pred_ids, device, pred_vectors)
    mean_map = train_maps.mean(0)
    const = train_maps.reshape(-1, *train_maps.shape[3:]).mean(0) if tgt == "tok_normal" else train_maps.mean()
    const_map = np.broadcast_to(const, mean_map.shape)
    if tgt == "tok_normal":   # a mean of unit vectors is shorter than one: renormalise
        mean_map, const_map = unit_vectors(mean_map), unit_vectors(const_map)
    far = float(np.percentile(train_maps, 90)) if tgt == "tok_depth" else None
    if masks is not None and masks.shape != gt.shape[:3]:
        masks = None   # another map size than the world's frames
    fn = (lambda p, g: depth_metrics(p, g, far, masks)) if tgt == "tok_depth" else normal_metrics
    runs = {"model": fn(pred, gt), "per_position_mean": fn(np.broadcast_to(mean_map, gt.shape), gt),
            "constant": fn(np.broadcast_to(const_map, gt.shape), gt)}
    out = {"n_images": int(len(gt)), "train_maps": int(len(train_maps)), "train_split": train_split,
           "baseline_to_beat": "per_position_mean", "far_beyond": far}
    rows = []
    for key, (label, unit, _) in STRUCTURE_METRICS[tgt].items():
        if key not in runs["model"]:
            continue
        vals = {who: mean_ci(r[key][~np.isnan(r[key])]) for who, r in runs.items()}
        out[key] = {who: {"value": v[0], "ci": [v[1], v[2]]} for who, v in vals.items()}
        if not np.isfinite(vals["model"][0]):   # no image has pixels of that part
            continue
        n = int(np.isfinite(runs["model"][key]).sum())   # far / near: the images that have such pixels
        rows.append(row(f"rgb -> {tgt[4:]}, decoded: {label}", vals["model"][0], vals["model"][1:], n,
                        vals["per_position_mean"][0], "per-position train mean map (the one to beat)", unit=unit,
                        extra={"constant": vals["constant"][0]}))
    return out, rows


@torch.no_grad()
def cross_attention_locality(model, inputs, target, target_idx, near, device):
    """Where target queries look: the decoder's cross-attention from the stream indices target_idx of `target`
    to the given input tokens. near(e_pos [B, Ni], d_pos [n_t]) -> Bool [B, n_t, Ni] marks each query's own
    neighbourhood. -> {'near', 'uniform_near'}: the mass on it for the most local head of any layer, and for
    uniform attention. A model that draws a map from the picture, or fills a gap from the frames beside it,
    must look there."""
    grabbed = []
    hooks = [b.cross_attn.register_forward_hook(lambda mod, a, kw, out: grabbed.append((mod, a[0], kw["context"])),
                                                with_kwargs=True) for b in model.decoder]
    e_ids, e_pos, e_valid = generation.pack_inputs(inputs, device)
    d_pos = positions(target, target_idx).to(device)
    packed, model.packed = model.packed, False   # the padded trunk: its attention weights are per sample
    try:
        model.decode_hidden(e_ids, e_pos, e_valid, d_pos.expand(len(e_ids), -1), torch.ones(
            len(e_ids), len(d_pos), dtype=torch.bool, device=device))
    finally:
        model.packed = packed
        for h in hooks:
            h.remove()
    mask = near(e_pos, d_pos) & e_valid[:, None, :]
    attn_mask = model.cross_attn_mask(e_pos, e_valid, d_pos.expand(len(e_ids), -1))   # the model's own
    heads = []   # the near mass of every head of every layer
    for mod, x, memory in grabbed:
        q, k, _ = mod.qkv_heads(x, memory)
        w = (q @ k.transpose(-1, -2) * q.size(-1) ** -0.5)
        w = (w + attn_mask if attn_mask.is_floating_point() else w.masked_fill(~attn_mask, float("-inf"))).softmax(-1)
        heads += [(a * mask).sum(-1).mean().item() for a in w.unbind(1)]
    uniform = (mask.sum(-1) / e_valid.sum(-1, keepdim=True)).mean().item()
    return {"near": max(heads), "uniform_near": uniform, "n_rows": int(len(e_ids))}


def near_place(source, radius):
    """near() for cross_attention_locality: the given `source` tokens within `radius` places of the query
    (locality.place_distance: cells on the grids, so radius 1 is a cell's 3x3; frames on the audio)."""
    import locality
    def near(e_pos, d_pos):
        dist = locality.place_distance(locality.layout_places().to(e_pos.device), e_pos, d_pos.expand(len(e_pos), -1))
        return (dist <= radius) & (M.position_modality(e_pos) == M.modality_index(source))[:, None]
    return near


def audio_infill_locality(model, tokens, device, seed=0):
    """The caption and a random half of the audio frames given (the condition of MaskGIT's later steps), the
    other frames queried: the attention mass on given frames within 2 frames of the queried one."""
    K, L = M.AUDIO_CODEBOOKS, M.BY_NAME["tok_audio"].length
    frames = torch.randperm(L // K, generator=torch.Generator().manual_seed(seed))[:L // K // 2]
    given = torch.zeros(L, dtype=torch.bool)
    given[(frames[:, None] * K + torch.arange(K)).flatten()] = True
    audio, cap = tokens["tok_audio"].long(), tokens["caption"].long()
    inputs = {"caption": (cap, all_given(cap)),
              "tok_audio": (audio, given.expand_as(audio))}
    return cross_attention_locality(model, inputs, "tok_audio", torch.nonzero(~given)[:, 0], near_place("tok_audio", 2),
                                    device)


@torch.no_grad()
def audio_next_frame(model, tokens, labels, train_codes, train_labels, device, bs, step=16):
    """Teacher-forced CE (nats per id) of the audio frames t = step, 2 * step, ... given the caption and every
    frame before t (the context a time-order sampler gives), and given the caption alone; each slot scored over
    its own codebook's V ids, as generation samples it. Beside them the class tables of metrics.audio_table_ce."""
    K, V, T = M.AUDIO_CODEBOOKS, M.AUDIO_CODEBOOK_SIZE, M.AUDIO_FRAMES
    audio, cap = tokens["tok_audio"].long(), tokens["caption"].long()
    frames = np.arange(step, T, step)
    own = torch.arange(K) * V                                    # slot K*t + k samples ids [k*V, (k+1)*V)

    def ce(given, idx):
        inputs = {"caption": (cap, all_given(cap)), "tok_audio": (audio, given.expand_as(audio))}
        start = own[torch.as_tensor(idx) % K]
        cols = start[:, None] + torch.arange(V)                                  # [n_t, V]: each slot's codebook
        total = 0.0
        for s, e, logits in iter_target_logits(model, inputs, "tok_audio", idx, device, bs):
            logp = torch.log_softmax(logits.gather(-1, cols.to(logits.device).expand(e - s, -1, -1)), -1)
            truth = (audio[s:e, idx] - start).to(logits.device)
            total -= float(logp.gather(-1, truth[..., None]).sum())
        return total

    stream = torch.arange(K * T)
    past = sum(ce(stream < K * t, K * t + np.arange(K)) for t in frames)
    alone = ce(torch.zeros(K * T, dtype=torch.bool), (K * frames[:, None] + np.arange(K)).ravel())
    n = audio.size(0) * len(frames) * K
    codes = lambda a: (a.reshape(len(a), T, K) - np.arange(K) * V).transpose(0, 2, 1)
    tables = audio_table_ce(codes(np.asarray(train_codes, dtype=np.int64)), train_labels,
                            codes(audio.numpy()), labels, frames)
    return {"given_past": past / n, "caption_alone": alone / n, **tables, "frames": frames.tolist()}


READ_OUTS = ("auto", "argmax", "mbr", "mean", "shape_mode")


def probe_structure(model, data, decoder, views_per_clip, train_maps, device, bs, decode_rule="argmax"):
    """decoder: modality name -> the dataset's tokenizer (ProbeSkipped where it cannot decode here);
    decode_rule, how a cell's distribution becomes a map: 'argmax' (the likeliest id), 'mbr' (the id nearest
    the expected patch), 'mean' (the expected patch itself: a map between codes, not ids; its token top-1
    is argmax's), 'shape_mode' (the expected mean code with the likeliest shape code) or 'auto'
    (generation.map_read_out: depth 'shape_mode', normals 'mean' where the tokenizer has patch vectors, else 'argmax')."""
    if decode_rule not in READ_OUTS:
        raise ValueError(f"structure_decode must be one of {', '.join(READ_OUTS)}, got {decode_rule!r}")
    nv = max(1, min(views_per_clip, M.NUM_VIEWS))
    clips = np.repeat(data.clips, nv)
    views = np.concatenate([(v + np.arange(nv)) % M.NUM_VIEWS for v in data.views])
    tokens, _ = data.tokens(data.split, clips, views)
    out, rows = {"n_images": int(len(clips)), "views_per_clip": nv, "decode_rule": decode_rule}, []
    for tgt, rep in (("tok_depth", REPORT["rgb_depth_top1"]), ("tok_normal", REPORT["rgb_normal_top1"])):
        L, V = M.BY_NAME[tgt].length, M.BY_NAME[tgt].vocab
        inputs = {"tok_rgb": (tokens["tok_rgb"], all_given(tokens["tok_rgb"]))}
        vecs, rule = None, decode_rule
        if rule == "auto":
            try:
                rule = generation.map_read_out(decoder(tgt), tgt) or "argmax"
            except ProbeSkipped:
                rule = "argmax"   # the token figures still stand; the decoded ones are skipped below
        if rule == "argmax":
            pred = argmax_ids(model, inputs, tgt, np.arange(L), device, bs, desc=f"rgb->{tgt[4:]}")
        elif rule == "mbr":
            pred = mbr_ids(model, tokens["tok_rgb"], tgt, device, bs, decoder(tgt))
        else:
            vecs, pred = expected_patches(model, tokens["tok_rgb"], tgt, device, bs, decoder(tgt), rule == "shape_mode")
        truth = tokens[tgt].long()
        correct = (pred == truth).numpy()
        acc, lo, hi = clustered_accuracy(correct)
        maj, src = train_majority(data, tgt), data.train
        maj_acc = float((truth.numpy() == maj).mean())
        pos_acc = float((truth.numpy() == train_position_majority(data, tgt)[None]).mean())
        out[tgt] = {"top1": acc, "ci": [lo, hi], "n_tokens": int(correct.size), "n_images": int(len(clips)),
                    "uniform": 1 / V, "majority_token": maj, "majority_from": src, "majority_acc": maj_acc,
                    "per_position_majority_acc": pos_acc, "decode_rule": rule}
        rows += [row(f"rgb -> {tgt[4:]} token top-1", acc, (lo, hi), int(correct.size), pos_acc,
                     f"per-position {src}-majority (the one to beat)", rep, extra={"majority": maj_acc, "uniform": 1 / V}),
                 row(f"rgb -> {tgt[4:]}: {src}-majority token baseline", maj_acc, None, int(correct.size), 1 / V,
                     "1/vocab")]
        rgb32 = tokens["tok_rgb"][:32]
        look = cross_attention_locality(model, {"tok_rgb": (rgb32, all_given(rgb32))}, tgt, np.arange(L),
                                        near_place("tok_rgb", 1), device)
        out[tgt]["cross_attention"] = look
        rows.append(row(f"rgb -> {tgt[4:]}: cross-attention on the cell's own 3x3 (most local head)",
                        look["near"], None, look["n_rows"], look["uniform_near"], "uniform attention"))
        try:
            got = pred.numpy() if vecs is None else vecs.numpy()
            out[tgt]["decoded"], r = structure_decoded(decoder(tgt), tgt, got, truth.numpy(), data.arrays[src][tgt],
                                                       src, train_maps, data.seed, device, vecs is not None,
                                                       toyzoo_masks(data, clips, views) if tgt == "tok_depth" else None)
            rows += [{**x, "metric": x["metric"].replace("decoded:", f"decoded ({rule}):")} for x in r]
        except ProbeSkipped as e:
            out[tgt]["decoded"] = {"status": "skipped", "reason": str(e)}
            print(f"  rgb -> {tgt[4:]}: decoded metrics skipped: {e}")
    return out, rows


def toyzoo_masks(data, clips, views):
    """Where the animal is in these (clip, view) pictures (toyzoo.animal_masks), or None: a dataset that is not a
    ToyZoo world (its raw/toyzoo.json), or one whose raw folder is gone."""
    raw = os.path.join(os.path.dirname(os.path.normpath(data.tok_path)), "raw")
    if not os.path.exists(os.path.join(raw, "toyzoo.json")):
        return None
    import toyzoo
    ids = data.arrays[data.split]["clip_ids"]
    try:
        return toyzoo.animal_masks(raw, [ids[c] for c in clips], views)
    except (ValueError, OSError) as e:
        print(f"  rgb -> depth: the animals' outlines skipped: {e}")
        return None


# ---- memorization

def probe_memo(model, data, memo_clips, suffix_frac, device, bs):
    start = generation.continuation_prefix(1 - suffix_frac)
    L, V = M.BY_NAME["tok_audio"].length, M.BY_NAME["tok_audio"].vocab
    n = memo_clips or len(data.clips)
    sides = {data.split: (data.clips[:n], data.views[:n])}
    if data.held_out:
        n_train = len(data.arrays["train"]["label"])
        tr = np.random.default_rng([data.seed, 5]).choice(n_train, size=min(n, n_train), replace=False)
        sides = {"train": (np.sort(tr), seeded_views(len(tr), 6, data.seed)), **sides}
    maj, src = train_majority(data, "tok_audio"), data.train
    pos_maj = train_position_majority(data, "tok_audio")[start:]
    out, rows = {"suffix_start": int(start), "targets_per_clip": int(L - start)}, []
    for side, (clips, views) in sides.items():
        tokens, labels = data.tokens(side, clips, views)
        audio = tokens["tok_audio"]
        given = torch.zeros_like(audio, dtype=torch.bool)
        given[:, :start] = True
        inputs = {"tok_rgb": (tokens["tok_rgb"], all_given(tokens["tok_rgb"])),
                  "tok_audio": (audio, given), "caption": (tokens["caption"], all_given(tokens["caption"]))}
        truth = audio[:, start:]
        correct = (argmax_ids(model, inputs, "tok_audio", np.arange(start, L), device, bs, f"memo {side}")
                   == truth).numpy()
        acc, lo, hi = clustered_accuracy(correct)
        last = audio[:, start - M.AUDIO_CODEBOOKS:start].repeat(1, (L - start) // M.AUDIO_CODEBOOKS)
        rep_acc = float((last == truth).float().mean())
        maj_acc = float((truth == maj).float().mean())
        pos_acc = float((truth.numpy() == pos_maj[None]).mean())
        out[side] = {"top1": acc, "ci": [lo, hi], "n_clips": int(len(clips)), "n_tokens": int(correct.size),
                     "repeat_last_frame": rep_acc, "majority": maj_acc, "per_position_majority": pos_acc}
        rows += [row(f"audio suffix top-1 ({side})", acc, (lo, hi), int(correct.size), 1 / V, f"1/{V}",
                     REPORT["memo_train"] if side == "train" else REPORT["memo_test"],
                     extra={"majority": maj_acc, "repeat_last_frame": rep_acc}),
                 row(f"audio suffix ({side}): repeat-last-frame baseline", rep_acc, None, int(correct.size), 1 / V,
                     f"1/{V}"),
                 row(f"audio suffix ({side}): per-position {src}-majority baseline", pos_acc, None,
                     int(correct.size), 1 / V, f"1/{V}")]
    look = audio_infill_locality(model, {k: v[:32] for k, v in tokens.items()}, device, data.seed)
    out["cross_attention"] = look   # (tokens and labels: the last side's, the split's own)
    rows.append(row("audio infill: cross-attention within 2 frames of a masked frame (most local head)", look["near"],
                    None, look["n_rows"], look["uniform_near"], "uniform attention"))
    tr = data.arrays[data.train]
    nxt = out["next_frame"] = audio_next_frame(model, tokens, labels, np.asarray(tr["tok_audio"]).reshape(
        -1, L), np.repeat(np.asarray(tr["label"]).astype(np.int64), M.NUM_VIEWS), device, bs)
    n_ids = nxt["n_ids"]
    rows += [row("audio next frame: CE given every frame before (nats / id)", nxt["given_past"], None, n_ids,
                 nxt["bigram"], f"{src} class bigram on the previous frame (the one to beat)", unit="nats"),
             row("audio next frame: CE given the caption alone (nats / id)", nxt["caption_alone"], None, n_ids,
                 nxt["unigram"], f"{src} class unigram", unit="nats")]
    return out, rows


# ---- generation (its samples are shared by the generation and fad probes)

def load_decoder(data, name, device, trust=False):
    """The dataset's tokenizer for modality `name`, or ProbeSkipped naming why it cannot decode here."""
    import modality_tokenizers
    kind = data.meta["modalities"].get(name, {}).get("tokenizer")
    try:
        return modality_tokenizers.load_tokenizer(data.tok_path, data.meta, name, device, trust)
    except Exception as e:
        raise ProbeSkipped(f"the {name} tokenizer ({kind}) cannot be loaded to decode here: "
                           f"{type(e).__name__}: {str(e)[:300]}") from e


def decode_audio(tok, ids, device, bs=16):
    outs = []
    for s in range(0, len(ids), bs):
        w = tok.decode(torch.as_tensor(ids[s:s + bs]).long().to(device))
        outs.append(np.asarray(w.detach().cpu().numpy() if torch.is_tensor(w) else w, dtype=np.float32))
    return np.concatenate(outs)


def generate(model, ids, given, target, generator, sampler):
    """generation.generate's ids of the target modality given the others (the one call into the sampler);
    sampler: its steps, schedule, temperature and guidance_scale."""
    return generation.generate(model, ids, given, target, generator=generator, **sampler).cpu()


def gen_selection(data, per_class):
    """per_class clips of each class: the first ones of the class in clip_order, their seeded view."""
    picked = first_of_each_class(data.order, data.arrays[data.split]["label"], len(data.class_names), per_class)
    return picked, data.views_of[picked]


def sampling_generator(data):
    """The sampler's generator, seeded by the seed and the split: class-only samples see only the caption, so
    with the seed alone val and test would draw the very same samples, and a choice made on val would be
    'tested' on them again."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([data.seed, zlib.crc32(data.split.encode())])
                                             .generate_state(1)[0]))


def generations(model, data, audio_tok, sampler, per_class, suffix_frac, device, bs):
    """Class-only (at sampler's guidance, and at 1 beside it) and continuation samples of per_class clips of
    each class, their ids and decoded waves (audio_tok: the audio tokenizer), plus decoded ground truth."""
    clips, views = gen_selection(data, per_class)
    tokens, labels = data.tokens(data.split, clips, views)
    g = sampling_generator(data)
    start = generation.continuation_prefix(1 - suffix_frac)
    audio = tokens["tok_audio"]
    res = {"clips": clips, "views": views, "labels": labels, "gt_ids": audio.numpy(), "suffix_start": start}
    t0 = time.time()
    guided = sampler["guidance_scale"] != 1.0     # then the conditional model alone beside it: what guidance adds
    ids = {"class_only": [], "class_only_g1": [], "continuation": []}
    for s in tqdm(range(0, len(clips), bs), desc="generate", leave=False):
        e = min(s + bs, len(clips))
        cap, zeros = tokens["caption"][s:e], torch.zeros_like(audio[s:e])
        cls_in = ({"caption": cap, "tok_audio": zeros}, {"caption": all_given(cap), "tok_audio": zeros.bool()})
        ids["class_only"].append(generate(model, *cls_in, "tok_audio", g, sampler))
        if guided:
            ids["class_only_g1"].append(generate(model, *cls_in, "tok_audio", g, dict(sampler, guidance_scale=1.0)))
        given = torch.zeros_like(audio[s:e], dtype=torch.bool)
        given[:, :start] = True
        rgb = tokens["tok_rgb"][s:e]
        out = generate(model, {"caption": cap, "tok_rgb": rgb, "tok_audio": audio[s:e]},
                       {"caption": all_given(cap), "tok_rgb": all_given(rgb), "tok_audio": given}, "tok_audio", g, sampler)
        out[:, :start] = audio[s:e, :start]     # the given prefix is ground truth, whatever the sampler returns
        ids["continuation"].append(out)
    res["seconds"] = time.time() - t0
    res["class_only_settings"] = ["class_only"] + (["class_only_g1"] if guided else [])
    res["samples_per_s"] = (1 + len(res["class_only_settings"])) * len(clips) / max(res["seconds"], 1e-9)
    res["gt_wave"] = decode_audio(audio_tok, res["gt_ids"], device)
    for setting in res["class_only_settings"] + ["continuation"]:
        res[f"{setting}_ids"] = torch.cat(ids[setting]).numpy()
        res[f"{setting}_wave"] = decode_audio(audio_tok, res[f"{setting}_ids"], device)
    return res


def train_reference(data, audio_tok, per_class, device):
    """Decoded ground truth of per_class train clips per class (first in clip_order, seeded view)."""
    arrays = data.arrays[data.train]
    labels = np.asarray(arrays["label"])
    picked = first_of_each_class(clip_order(arrays), labels, len(data.class_names), per_class)
    tokens, y = data.tokens(data.train, picked, seeded_views(len(labels), 3, data.seed)[picked])
    return {"split": data.train, "labels": y, "wave": decode_audio(audio_tok, tokens["tok_audio"].numpy(), device)}


def probe_generation(data, gen, ref, judge, sampler, seed):
    """gen: generations(); ref: train_reference(); judge: the token judge (function, how); sampler: as
    generate takes it."""
    from audio_features import EMBED_NAME, clip_embedding, fit_logreg, mean_pairwise_distance, predict_proba
    C, y, g = len(data.class_names), gen["labels"], sampler["guidance_scale"]
    clf = fit_logreg(clip_embedding(ref["wave"]), ref["labels"], C)
    out = {"embedding": EMBED_NAME, "classifier": f"multinomial logistic regression (L2) on the embedding, fit to "
                                                   f"{len(ref['labels'])} decoded {ref['split']} clips",
           "n_per_setting": int(len(y)), "samples_per_s": gen["samples_per_s"],
           "sampler": {"gen_steps": sampler["steps"], "gen_schedule": sampler["schedule"],
                       "gen_temperature": sampler["temperature"], "gen_guidance": g,
                       "gen_by_level": sampler["by_level"], "gen_remask_noise": sampler["remask_noise"]}}
    names = {"gt": "decoded ground truth (classifier ceiling)", "class_only": f"class_only samples (guidance {g:g})",
             "class_only_g1": "class_only samples (guidance 1)", "continuation": f"continuation samples (guidance {g:g})"}
    emb, rows = {}, []

    def accuracy(key, pred, what, label):
        k = int((pred == y).sum())
        # how the predictions spread over the classes: a collapsed generator (or a judge thrown off by the
        # decoder) puts most samples in one class
        out[key] = {"value": k / len(y), "ci": wilson_ci(k, len(y)), "n": int(len(y)),
                    "predicted": np.bincount(pred, minlength=C).tolist()}
        rows.append(row(f"{what} acc on {label}", k / len(y), wilson_ci(k, len(y)), int(len(y)), 1 / C, "chance 1/C"))

    for setting in ["gt"] + gen["class_only_settings"] + ["continuation"]:
        emb[setting] = clip_embedding(gen[f"{setting}_wave"])
        accuracy(f"{setting}_class_acc", predict_proba(clf, emb[setting]).argmax(1), "classifier", names[setting])
    # the same question in token space: no decoder in the loop, so a miss here is the model's, not the decoder's
    out["token_judge"] = judge[1]
    for setting in ["gt"] + gen["class_only_settings"]:
        label = "ground-truth ids (judge ceiling)" if setting == "gt" else names[setting].replace("samples", "ids")
        accuracy(f"{setting}_token_judge_acc", judge[0](gen[f"{setting}_ids"]), "token judge", label)
    # diversity within a class, standardized features, generated / ground truth
    z = {s: (e - clf["mean"]) / clf["std"] for s, e in emb.items()}
    for setting in gen["class_only_settings"] + ["continuation"]:
        ratios = []
        for c in range(C):
            d_gt, d_gen = mean_pairwise_distance(z["gt"][y == c]), mean_pairwise_distance(z[setting][y == c])
            if np.isfinite(d_gt) and d_gt > 0 and np.isfinite(d_gen):
                ratios.append(d_gen / d_gt)
        m, lo, hi = mean_ci(ratios)
        out[f"{setting}_diversity_ratio"] = {"value": m, "ci": [lo, hi], "n_classes": len(ratios)}
        rows.append(row(f"diversity {names[setting]} / ground truth", m, (lo, hi), len(ratios), 1.0,
                        "no collapse = 100%"))
    rows += energy_spread_rows(gen, names, g, seed, out)
    out["structure_judge"], r = structure_judge(gen, ref, C, seed)
    rows += r + [row("generation speed (samples/s)", gen["samples_per_s"], None,
                     (len(gen["class_only_settings"]) + 1) * int(len(y)), None, "", None, unit="")]
    return out, rows


def energy_spread_rows(gen, names, guidance, seed, out):
    """Energy spread: std over time of frame RMS, generated / ground truth (continuation: the generated tail
    only), into out; -> table lines. The report trained no unconditional model, so its samples had no
    guidance: its figure is like-for-like only at guidance 1."""
    from audio_features import energy_spread
    guided = None if guidance == 1.0 else (f"guidance {guidance:g} here; the report trained no unconditional "
                                           "model, so it sampled without guidance (compare the guidance 1 row)")
    tail = S.audio_sample_of(gen["suffix_start"])
    rows = []
    for setting, s0, rep, differs in (
            [("class_only", 0, REPORT["energy_class_only"], guided)] +
            ([("class_only_g1", 0, REPORT["energy_class_only"], None)] if "class_only_g1_ids" in gen else []) +
            [("continuation", tail, REPORT["energy_continuation"], guided)]):
        a, b = energy_spread(gen[f"{setting}_wave"], s0), energy_spread(gen["gt_wave"], s0)
        ratio = float(a.mean() / max(b.mean(), 1e-12))
        lo, hi = bootstrap_ci(lambda i, j: a[i].mean() / max(b[j].mean(), 1e-12), [len(a), len(b)], seed=seed)
        out[f"{setting}_energy_spread"] = {"value": ratio, "ci": [lo, hi], "n": int(len(a)), "from_sample": int(s0)}
        rows.append(row(f"energy spread {names[setting]} / ground truth", ratio, (lo, hi), int(len(a)), 1.0,
                        "ground truth = 100%", rep, differs=differs))
    return rows


def structure_judge(gen, ref, num_classes, seed):
    """Class-only and continuation samples judged by their time structure (chirp shapes, rhythm), where the
    mean/std judge cannot look: the same frames in any order give it the same answer. -> (figures, lines)."""
    from audio_features import STRUCTURE_NAME, log_mel_frames
    frames = {k: log_mel_frames(gen[f"{k}_wave"]) for k in ("gt", "class_only", "continuation")}
    res = structure_scores(log_mel_frames(ref["wave"]), ref["labels"], frames, gen["labels"], num_classes, seed)
    floor = res["gt_shuffled"]["value"]
    rows = [row(f"structure judge acc on {label}", res[name]["value"], res[name]["ci"], res[name]["n"], floor,
                "shuffled-frame floor", extra={"floor_to_ceiling": res[name].get("floor_to_ceiling")})
            for name, label in (("gt", "decoded ground truth (ceiling)"),
                                ("gt_shuffled", "ground truth, frames shuffled (floor)"),
                                ("class_only", "class_only samples"), ("continuation", "continuation samples"))]
    return {"features": STRUCTURE_NAME, **res}, rows


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




def probe_fad(data, gen, ref, guidance, clf_per_class):
    """gen: generations(); ref: train_reference() (clf_per_class clips of each class, for the floor)."""
    from audio_features import EMBED_NAME, HOP, clip_embedding, frechet_distance, log_mel_frames
    y, n = gen["labels"], len(gen["labels"])
    start_frame = S.audio_sample_of(gen["suffix_start"]) // HOP    # a log-mel frame (hop HOP) index
    frames = {s: log_mel_frames(gen[f"{s}_wave"]) for s in ["gt"] + gen["class_only_settings"] + ["continuation"]}
    ref_rows = matched_rows(y, ref["labels"])
    if ref_rows is None:
        raise ProbeSkipped(f"the floor needs {n} decoded {ref['split']} clips with the classes of the generated "
                           f"ones; raise --clf_per_class (now {clf_per_class}) to at least --gen_per_class")
    frames["train"] = log_mel_frames(ref["wave"][ref_rows])
    out = {"embedding": f"clip level: {EMBED_NAME}, one vector per clip",
           "reference": f"decoded ground truth of the same {n} {data.split} clips",
           "floor": f"the {n} {data.split} ground-truth clips vs {n} decoded {ref['split']} clips of the same "
                    "classes (two real sets, the same n as the measurement: a Frechet distance's bias grows as n "
                    "falls, so only equal n compare)",
           "continuation_frames": f"only the generated tail (frames >= {start_frame}), on both sides",
           "ci": "95% normal interval, leave-one-pair-out jackknife (not clipped at 0)"}
    rows = []

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
        name = {"class_only_g1": "class_only (guidance 1)", "class_only": f"class_only (guidance {guidance:g})",
                "continuation": f"continuation tail (guidance {guidance:g})"}[setting]
        rows.append(row(f"FAD-logmel clip-level, {name} vs ground truth", v, (lo, hi), k, fl["overall"],
                        f"floor: real vs real, n={fl['n']} [{fl['ci'][0]:.3f}, {fl['ci'][1]:.3f}]", unit=""))
    out["floor_overall"] = out["floor"]["overall"]
    try:
        e_gt = clap_embed(gen["gt_wave"])
        out["clap"] = {"embedding": "CLAP laion/clap-htsat-unfused audio embedding (512-d)"}
        for setting in ("class_only", "continuation"):
            v = frechet_distance(clap_embed(gen[f"{setting}_wave"]), e_gt)
            out["clap"][setting] = v
            rows.append(row(f"FAD-CLAP {setting} vs ground truth", v, None, n, None, "", unit=""))
    except (ImportError, OSError, ValueError) as e:
        out["clap"] = {"skipped": f"CLAP embedder unavailable ({type(e).__name__}: {str(e)[:200]}); "
                                  "pip install transformers and cache laion/clap-htsat-unfused to enable"}
        print(f"  FAD-CLAP skipped: {out['clap']['skipped']}")
    return out, rows


# ---- ResNet-50 on generated pictures

# ImageNet-1k indices that count as the class (top-5 must contain one); classes absent here are not scored
IMAGENET_CLASSES = {"pig": [341], "sheep": [348, 349], "dog": list(range(151, 269)), "cat": list(range(281, 286)),
                    "horse": [339, 603], "cow": [345, 346, 347], "chicken": [7, 8], "duck": [97, 98, 99],
                    "coyote": [272], "lion": [291]}


def resnet50(weights_name, device):
    """(ImageNet ResNet-50 in eval mode, its weights enum) or ProbeSkipped; 'random': untrained (offline)."""
    try:
        from torchvision.models import resnet50, ResNet50_Weights
    except ImportError as e:
        raise ProbeSkipped(f"torchvision not installed ({e}); pip install torchvision (weights download once)")
    if weights_name not in ("imagenet", "random"):
        raise ValueError(f"resnet_weights must be 'imagenet' or 'random', got {weights_name!r}")
    weights = ResNet50_Weights.IMAGENET1K_V2
    try:
        return resnet50(weights=weights if weights_name == "imagenet" else None).eval().to(device), weights
    except Exception as e:  # no cached weights and no network
        raise ProbeSkipped(f"ResNet-50 ImageNet weights unavailable ({type(e).__name__}: {str(e)[:200]})")


def probe_resnet(model, data, rgb_tok, sampler, per_class, weights_name, device):
    """rgb_tok: a function -> the dataset's rgb tokenizer; weights_name: 'imagenet' or 'random'."""
    net, weights = resnet50(weights_name, device)
    tok = rgb_tok()
    clips, views = gen_selection(data, per_class)
    tokens, labels = data.tokens(data.split, clips, views)
    names = [data.class_names[c] for c in labels]
    keep = np.flatnonzero([name in IMAGENET_CLASSES for name in names])
    if not len(keep):
        raise ProbeSkipped("no class of this dataset has ImageNet labels in IMAGENET_CLASSES")
    g = sampling_generator(data)
    out = {"classes": {k: v for k, v in IMAGENET_CLASSES.items() if k in data.class_names},
           "weights": weights_name if weights_name == "random" else str(weights),
           "rule": "a hit when the top-5 ImageNet predictions contain one of the class's ImageNet labels; "
                   "chance = 5 x (number of such labels) / 1000, averaged over the samples"}
    if weights_name == "random":
        out["note"] = "UNTRAINED ResNet-50 (resnet_weights='random'): the figures test the code path only"
    rows, none = [], torch.zeros_like(tokens["tok_rgb"])
    for cond in ("tok_audio", "caption", None):
        ids = tokens["tok_rgb"] if cond is None else generate(
            model, {cond: tokens[cond], "tok_rgb": none}, {cond: all_given(tokens[cond]), "tok_rgb": none.bool()},
            "tok_rgb", g, sampler)
        x = torch.from_numpy(np.asarray(tok.decode(ids.to(device)))).permute(0, 3, 1, 2).to(device)
        with torch.no_grad():
            top5 = net(weights.transforms()(x)).topk(5, dim=1).indices.cpu().numpy()
        hits = np.array([bool(set(top5[i]) & set(IMAGENET_CLASSES[names[i]])) for i in keep])
        chance = float(np.mean([5 * len(IMAGENET_CLASSES[names[i]]) / 1000 for i in keep]))
        name = "decoded ground-truth rgb (ceiling)" if cond is None else f"{cond.replace('tok_', '')} -> rgb"
        k = int(hits.sum())
        out[name] = {"top5": k / len(hits), "ci": wilson_ci(k, len(hits)), "n": int(len(hits)), "chance": chance}
        rows.append(row(f"ResNet-50 top-5, {name}", k / len(hits), wilson_ci(k, len(hits)), int(len(hits)), chance,
                        "random top-5", REPORT["resnet_top5"] if cond == "tok_audio" else None))
    return out, rows


# -----------------------------------------------------------------------------------------------------
# the HTML report: charts drawn by matplotlib as inline SVG, PNG spectrograms and wav players as data URIs

def _esc(s):
    return html.escape(str(s))


def _axes(title, size):
    try:
        from matplotlib.figure import Figure     # no pyplot: no global figure list, no backend to pick
    except ImportError as e:
        raise ImportError(f"report.html's charts need matplotlib: pip install -r requirements.txt ({e})") from e
    fig = Figure(figsize=size)
    ax = fig.subplots()
    ax.set_title(title, fontweight="bold")
    return fig, ax


def _svg(fig):
    """The figure as an inline <svg> element, its text kept as text (smaller, searchable on the page)."""
    import matplotlib
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "nano4m"}):   # reproducible ids
        fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()[buf.getvalue().index("<svg"):]


def svg_bars(title, labels, values, refs=None, ref_name="", unit=""):
    fig, ax = _axes(title, (6, 0.8 + 0.3 * len(labels)))
    y = np.arange(len(labels))
    bars = ax.barh(y, [np.nan if v is None else v for v in values], color="#4a7ab5")
    ax.bar_label(bars, fmt=f"%.3g{unit}", padding=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    if refs:
        ax.vlines([np.nan if r is None else r for r in refs], y - 0.4, y + 0.4, color="#d33", lw=2, label=ref_name)
        ax.legend(loc="upper left", bbox_to_anchor=(1, 1))
    return _svg(fig)


def svg_lines(title, series, xlabel="", ylabel=""):
    """series: {name: (xs, ys)}."""
    fig, ax = _axes(title, (6, 3))
    for name, (xs, ys) in series.items():
        ax.plot(xs, [np.nan if y is None else y for y in ys], label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1, 1), fontsize=8)
    return _svg(fig)


def svg_heatmap(matrix, labels, title):
    """Rows: true class, columns: predicted; shaded by the row's share, each cell's count written in it."""
    m = np.asarray(matrix)
    frac = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = _axes(title, (1.5 + 0.35 * len(labels),) * 2)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i, j in zip(*np.nonzero(m)):
        ax.text(j, i, int(m[i, j]), ha="center", va="center", color="w" if frac[i, j] > 0.5 else "k", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true class")
    return _svg(fig)


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
    """out_dir/log.jsonl lines {'iter', 'val': {...}, ...} -> {'val tok_audio': (iters, ces), ...}; a line that
    does not parse (a run killed mid-write) is passed over."""
    curves = {}
    if not os.path.exists(path):
        return curves
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            val = entry.get("val") if "iter" in entry else None
            for k, v in (val.items() if isinstance(val, dict) else ()):
                if isinstance(v, (int, float)):
                    xs, ys = curves.setdefault(f"val {k}", ([], []))
                    xs.append(entry["iter"])
                    ys.append(float(v))
    return curves


def report_table(results):
    """The page's head and its probe table, with each probe's status when it did not run."""
    meta = results["meta"]
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>nano4M-Audio evaluation</title><style>"
         "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}.skip{color:#a60}"
         ".err{color:#c00}img{image-rendering:pixelated}</style></head><body>",
         f"<h1>nano4M-Audio evaluation: {_esc(meta['checkpoint'])}</h1>",
         f"<p>split <b>{_esc(meta['split'])}</b>, {meta['n_eval_clips']} clips; "
         f"{_esc(meta['selection'])}. Seed {meta['seed']}.</p>",
         "<h2>Probe table</h2><table><tr><th>probe</th><th>figure</th><th>model</th><th>95% CI</th><th>n</th>"
         "<th>random baseline</th><th>report</th></tr>"]
    for r in results["table"]:
        ci = "" if not r["ci"] else f"[{fmt(r['ci'][0], r['unit'])}, {fmt(r['ci'][1], r['unit'])}]"
        differs = f"<br><small>not comparable: {_esc(r['report_differs'])}</small>" if r.get("report_differs") else ""
        h.append(f"<tr><td>{r['probe']}</td><td>{_esc(r['metric'])}</td><td><b>{fmt(r['model'], r['unit'])}</b></td>"
                 f"<td>{ci}</td><td>{r['n']}</td><td>{fmt(r['random'], r['unit'])} {_esc(r['random_name'])}</td>"
                 f"<td>{fmt(r['report'], r['unit'])}{differs}</td></tr>")
    h.append("</table>")
    for name, p in results["probes"].items():
        if p.get("status") != "ok":
            cls = "skip" if p.get("status") == "skipped" else "err"
            h.append(f"<p class='{cls}'><b>{name}</b>: {p.get('status')}: {_esc(p.get('reason', ''))}</p>")
    return h


def report_charts(P, class_names, curves):
    """The charts of the probes that ran (P: results['probes']) and of the training log's curves."""
    ok = lambda name: P.get(name, {}).get("status") == "ok"
    h = []
    if ok("ce"):
        pm = P["ce"]["per_modality"]
        h += ["<h2>Per-modality cross-entropy</h2>",
              svg_bars("eval CE (nats), red: log(vocab)", list(pm), [v["ce"] for v in pm.values()],
                       [v["uniform"] for v in pm.values()], "uniform guess log(vocab)")]
    if curves:
        h.append(svg_lines("validation CE during training", curves, "iteration", "nats"))
    if ok("structure"):
        h.append("<h2>rgb -> depth / normal</h2><p>The baselines to beat never see the picture: the train "
                 "split's per-position majority token (token top-1) and the per-position mean of decoded train "
                 "maps (decoded metrics). A model under them has not read the scene from the picture. Decoded "
                 "maps read out as: " + ", ".join(f"{t[4:]} {P['structure'][t].get('decode_rule', '?')}"
                                                   for t in ("tok_depth", "tok_normal") if t in P["structure"]) +
                 ".</p>")
    if ok("class"):
        pc = P["class"]["per_class"]
        h += ["<h2>Audio -> class</h2>",
              svg_heatmap(P["class"]["confusion"], class_names, "confusion matrix (audio -> class)"),
              svg_bars("per-class top-1 as a multiple of chance (red: chance = 1)", list(pc),
                       [v["x_chance"] for v in pc.values()], [1.0] * len(pc), "chance", "x")]
    if ok("retrieval"):
        R, series = P["retrieval"], {}
        for key in ("audio->rgb", "rgb->audio"):
            series[key] = (list(range(1, len(R[key]["curve"]) + 1)), R[key]["curve"])
            if key in R.get("fused", {}):
                curve = R["fused"][key]["curve"]
                series[f"{key}, fused with the class pivot"] = (list(range(1, len(curve) + 1)), curve)
        G = len(series["audio->rgb"][1])
        series["chance k/G"] = (list(range(1, G + 1)), [k / G for k in range(1, G + 1)])
        h += ["<h2>Retrieval</h2><p>" + _esc(R["gallery"]) + "</p>", svg_lines("recall@k", series, "k", "recall")]
    if ok("fad"):
        F = P["fad"]
        keys = [k for k in ("class_only_g1", "class_only", "continuation") if k in F]
        h += ["<h2>Frechet audio distance, clip level</h2><p>" + _esc(F["embedding"]) + "; " + _esc(F["floor"]) + "</p>",
              svg_bars("FAD-logmel vs ground truth (red: real-vs-real floor at the same n)", keys,
                       [F[k]["overall"] for k in keys], [F[k]["floor"] for k in keys], "floor")]
    return h


def report_audio(gen, class_names, players, suffix_frac):
    """Spectrograms (and wav players) of ground truth and samples, per class."""
    h = ["<h2>Generated audio per class</h2><p>log-mel spectrograms; continuation: the last "
         f"{100 * suffix_frac:.0f}% is generated.</p><table><tr><th>class</th><th>ground truth</th>"
         "<th>continuation</th><th>class-only</th></tr>"]
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(gen["labels"] == c)[:max(players, 1)]
        if not len(idx):
            continue
        cells = []
        for setting in ("gt", "continuation", "class_only"):
            cell = []
            for j, i in enumerate(idx):
                w = gen[f"{setting}_wave"][i]
                cell.append(f"<img src='{spectrogram_png(w)}' width='256' height='64'><br>")
                if j < players:
                    cell.append(f"<audio controls preload='none' src='{wav_uri(w)}'></audio><br>")
            cells.append("".join(cell))
        h.append(f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return h + ["</table>"]


def render_report(results, class_names, curves, gen=None, audio_players=1, suffix_frac=0.2):
    """The self-contained page: the table, the charts, the generated audio (gen: generations(), when a probe
    made them), and every figure as JSON."""
    h = report_table(results) + report_charts(results["probes"], class_names, curves)
    if gen is not None:
        h += report_audio(gen, class_names, audio_players, suffix_frac)
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
    from files import atomic_path
    tmp = atomic_path(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def wanted_probes(probes):
    """'all' or a comma list -> the probes' names, in the order given; an unknown name is refused."""
    wanted = ALL_PROBES if probes == "all" else tuple(p.strip() for p in probes.split(",") if p.strip())
    bad = [p for p in wanted if p not in ALL_PROBES]
    if bad:
        raise ValueError(f"unknown probe(s) {bad}; valid: all or a comma list of {', '.join(ALL_PROBES)}")
    return wanted


def load_inputs(s, device):
    """-> (model, checkpoint, EvalData): the checkpoint of s['out_dir'], then the tokenized data it names."""
    from model import load_checkpoint
    model, ckpt = load_checkpoint(os.path.join(s["out_dir"], "ckpt.pt"), device, s["trust_checkpoint"])
    tok_path, meta, arrays = M.open_tokenized(*generation.checkpoint_dataset(ckpt, s["dataset"], s["data_root"]),
                                              [s["split"]], also=["train"])
    order = clip_order(arrays[s["split"]])
    clips = order[:s["num_clips"]] if s["num_clips"] > 0 else order
    views_of = seeded_views(len(order), 1, s["seed"])
    data = EvalData(s["split"], arrays, list(meta["class_names"]), clips, views_of[clips], order, views_of,
                    s["seed"], tok_path, meta)
    return model, ckpt, data


def probe_calls(s, model, ckpt, data, device, results):
    """{probe: a call with its inputs}. What two probes share (the token judge, the decoders, the generated
    samples, the decoded train references) is made once, on first use. results: the probes' results so far."""
    bs, trust = s["batch_size"], s["trust_checkpoint"]
    sampler = {"steps": s["gen_steps"], "schedule": s["gen_schedule"], "temperature": s["gen_temperature"],
               "guidance_scale": s["gen_guidance"], "by_level": s["gen_by_level"],
               "remask_noise": s["gen_remask_noise"]}
    decoder = functools.cache(lambda name: load_decoder(data, name, device, trust))
    judge = functools.cache(lambda: token_judge(data))
    gen = functools.cache(lambda: generations(model, data, decoder("tok_audio"), sampler, s["gen_per_class"],
                                              s["suffix_frac"], device, bs))
    ref = functools.cache(lambda: train_reference(data, decoder("tok_audio"), s["clf_per_class"], device))
    reader = (lambda: fit_rgb_reader(data, s["reader_epochs"], trust)) if s["reference_reader"] else None
    calls = {
        "ce": lambda: probe_ce(model, data, masking_config(ckpt.get("config", {})), s["ce_batches"], bs, device),
        "entropy": lambda: probe_entropy(data, results.get("ce", {}).get("per_modality", {}).get("tok_audio"),
                                         head_differs(model)),
        "class": lambda: probe_class(model, data, judge(), s["class_views"], device, bs),
        "retrieval": lambda: probe_retrieval(model, data, s["gallery"], s["retrieval_views"], device, bs, reader),
        "structure": lambda: probe_structure(model, data, decoder, s["structure_views"], s["structure_train_maps"],
                                             device, bs, s["structure_decode"]),
        "memo": lambda: probe_memo(model, data, s["memo_clips"], s["suffix_frac"], device, bs),
        "generation": lambda: probe_generation(data, gen(), ref(), judge(), sampler, s["seed"]),
        "fad": lambda: probe_fad(data, gen(), ref(), s["gen_guidance"], s["clf_per_class"]),
        "resnet": lambda: probe_resnet(model, data, lambda: decoder("tok_rgb"), sampler, s["gen_per_class"],
                                       s["resnet_weights"], device),
    }
    made_samples = lambda: gen() if gen.cache_info().currsize else None    # for the page, when a probe made them
    return calls, made_samples


def run_probe(name, call):
    """-> (result with its status and seconds, table lines): a probe that does not apply is skipped with its
    reason, one that fails is an error with its reason; neither stops the others."""
    print(f"[{name}]")
    t0, rows = time.time(), []
    try:
        res, rows = call()
        res = {"status": "ok", **res}
    except (ProbeSkipped, ImportError, FileNotFoundError, NotImplementedError) as e:
        res = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
    except Exception as e:
        traceback.print_exc()
        res = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    if res["status"] != "ok":
        print(f"  {res['status']}: {res['reason']}")
    rows = [{"probe": name, **r} for r in rows]
    for r in rows:
        print_row(r)
    res["seconds"] = time.time() - t0
    return res, rows


def run(settings):
    """Evaluate with the given settings (dict of this module's setting names). Returns the results dict."""
    s = dict(settings)
    wanted = wanted_probes(s["probes"])
    device = M.pick_device(s["device"])
    torch.manual_seed(s["seed"])
    model, ckpt, data = load_inputs(s, device)
    ckpt_path = os.path.join(s["out_dir"], "ckpt.pt")
    print(f"evaluating {ckpt_path} (iter {ckpt.get('iter_num')}) on {data.tok_path} split {data.split}: "
          f"{len(data.clips)} clips, device {device}")
    probes, table = {}, []
    calls, made_samples = probe_calls(s, model, ckpt, data, device, probes)
    for name in wanted:
        probes[name], rows = run_probe(name, calls[name])
        table += rows
    results = {"meta": {"checkpoint": ckpt_path, "iter_num": ckpt.get("iter_num"), "dataset": generation.checkpoint_dataset(ckpt, s["dataset"], s["data_root"])[0],
                        "tok_path": data.tok_path, "split": data.split, "n_eval_clips": int(len(data.clips)),
                        "selection": data.selection, "seed": s["seed"], "device": device, "settings": s,
                        "tokenizers": {k: v.get("tokenizer") for k, v in data.meta["modalities"].items()},
                        "report_figures": REPORT},
               "table": table, "probes": probes}
    results = _jsonable(results)
    d = os.path.join(s["out_dir"], "eval", s["split"])
    os.makedirs(d, exist_ok=True)
    _write_atomic(os.path.join(d, "results.json"), json.dumps(results, indent=1))
    page = render_report(results, data.class_names, read_training_curves(os.path.join(s["out_dir"], "log.jsonl")),
                         made_samples(), s["audio_players"], s["suffix_frac"])
    _write_atomic(os.path.join(d, "report.html"), page)
    print(f"wrote {d}/results.json and {d}/report.html")
    results["failed"] = [name for name, p in probes.items() if p["status"] == "error"]
    return results


def default_settings():
    import configurator
    return configurator.settings(globals())


if __name__ == "__main__":
    import configurator
    import files
    try:
        cfg = configurator.apply_overrides(default_settings(), sys.argv[1:])
    except configurator.ConfigError as e:
        sys.exit(f"evaluate.py: {e}")
    try:
        out = run(cfg)
    except (M.EmptySplitError, files.UntrustedFileError) as e:
        sys.exit(f"evaluate.py: {e}")
    if out["failed"]:
        sys.exit(f"evaluate.py: probe(s) failed: {', '.join(out['failed'])} (see the traceback above)")
