"""
Time nano4M training steps at the report's shape (batch 64, 256 input + 256 target slots, d6-6w512) and the
batch assembly (masking.build_batch on random token streams) separately, for each dtype / compile asked for:

    python bench.py                                    # float32 and bfloat16, eager
    python bench.py --dtypes=float32,bfloat16 --compiles=False,True,reduce-overhead
    python bench.py --small                            # a tiny shape that runs on a CPU in seconds

Prints one table row per setting: seconds/step, tokens/s, MFU, the batch assembly time and its share of a
step, and the projected time of the report's 18,311 steps. The step is the one of train.py: forward (autocast
for bf16), backward, grad clipping, fused AdamW, the per-modality head's row counts copied to the host
ahead (counts_ahead). Batches are assembled beforehand and cycled, so the step time excludes assembly.
"""
import sys
import time
from contextlib import nullcontext

import torch

import configurator
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
separate_vocab = False          # model.Nano4MConfig.separate_vocab: own embedding / head rows per modality
code_features = False           # train.py --code_features, at ToyZoo's vector sizes (random vectors)
grid_conv = False               # model.Nano4MConfig.grid_conv: a small CNN per image grid before the encoder
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
sdpa_backend = 'auto'           # auto (PyTorch picks), or force one: cudnn, efficient, math (flash takes no mask)
profile = False                 # after timing, profile a few steps and print the kernels that cost the most
# -----------------------------------------------------------------------------------------------------
_args = ['--small=True' if a == '--small' else a for a in sys.argv[1:]]
try:
    globals().update(configurator.apply_overrides(configurator.settings(globals()), _args))
except configurator.ConfigError as e:
    raise SystemExit(f"bench.py: {e}")
if small:
    batch_size, input_budget, target_budget = 4, (32, 32), (32, 32)
    n_enc_layer, n_dec_layer, n_embd, n_head = 1, 1, 64, 1
    steps, warmup = 5, 2
from torch.nn.attention import SDPBackend, sdpa_kernel
SDPA_BACKENDS = {'cudnn': SDPBackend.CUDNN_ATTENTION, 'efficient': SDPBackend.EFFICIENT_ATTENTION,
                 'math': SDPBackend.MATH, 'flash': SDPBackend.FLASH_ATTENTION}
if sdpa_backend != 'auto' and sdpa_backend not in SDPA_BACKENDS:
    raise SystemExit(f"bench.py: --sdpa_backend={sdpa_backend!r}: choose auto or one of {', '.join(SDPA_BACKENDS)}")
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if 'cuda' in device else 'cpu'
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
gen = torch.Generator().manual_seed(seed)


def random_tokens():
    """One random view per sample, as gather_views returns it: ids in each modality's range, a caption of
    a few ids then end-of-text padding."""
    tokens = {m.name: torch.randint(m.vocab, (batch_size, m.length), generator=gen) for m in modalities.MODALITIES}
    tokens['caption'][:, 6:] = modalities.CAPTION_PAD
    return tokens


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
streams = [random_tokens() for _ in range(assembly_batches)]
assemble(streams[0])
sync()
t0 = time.perf_counter()
batches = [assemble(t) for t in streams]
sync()
assembly_s = (time.perf_counter() - t0) / assembly_batches

print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device_type == 'cuda' else '') +
      f", torch {torch.__version__}, batch {batch_size}, {n_in} input + {n_out} target slots, "
      f"d{n_enc_layer}-{n_dec_layer}w{n_embd}")
rows = []
for dtype in dtypes.split(','):
    for compile_flag in compiles.split(','):
        compile_flag = compile_flag.strip()
        compile_on = compile_flag.lower() != 'false'
        compile_mode = 'default' if compile_flag.lower() in ('true', 'false') else compile_flag
        dtype = dtype.strip()
        torch.manual_seed(seed)
        feature_dims = (192, 64, 192, 80, 0) if code_features else ()   # patch_kmeans images, mel_rvq audio
        model = Nano4M(Nano4MConfig(n_enc_layer=n_enc_layer, n_dec_layer=n_dec_layer, n_embd=n_embd,
                                    n_head=n_head, separate_vocab=separate_vocab,
                                    code_feature_dims=feature_dims, grid_conv=grid_conv))
        model.set_code_features({m.name: torch.randn(m.vocab, f) for m, f in zip(modalities.MODALITIES, feature_dims) if f})
        model.to(device)
        optimizer = model.configure_optimizers(0.05, 1e-4, (0.9, 0.95), device_type)
        if compile_on:
            model.compile_trunk(mode=compile_mode)
        ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]
        ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

        counts = [model.target_counts(b['dec_pos'], b['dec_valid'], b['dec_ids']) if counts_ahead else None for b in batches]

        def step(i):
            batch = batches[i % len(batches)]
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
            for i in range(warmup):
                step(i)
            sync()
            warm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(steps):
                loss = step(i)
            sync()
            dt = (time.perf_counter() - t0) / steps
            if profile:
                print_profile(step, f"{dtype}, compile={compile_flag}")
        if not torch.isfinite(loss):
            print(f"warning: non-finite loss with {dtype}, compile={compile_flag}")
        # each setting's figure as soon as it is measured: a later setting that crashes or runs out of time
        # (max-autotune can compile for minutes) does not take it with it
        print(f"{dtype}, compile={compile_flag}: {dt:.4f} s/step (warmup {warm_s:.1f} s)", flush=True)
        mfu = model.estimate_mfu(batch_size, n_in, n_out, dt, peak_flops)
        rows.append((dtype, compile_flag, f"{dt:.4f}", f"{batch_size * (n_in + n_out) / dt:,.0f}",
                     f"{mfu * 100:.1f}%" if device_type == 'cuda' else '-', f"{assembly_s * 1000:.1f}", f"{assembly_s / dt * 100:.0f}%",
                     f"{total_iters * dt / 3600:.2f} h", f"{warm_s:.1f}"))
        del model, optimizer
        if device_type == 'cuda':
            torch.cuda.empty_cache()

header = ("dtype", "compile", "s/step", "tokens/s", "MFU", "assembly ms", "assembly/step",
          f"{total_iters} steps", "warmup s")
widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
print("-+-".join("-" * w for w in widths))
for r in rows:
    print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
print(f"(MFU against peak_flops={peak_flops:.3g}; the head counted at the mean modality vocab)")
