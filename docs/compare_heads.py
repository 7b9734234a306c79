"""
Which head trains better: the report's one softmax over all 50,304 ids (head='full') or a softmax over each
modality's own ids (head='modality', our default)? Both models in one process, from the same initial
weights, fed the very same batches (4M masking with the report's settings), a step of one then a step of
the other, so machine load hits both alike. Every eval scores both on the same fixed val batches with two
CEs per modality:
  own   the CE over the modality's own ids (the full head's logits renormalised over that range): what
        sampling and every probe use, the figure both heads can be compared on;
  full  the CE over all 50,304 ids: the report's figure (the per-modality head never trained the mass outside
        a modality's range down, so its 'full' CE says how much it would put there).

    python docs/compare_heads.py --dataset=toyzoo --steps=60 --batch_size=8          # the report's d6-6w512
    python docs/compare_heads.py --n_layer=2 --n_embd=128 --n_head=2 --lr=2e-3 --steps=300   # ToyZoo's size

Writes the curves as JSON to --out (default out/compare_heads.json).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configurator  # noqa: E402
import masking  # noqa: E402
import modalities as M  # noqa: E402
from model import Nano4M, Nano4MConfig  # noqa: E402

S = dict(dataset="toyzoo", data_root="data", n_layer=6, n_embd=512, n_head=8, pos_emb="learned", batch_size=8,
         steps=60, lr=1e-4, warmup=5, min_lr_frac=0.1, eval_every=20, eval_batches=8, seed=1337, threads=0,
         out="out/compare_heads.json")
S = configurator.apply_overrides(S, sys.argv[1:])
if S["threads"]:
    torch.set_num_threads(S["threads"])
tok = M.tok_dir(S["dataset"], S["data_root"])
meta = M.load_meta(tok)
splits = {s: M.open_split(tok, s, meta) for s in ("train", "val")}
cfg = masking.MaskingConfig()      # the report's: budgets 16..256, every alpha 1.0, stride-2 audio spans


def batch_of(split, data_gen, mask_gen):
    n = len(splits[split]["label"])
    clips = torch.randint(n, (S["batch_size"],), generator=data_gen).numpy()
    views = torch.randint(M.NUM_VIEWS, (S["batch_size"],), generator=data_gen).numpy()
    tokens, _ = M.gather_views(splits[split], clips, views)
    b = masking.build_batch(tokens, cfg, mask_gen)
    n_in, n_out = int(b["enc_valid"].sum(1).max()), max(int(b["dec_valid"].sum(1).max()), 1)
    return {k: v[:, :n_in] if k.startswith("enc") else v[:, :n_out] for k, v in b.items()}   # CPU: trim padding


models, opts = {}, {}
for head in ("modality", "full"):
    torch.manual_seed(S["seed"])      # the same initial weights: the heads differ only in their loss
    models[head] = Nano4M(Nano4MConfig(n_enc_layer=S["n_layer"], n_dec_layer=S["n_layer"], n_embd=S["n_embd"],
                                       n_head=S["n_head"], head=head, pos_emb=S["pos_emb"]))
    opts[head] = models[head].configure_optimizers(0.05, S["lr"], (0.9, 0.95), "cpu")
assert all(torch.equal(a, b) for a, b in zip(models["modality"].parameters(), models["full"].parameters()))
print(f"two models of {models['full'].get_num_params() / 1e6:.2f}M parameters, batch {S['batch_size']}, "
      f"{S['steps']} steps each, on {tok}")

eval_gen = (torch.Generator().manual_seed(S["seed"] + 7919), torch.Generator().manual_seed(S["seed"] + 7920))
eval_batches = [batch_of("val", *eval_gen) for _ in range(S["eval_batches"])]


@torch.no_grad()
def evaluate(model):
    model.eval()
    sums = {(k, m.name): 0.0 for k in ("own", "full") for m in M.MODALITIES}
    counts = {m.name: 0 for m in M.MODALITIES}
    W = model.lm_head.weight.float()
    for b in eval_batches:
        h = model.decode_hidden(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"])
        mod = M.position_modality(b["dec_pos"])
        for i, m in enumerate(M.MODALITIES):
            sel = b["dec_valid"] & (mod == i) & (b["dec_ids"] >= 0)
            if not sel.any():
                continue
            logits = h[sel].float() @ W.t()
            ids = b["dec_ids"][sel]
            sums["full", m.name] += F.cross_entropy(logits, ids, reduction="sum").item()
            sums["own", m.name] += F.cross_entropy(logits[:, :m.vocab], ids, reduction="sum").item()
            counts[m.name] += int(sel.sum())
    model.train()
    out = {}
    for k in ("own", "full"):
        per = {m: sums[k, m] / counts[m] for m in counts if counts[m]}
        out[k] = {"mean": sum(per.values()) / len(per), **per}
    return out


def lr_at(it):
    if it < S["warmup"]:
        return S["lr"] * (it + 1) / (S["warmup"] + 1)
    r = (it - S["warmup"]) / max(S["steps"] - S["warmup"], 1)
    lo = S["lr"] * S["min_lr_frac"]
    return lo + 0.5 * (1 + math.cos(math.pi * r)) * (S["lr"] - lo)


log = {"settings": S, "evals": [], "step_s": {"modality": [], "full": []}, "train_loss": {"modality": [], "full": []}}
data_gen, mask_gen = torch.Generator().manual_seed(S["seed"]), torch.Generator().manual_seed(S["seed"] + 1)
for it in range(S["steps"] + 1):
    if it % S["eval_every"] == 0 or it == S["steps"]:
        row = {"iter": it, **{h: evaluate(m) for h, m in models.items()}}
        log["evals"].append(row)
        print(f"eval {it}: own-range CE modality-head {row['modality']['own']['mean']:.3f} full-head "
              f"{row['full']['own']['mean']:.3f} | all-50,304 CE modality-head {row['modality']['full']['mean']:.3f} "
              f"full-head {row['full']['full']['mean']:.3f}", flush=True)
    if it == S["steps"]:
        break
    b = batch_of("train", data_gen, mask_gen)
    for head, model in models.items():
        for g in opts[head].param_groups:
            g["lr"] = lr_at(it)
        t0 = time.time()
        loss, _ = model(b["enc_ids"], b["enc_pos"], b["enc_valid"], b["dec_pos"], b["dec_valid"], b["dec_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opts[head].step()
        opts[head].zero_grad(set_to_none=True)
        log["step_s"][head].append(time.time() - t0)
        log["train_loss"][head].append(loss.item())
    if it % 10 == 0:
        print(f"iter {it}: loss modality-head {log['train_loss']['modality'][-1]:.3f} full-head "
              f"{log['train_loss']['full'][-1]:.3f} | s/step {log['step_s']['modality'][-1]:.1f} / "
              f"{log['step_s']['full'][-1]:.1f}", flush=True)

last = log["evals"][-1]
print("\nval CE after the last step (nats), per modality: own-range | all 50,304 ids")
for name in ["mean"] + [m.name for m in M.MODALITIES]:
    if name in last["full"]["own"]:
        print(f"  {name:<11s} modality-head {last['modality']['own'][name]:.3f} | {last['modality']['full'][name]:.3f}"
              f"    full-head {last['full']['own'][name]:.3f} | {last['full']['full'][name]:.3f}")
print(f"median s/step: modality-head {np.median(log['step_s']['modality']):.2f}, "
      f"full-head {np.median(log['step_s']['full']):.2f}")
os.makedirs(os.path.dirname(S["out"]) or ".", exist_ok=True)
with open(S["out"] + ".tmp", "w") as f:
    json.dump(log, f, indent=1)
os.replace(S["out"] + ".tmp", S["out"])
print(f"wrote {S['out']}")
