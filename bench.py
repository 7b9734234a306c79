"""
Time nano4M training steps at the report's shape (batch 64, 256 input + 256 target slots, d6-6w512) and the
batch assembly (masking.build_batch on random token streams) separately, for each dtype / compile asked for:

    python bench.py                                    # float32 and bfloat16, eager
    python bench.py --dtypes=float32,bfloat16 --compiles=False,True,reduce-overhead
    python bench.py --small                            # a tiny shape that runs on a CPU in seconds
    python bench.py --budgets=recipe                   # the recipe's own batches: padded vs packed

Prints one table row per setting: seconds/step, tokens/s, MFU, the batch assembly time and its share of a
step, and the projected time of the report's 18,311 steps. The step is the one of train.py: forward (autocast
for bf16), backward, grad clipping, fused AdamW, the per-modality head's row counts copied to the host
ahead (counts_ahead). Batches are assembled beforehand and cycled, so the step time excludes assembly.

--budgets=full (the default) fills every slot: the worst case, and the shape of the numbers above.
--budgets=recipe draws each sample's input and target budgets from config/audio.py's ranges (16..256), so
about half of the 256 + 256 slots are padding, and times each layout of --layouts on the same batches, the
layouts interleaved in --repeats rounds in one process (a machine shared with other work slows them alike):
  padded   the fixed-width batch as drawn (static shapes: what torch.compile and the GPU run)
  trimmed  the batch-wide padding dropped (train.py's eager CPU path before packing)
  packed   every sample's real tokens only (packing.py; eager only: under compile it is the padded step)
Each row then also gives the real (non-padding) tokens/s, the MFU counted on real tokens only, and the CPU
time per step (the process's, all threads); the last line is the packed/padded speed-up, the median over
rounds of the per-round ratio, with its range.
On a CPU, --budgets=recipe times 2 steps per layout and round after 1 warm-up step, unless --steps / --warmup
are given. On a busy CPU run it with OMP_WAIT_POLICY=PASSIVE (or --threads=1): spinning OpenMP threads
blur the figures (README, Speed).
--heads=per_modality,static,plain times the fast path's static-shape head (fastpath.static_shape_loss) and model.py's
plain F.cross_entropy head (model.fast = False, train.py --fast_path=False) beside the fast per-modality one; the
last lines then give each head's s/step over the first head's, from the same run.
"""
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

import configurator
import fastpath
import masking
import modalities
from model import Nano4M, Nano4MConfig

# -----------------------------------------------------------------------------------------------------
batch_size = 64
input_budget = (256, 256)       # every slot filled: the report's padded shape, worst case for the head
target_budget = (256, 256)
n_enc_layer = 6
n_dec_layer = 6
n_embd = 512
n_head = 8
separate_vocab = False          # ToyZoo's adapters (adapters.py): own embedding / head rows per modality
code_features = False           # ... code features at ToyZoo's vector sizes (random vectors)
grid_conv = False               # ... a small CNN per image grid before the encoder
vocab_head = 'modality'         # the model's head: 'modality' (own ids per modality) or 'full' (config/audio.py's)
dtypes = 'float32,bfloat16'     # comma-separated
compiles = 'False'              # comma-separated: False, True (default mode), or a torch.compile mode
                                # such as reduce-overhead (the trunk as CUDA graphs)
steps = 20                      # timed steps per setting
warmup = 5                      # untimed steps first (compilation happens here)
assembly_batches = 10           # batches assembled (and timed) from random token streams
total_iters = 18311             # the report's run, for the projection
peak_flops = 989e12             # H100 SXM dense bf16; MFU of the fp32 rows is against this too
device = 'auto'
threads = 0                     # CPU threads for torch (0 = torch's default)
seed = 1337
counts_ahead = True             # as train.py: the head's per-modality row counts copied to the host when the
                                # batch is made; False reads them mid-step (a sync that drains the GPU queue)
small = False                   # tiny shape for CPU: d1-1w64, batch 4, 32 + 32 slots
budgets = 'full'                # full: every slot filled; recipe: config/audio.py's budgets per sample
layouts = 'padded,packed'       # with --budgets=recipe, comma-separated: padded, trimmed, packed
heads = 'per_modality'          # comma-separated: per_modality, static (fastpath.py), plain (model.py's Nano4M.loss)
repeats = 3                     # with --budgets=recipe: interleaved rounds of `steps` steps per layout
sdpa_backend = 'auto'           # auto (PyTorch picks), or force one: cudnn, efficient, math (flash takes no mask)
profile = False                 # after timing, profile a few steps and print the kernels that cost the most
# -----------------------------------------------------------------------------------------------------
_args = ['--small=True' if a == '--small' else a for a in sys.argv[1:]]
try:
    globals().update(configurator.apply_overrides(configurator.settings(globals()), _args))
except configurator.ConfigError as e:
    raise SystemExit(f"bench.py: {e}")
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if 'cuda' in device else 'cpu'
if budgets not in ('full', 'recipe'):
    raise SystemExit(f"bench.py: --budgets={budgets!r}: choose full or recipe")
LAYOUTS = ('padded', 'trimmed', 'packed')
HEADS = ('per_modality', 'static', 'plain')
layouts = [x.strip() for x in layouts.split(',')] if budgets == 'recipe' else ['padded']
heads = [x.strip() for x in heads.split(',')]
for _name, _given, _known in (('layouts', layouts, LAYOUTS), ('heads', heads, HEADS)):
    if not _given or any(x not in _known for x in _given):
        raise SystemExit(f"bench.py: --{_name}={','.join(_given)!r}: choose from {', '.join(_known)}")
if budgets == 'recipe':
    _recipe = {}    # the report's recipe file, read for its two budgets
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config', 'audio.py')) as _f:
        exec(_f.read(), _recipe)
    input_budget, target_budget = _recipe['masking']['input_budget'], _recipe['masking']['target_budget']
if budgets == 'recipe' and device_type == 'cpu' and not small:
    # a CPU step of the report's model takes seconds: 2 timed steps per layout and round unless told otherwise
    steps = steps if any(a.startswith('--steps=') for a in _args) else 2
    warmup = warmup if any(a.startswith('--warmup=') for a in _args) else 1
if small:
    batch_size, n_enc_layer, n_dec_layer, n_embd, n_head = 4, 1, 1, 64, 1
    input_budget, target_budget = ((32, 32), (32, 32)) if budgets == 'full' else ((4, 32), (4, 32))
    steps, warmup = 5, 2
from torch.nn.attention import SDPBackend, sdpa_kernel
SDPA_BACKENDS = {'cudnn': SDPBackend.CUDNN_ATTENTION, 'efficient': SDPBackend.EFFICIENT_ATTENTION,
                 'math': SDPBackend.MATH, 'flash': SDPBackend.FLASH_ATTENTION}
if sdpa_backend != 'auto' and sdpa_backend not in SDPA_BACKENDS:
    raise SystemExit(f"bench.py: --sdpa_backend={sdpa_backend!r}: choose auto or one of {', '.join(SDPA_BACKENDS)}")
if threads:
    torch.set_num_threads(threads)
if device_type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def sdpa_context():
    return nullcontext() if sdpa_backend == 'auto' else sdpa_kernel(SDPA_BACKENDS[sdpa_backend])


def print_profile(step, label):
    """The kernels of a few steps, most device time first (host time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    n = 5
    with torch_profile(activities=activities) as prof:
        for i in range(n):
            step(i)
        sync()
    key = 'self_cuda_time_total' if device_type == 'cuda' else 'self_cpu_time_total'
    print(f"\nprofile of {n} steps, {label}:")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def sync():
    if device_type == 'cuda':
        torch.cuda.synchronize()


mask_cfg = masking.MaskingConfig(input_budget=input_budget, target_budget=target_budget)
n_in, n_out = mask_cfg.max_input_tokens, mask_cfg.max_target_tokens
gen = torch.Generator().manual_seed(seed)   # the token ids (masking.random_tokens)
mask_gen = torch.Generator(device=device).manual_seed(seed)


def assemble(tokens):
    """As train.py's get_batch: host token rows -> device (pinned, non-blocking) -> masking on the device."""
    if device_type == 'cuda':
        tokens = {k: v.pin_memory().to(device, non_blocking=True) for k, v in tokens.items()}
    else:
        tokens = {k: v.to(device) for k, v in tokens.items()}
    return masking.build_batch(tokens, mask_cfg, mask_gen)


# batch assembly, timed alone (copy to the device + masking; the memmap read, a ~140 KB gather per batch of
# 64, is left out). The first call captures masking's CUDA graph.
streams = [masking.random_tokens(batch_size, generator=gen) for _ in range(assembly_batches)]
assemble(streams[0])
sync()
t0 = time.perf_counter()
batches = [assemble(t) for t in streams]
sync()
assembly_s = (time.perf_counter() - t0) / assembly_batches

n_real_in = sum(int(b['enc_valid'].sum()) for b in batches) / len(batches)     # real tokens per batch
n_real_out = sum(int(b['dec_valid'].sum()) for b in batches) / len(batches)
print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device_type == 'cuda' else '') +
      f", torch {torch.__version__}, batch {batch_size}, {n_in} input + {n_out} target slots, "
      f"d{n_enc_layer}-{n_dec_layer}w{n_embd}, budgets {budgets} (input {tuple(input_budget)}, target "
      f"{tuple(target_budget)}): {n_real_in / batch_size:.0f} + {n_real_out / batch_size:.0f} real tokens per sample, "
      f"{(n_real_in + n_real_out) / (batch_size * (n_in + n_out)) * 100:.0f}% of the slots")
trimmed_batches = [masking.trim_padding(b) for b in batches]


def real_flops(model):
    """Training FLOPs of one step on the real tokens only, per sample at its own lengths, mean over batches."""
    total = 0
    for b in batches:
        for ni, no in zip(b['enc_valid'].sum(1).tolist(), b['dec_valid'].sum(1).tolist()):
            total += fastpath.flops_per_step(model, 1, ni, no)
    return total / len(batches)


rows, ratios = [], []
for dtype in dtypes.split(','):
    for compile_flag in compiles.split(','):
      for head in heads:
        compile_flag = compile_flag.strip()
        compile_on = compile_flag.lower() != 'false'
        compile_mode = 'default' if compile_flag.lower() in ('true', 'false') else compile_flag
        dtype = dtype.strip()
        torch.manual_seed(seed)
        feature_dims = (192, 64, 192, 80, 0) if code_features else ()   # patch_kmeans images, mel_rvq audio
        _adapters = dict(separate_vocab=separate_vocab, code_feature_dims=feature_dims, grid_conv=grid_conv)
        model = Nano4M(Nano4MConfig(n_enc_layer=n_enc_layer, n_dec_layer=n_dec_layer, n_embd=n_embd,
                                    n_head=n_head, head=vocab_head,
                                    adapters=_adapters if any(_adapters.values()) else None))
        if model.adapters is not None:
            model.adapters.set_code_features({m.name: torch.randn(m.vocab, f)
                                              for m, f in zip(modalities.MODALITIES, feature_dims) if f})
        model.to(device)
        model.fast, model.static_head = head != 'plain', head == 'static'
        optimizer = model.configure_optimizers(0.05, 1e-4, (0.9, 0.95), device_type)
        if compile_on:
            model.compile_trunk(mode=compile_mode)
        ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
        ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
        # the static head needs no counts: that is its point (no host round trip)
        ahead = counts_ahead and model.fast and not model.static_head
        counts = [fastpath.target_counts(model, b['dec_pos'], b['dec_valid'], b['dec_ids']) if ahead else None
                  for b in batches]
        run_layouts = [x for x in layouts if not (compile_on and x == 'packed')]   # packing is eager only
        if len(run_layouts) < len(layouts):
            print(f"(compile={compile_flag}: the packed layout is eager only, not timed)")

        def step(i, layout='padded'):
            batch = (trimmed_batches if layout == 'trimmed' else batches)[i % len(batches)]
            model.packed = layout == 'packed'
            with ctx:
                loss, _ = model(batch['enc_ids'], batch['enc_pos'], batch['enc_valid'], batch['dec_pos'],
                                batch['dec_valid'], batch['dec_ids'], counts[i % len(batches)])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        with sdpa_context():
            t0 = time.perf_counter()
            for layout in run_layouts:
                for i in range(warmup):
                    step(i, layout)
            sync()
            warm_s = time.perf_counter() - t0
            # rounds: every layout times the same `steps` batches, one layout after the other
            wall = {x: [] for x in run_layouts}
            cpu = {x: [] for x in run_layouts}
            n_rounds = repeats if budgets == 'recipe' else 1
            for r in range(n_rounds):
                for layout in run_layouts:
                    t0, c0 = time.perf_counter(), time.process_time()
                    for i in range(r * steps, (r + 1) * steps):
                        loss = step(i, layout)
                    sync()
                    wall[layout].append((time.perf_counter() - t0) / steps)
                    cpu[layout].append((time.process_time() - c0) / steps)
                if budgets == 'recipe':
                    print(f"round {r + 1}/{n_rounds}: " + ", ".join(f"{x} {wall[x][-1]:.4f} s/step" for x in run_layouts), flush=True)
            if profile:
                for layout in run_layouts:
                    print_profile(lambda i: step(i, layout), f"{dtype}, compile={compile_flag}, {layout}")
        if not torch.isfinite(loss):
            print(f"warning: non-finite loss with {dtype}, compile={compile_flag}")
        if 'padded' in run_layouts and 'packed' in run_layouts:
            per_round = [a / b for a, b in zip(wall['padded'], wall['packed'])]
            ratios.append((f"{dtype}, compile={compile_flag}, head={head}", per_round,
                           [a / b for a, b in zip(cpu['padded'], cpu['packed'])]))
        flops_real = real_flops(model)
        for layout in run_layouts:
            dt = sum(wall[layout]) / len(wall[layout])
            label = f"{dtype}, compile={compile_flag}" + (f", {layout}" if budgets == 'recipe' else '') + \
                (f", head={head}" if len(heads) > 1 else '')
            # each setting's figure as soon as it is measured: a later setting that crashes or runs out of time
            # (max-autotune can compile for minutes) does not take it with it
            print(f"{label}: {dt:.4f} s/step (warmup {warm_s:.1f} s)", flush=True)
            mfu = fastpath.estimate_mfu(model, batch_size, n_in, n_out, dt, peak_flops)
            row = [dtype, compile_flag] + ([layout] if budgets == 'recipe' else []) + ([head] if len(heads) > 1 else []) + \
                [f"{dt:.4f}", f"{batch_size * (n_in + n_out) / dt:,.0f}",
                 f"{mfu * 100:.1f}%" if device_type == 'cuda' else '-']
            if budgets == 'recipe':
                row += [f"{(n_real_in + n_real_out) / dt:,.0f}",
                        f"{flops_real / dt / peak_flops * 100:.1f}%" if device_type == 'cuda' else '-',
                        f"{sum(cpu[layout]) / len(cpu[layout]):.3f}"]
            row += [f"{assembly_s * 1000:.1f}", f"{assembly_s / dt * 100:.0f}%",
                    f"{total_iters * dt / 3600:.2f} h ({total_iters * dt / 60:.1f} min)", f"{warm_s:.1f}"]
            rows.append(tuple(row))
        del model, optimizer
        if device_type == 'cuda':
            torch.cuda.empty_cache()

header = ("dtype", "compile") + (("layout",) if budgets == 'recipe' else ()) + (("head",) if len(heads) > 1 else ()) + \
    ("s/step", "slots/s" if budgets == 'recipe' else "tokens/s", "MFU")
if budgets == 'recipe':
    header += ("real tokens/s", "MFU real", "cpu s/step")
header += ("assembly ms", "assembly/step", f"{total_iters} steps", "warmup s")
widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
print("-+-".join("-" * w for w in widths))
for r in rows:
    print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
print(f"(MFU against peak_flops={peak_flops:.3g}; the head counted at the mean modality vocab"
      + ("; 'MFU real' and 'real tokens/s' count the non-padding tokens only)" if budgets == 'recipe' else ")"))
for label, per_round, per_round_cpu in ratios:
    print(f"{label}: packed/padded per round {', '.join(f'{x:.2f}' for x in per_round)}x wall, "
          f"{', '.join(f'{x:.2f}' for x in per_round_cpu)}x CPU time")
if len(heads) > 1:   # each head against the first, per (dtype, compile[, layout]) setting of the same run
    _col = 3 if budgets == 'recipe' else 2
    base = None
    for r in rows:      # (against the latest baseline row before it: --heads=a,b,a,b pairs each round)
        if r[_col] == heads[0] or base is None or base[:_col] != r[:_col]:
            base = r
        else:
            print(f"{', '.join(r[:_col])}: head {r[_col]} / {heads[0]} = {float(r[_col + 1]) / float(base[_col + 1]):.2f}x s/step")
if ratios:
    # the headline: the first setting's median round (same batches, same process)
    label, per_round, _ = ratios[0]
    print(f"packed/padded speed-up: {statistics.median(per_round):.2f}x ({label}, median of {len(per_round)} rounds, "
          f"range {min(per_round):.2f}-{max(per_round):.2f}x)")
