"""
How much class a tokenized dataset's audio ids keep, before any transformer: a linear probe (multinomial
logistic regression on each window's audio token histogram, evaluate.py's token judge) fit on the train split
(one seeded view per clip, as evaluate.py's class probe fits it) and scored on every view of a held-out split.
One line per dataset beside chance, so audio tokenizers of the same clips compare directly:

    python token_probe.py --datasets=animals_encodec,animals_speechtokenizer,animals_mimi
    python token_probe.py --datasets=toyzoo --split=val
"""
import sys
import types

import numpy as np

import configurator
import modalities as M
from metrics import clip_order, fit_token_judge, seeded_views, wilson_ci


def probe(dataset, data_root="data", split="test", seed=1337):
    """-> dict: the probe's top-1 on every view of `split`, its 95% CI, chance and what the tokens are."""
    tok_path, meta, arrays = M.open_tokenized(dataset, data_root, ["train", split])   # refuses a missing or empty split
    train, held = arrays["train"], arrays[split]
    vocab, C = M.BY_NAME["tok_audio"].vocab, len(meta["class_names"])
    clips = np.asarray(clip_order(train))
    views = seeded_views(len(train["label"]), 3, seed)[clips]
    judge = fit_token_judge(np.asarray(train["tok_audio"][clips, views]), np.asarray(train["label"])[clips], C, vocab)
    y = np.asarray(held["label"]).astype(np.int64)
    hits = sum(int((judge(np.asarray(held["tok_audio"][:, v])) == y).sum()) for v in range(M.NUM_VIEWS))
    n = len(y) * M.NUM_VIEWS
    lo, hi = wilson_ci(hits, n)
    return {"dataset": dataset, "tokenizer": meta["modalities"]["tok_audio"]["tokenizer"],
            "layout": f"K={M.AUDIO_CODEBOOKS} x T={M.AUDIO_FRAMES}, V={M.AUDIO_CODEBOOK_SIZE}",
            "top1": hits / n, "ci": (lo, hi), "n_windows": n, "chance": 1 / C, "train_clips": len(clips)}


# settings (a config file and/or --key=value, configurator.py; --help lists them)
datasets = ""        # comma-separated tokenized datasets under data_root (required)
data_root = "data"
split = "test"
seed = 1337
DEFAULTS = configurator.settings(globals())


def main(argv=None):
    args = types.SimpleNamespace(**configurator.apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv,
                                                                verbose=False))
    if not args.datasets:
        raise ValueError("--datasets=NAME[,NAME...] is required")
    rows = [probe(d, args.data_root, args.split, args.seed) for d in args.datasets.split(",") if d]
    print(f"linear probe on audio token histograms: fit on train (one view per clip), top-1 on every "
          f"{args.split} view")
    print(f"{'dataset':<28} {'tokenizer':<16} {'layout':<26} {'top-1':>7} {'95% CI':>16} {'chance':>7} {'x chance':>8}")
    for r in rows:
        print(f"{r['dataset']:<28} {r['tokenizer']:<16} {r['layout']:<26} {100 * r['top1']:6.1f}% "
              f"[{100 * r['ci'][0]:5.1f}, {100 * r['ci'][1]:5.1f}]% {100 * r['chance']:6.1f}% "
              f"{r['top1'] / r['chance']:7.2f}x")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"token_probe.py: error: {e}", file=sys.stderr)
        sys.exit(1)
