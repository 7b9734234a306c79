"""train.py end to end on a tiny synthetic tokenized dataset (runs train.py as a subprocess, as a user would)."""
import json
import math
import os
import subprocess
import tempfile
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import modalities as M  # noqa: E402
import rawdata  # noqa: E402


def write_dataset(root, name="synth", n_train=48, n_val=16, n_classes=4, noise=0.1, seed=0):
    """A learnable tokenized dataset in the layout of modalities.py: every image/audio stream is its class's
    template with a fraction `noise` of random tokens; the caption names the class."""
    rng = np.random.default_rng(seed)
    tok = os.path.join(root, name, "tok")
    templates = {m.name: rng.integers(0, m.vocab, size=(n_classes, m.length)) for m in M.MODALITIES if m.per_view}
    meta = {"dataset": name, "class_names": [f"class{c}" for c in range(n_classes)], "num_views": M.NUM_VIEWS,
            "splits": {"train": n_train, "val": n_val}, "modalities": {}}
    for m in M.MODALITIES:
        meta["modalities"][m.name] = {"shape": [M.NUM_VIEWS, m.length] if m.per_view else [m.length],
                                      "vocab": m.vocab, "tokenizer": "synthetic", "codebook": None}
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(os.path.join(tok, split), exist_ok=True)
        labels = rng.integers(0, n_classes, size=n)
        for m in M.MODALITIES:
            if m.per_view:
                arr = templates[m.name][labels][:, None, :].repeat(M.NUM_VIEWS, axis=1)
                noisy = rng.random(arr.shape) < noise
                arr = np.where(noisy, rng.integers(0, m.vocab, size=arr.shape), arr)
            else:   # caption: 'a photo of a classN' as made-up BPE ids, end-of-text, padding
                arr = np.full((n, m.length), M.CAPTION_PAD)
                arr[:, :4] = [64, 4590, 286, 257]
                arr[:, 4] = 1000 + labels
            arr.astype(np.uint16).tofile(os.path.join(tok, split, m.name + ".bin"))
        labels.astype(np.uint16).tofile(os.path.join(tok, split, "label.bin"))
        with open(os.path.join(tok, split, "clip_ids.json"), "w") as f:
            json.dump([f"{split}{i:04d}" for i in range(n)], f)
    with open(os.path.join(tok, "meta.json"), "w") as f:
        json.dump(meta, f)
    return root


def write_feature_dataset(root, name="feat"):
    """write_dataset with tokenizers of the real offline kinds behind it (random codebooks: patch_kmeans
    images, mel_rvq audio, BPE caption), so that --code_features has a vector per id to read."""
    import torch
    import modality_tokenizers as T
    write_dataset(root, name=name)
    tok = os.path.join(root, name, "tok")
    g = torch.Generator().manual_seed(0)
    for m, c, means in (("tok_rgb", 3, 16), ("tok_depth", 1, 128), ("tok_normal", 3, 128)):   # depth, normal:
        T.PatchKMeansTokenizer(m, torch.rand(means, c, generator=g), torch.randn(64, c * 64, generator=g)   # every
                               ).save(os.path.join(tok, m + ".pt"))                                  # id a code
    T.MelRVQTokenizer(torch.randn(2, 1024, 80, generator=g), {"level1": "shape"}).save(os.path.join(tok, "audio.pt"))
    with open(os.path.join(tok, "meta.json")) as f:
        meta = json.load(f)
    for m in ("tok_rgb", "tok_depth", "tok_normal"):
        meta["modalities"][m].update(tokenizer="patch_kmeans", codebook=m + ".pt")
    meta["modalities"]["tok_audio"].update(tokenizer="mel_rvq", codebook="audio.pt")
    meta["modalities"]["caption"].update(tokenizer="gpt2_bpe")
    with open(os.path.join(tok, "meta.json"), "w") as f:
        json.dump(meta, f)
    return root


# width 32 and few targets: the 50k-row embedding/head and per-modality logits dominate a tiny model's step
TINY = ["--n_enc_layer=1", "--n_dec_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=8",
        "--masking.input_budget=(4, 32)", "--masking.target_budget=(4, 16)", "--eval_iters=4", "--log_interval=1",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=10", "--seed=7"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


def train_cmd(data_root, out_dir, *args, configs=()):
    configs = [os.path.join(HERE, c) for c in configs]
    return [sys.executable, os.path.join(HERE, "train.py"), *configs, "--dataset=synth", f"--data_root={data_root}",
            f"--out_dir={out_dir}", *TINY, *args]


def run_all(cmds, cwd):
    """Run the commands side by side (most of a refused or dry run is importing torch) -> their finished
    processes (returncode, stdout, stderr), in order."""
    env = dict(os.environ, OMP_NUM_THREADS="1")   # tiny ops: threads only contend on a busy 2-core box
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for c in cmds]
    out = []
    for p, c in zip(procs, cmds):
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    return out


def train(data_root, out_dir, *args, check=True, configs=()):
    # run beside out_dir, never in the checkout: a config's relative paths (config/toyzoo.py's stage-1
    # checkpoint) must not find the user's own out/
    proc, = run_all([train_cmd(data_root, out_dir, *args, configs=configs)], os.path.dirname(os.path.abspath(out_dir)))
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_loss_falls(data_root, tmp_path):
    train(data_root, tmp_path, "--max_iters=150", "--lr_decay_iters=150", "--eval_interval=75",
          "--log_interval=25")
    evals = read_jsonl(tmp_path / "log.jsonl")
    assert [e["iter"] for e in evals] == [0, 75, 150]
    steps = read_jsonl(tmp_path / "train_log.jsonl")
    assert steps[0]["lr"] == pytest.approx(1e-2 / 11) and evals[-1]["lr"] == pytest.approx(1e-3)  # warmup, cosine
    assert steps[-1]["iter"] == 125 and steps[-1]["lr"] > 1e-3
    first, last = evals[0], evals[-1]
    for split in ("train", "val"):
        assert last[split]["loss"] < first[split]["loss"] - 1.0, (split, first[split], last[split])
    # the image modalities learn their class templates, the caption its class word
    for name in ("tok_rgb", "tok_depth", "tok_normal"):
        assert last["val"][name] < first["val"][name] - 0.5, name
    assert last["val"]["caption"] < 1.0
    assert os.path.exists(tmp_path / "ckpt.pt") and not os.path.exists(tmp_path / "ckpt.pt.tmp")
    import torch
    from model import load_checkpoint
    model, ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 150 and ckpt["config"]["dataset"] == "synth"
    assert model.config.n_embd == 32 and isinstance(model, torch.nn.Module)


def test_resume_continues_the_same_curve(data_root, tmp_path):
    common = ["--lr_decay_iters=10", "--warmup_iters=2", "--eval_interval=5", "--eval_iters=2"]
    train(data_root, tmp_path / "straight", "--max_iters=10", *common)
    train(data_root, tmp_path / "split", "--max_iters=5", *common)
    train(data_root, tmp_path / "split", "--max_iters=10", "--init_from=resume", *common)
    straight = read_jsonl(tmp_path / "straight" / "train_log.jsonl")
    split = read_jsonl(tmp_path / "split" / "train_log.jsonl")
    assert [r["iter"] for r in straight] == list(range(10))                  # max_iters updates, no more
    assert [r["iter"] for r in split] == list(range(5)) + list(range(5, 10))  # the resumed run goes on at 5
    after = {r["iter"]: r["loss"] for r in split[5:]}
    for r in straight[5:]:
        assert abs(r["loss"] - after[r["iter"]]) <= 1e-6, (r["iter"], r["loss"], after[r["iter"]])
    assert len({r["loss"] for r in straight[5:]}) > 1     # it really trained on
    ev_straight = read_jsonl(tmp_path / "straight" / "log.jsonl")[-1]
    ev_split = read_jsonl(tmp_path / "split" / "log.jsonl")[-1]
    assert ev_straight["iter"] == ev_split["iter"] == 10
    assert abs(ev_straight["val"]["loss"] - ev_split["val"]["loss"]) <= 1e-6


def test_warm_start_from_another_run(data_root, tmp_path):
    """--init_from=<ckpt.pt> starts from that run's weights with a fresh schedule and optimizer (a curriculum):
    its first eval equals the source run's last, its steps count from 0 again; a setting that holds no weights
    (cross_local) is this run's; an architecture that disagrees with the checkpoint, or a missing file, is refused."""
    import torch
    common = ["--eval_interval=10", "--eval_iters=2", "--warmup_iters=2"]
    train(data_root, tmp_path / "first", "--max_iters=10", "--lr_decay_iters=10", *common)
    src = str(tmp_path / "first" / "ckpt.pt")
    train(data_root, tmp_path / "then", "--max_iters=10", "--lr_decay_iters=10", f"--init_from={src}", *common)
    before = read_jsonl(tmp_path / "first" / "log.jsonl")[-1]
    after = read_jsonl(tmp_path / "then" / "log.jsonl")
    assert before["iter"] == 10 and [e["iter"] for e in after] == [0, 10]
    # the eval batches come from a fixed seed: the same weights score the same loss
    assert abs(after[0]["val"]["loss"] - before["val"]["loss"]) <= 1e-6
    assert after[-1]["val"]["loss"] != before["val"]["loss"]                     # and it trained on
    steps = read_jsonl(tmp_path / "then" / "train_log.jsonl")
    assert steps[0]["iter"] == 0 and steps[0]["lr"] == pytest.approx(1e-2 / 3)   # warmup again
    ckpt = torch.load(tmp_path / "then" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["iter_num"] == 10 and ckpt["config"]["init_from"] == src
    train(data_root, tmp_path / "local", "--max_iters=1", f"--init_from={src}", "--cross_local=1.0", *common)
    local = torch.load(tmp_path / "local" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert local["model_args"]["cross_local"] == 1.0 and ckpt["model_args"]["cross_local"] == 0.0   # no weights
    proc = train(data_root, tmp_path / "wider", "--max_iters=1", f"--init_from={src}", "--n_embd=64", check=False)
    assert proc.returncode != 0 and "n_embd" in proc.stderr and "64" in proc.stderr
    proc = train(data_root, tmp_path / "gone", "--max_iters=1", f"--init_from={tmp_path}/nope.pt", check=False)
    assert proc.returncode != 0 and "nope.pt does not exist" in proc.stderr


def test_toyzoo_config_trains(tmp_path):
    """The shipped ToyZoo default, at a tiny size, in its two stages: config/toyzoo_rgb.py (rgb -> caption
    alone, from scratch), then config/toyzoo.py (every task) from stage 1's weights; without stage 1's
    checkpoint stage 2 says what to run first."""
    import torch
    root = write_feature_dataset(str(tmp_path / "data"))
    stage1, stage2 = tmp_path / "rgb", tmp_path / "out"
    proc = train(root, stage2, "--dataset=feat", "--max_iters=1", check=False, configs=("config/toyzoo.py",))
    assert proc.returncode != 0 and "config/toyzoo_rgb.py" in proc.stderr and "scratch" in proc.stderr
    train(root, stage1, "--dataset=feat", "--max_iters=6", "--eval_interval=6", configs=("config/toyzoo_rgb.py",))
    first = read_jsonl(stage1 / "train_log.jsonl")
    assert len(first) == 6 and all(set(r) == {"iter", "loss", "caption", "lr", "ms"} for r in first)  # captions only
    train(root, stage2, "--dataset=feat", "--max_iters=6", "--eval_interval=6", f"--init_from={stage1}/ckpt.pt",
          configs=("config/toyzoo.py",))
    losses = [r["loss"] for r in read_jsonl(stage2 / "train_log.jsonl")]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    ckpt = torch.load(stage2 / "ckpt.pt", map_location="cpu", weights_only=False)
    args = ckpt["model_args"]
    args = args["adapters"]                                  # ToyZoo's embedding adapters (adapters.py)
    assert args["separate_vocab"] and args["code_feature_dims"] == (192, 64, 192, 80, 0)
    assert args["feature_only"] == ("tok_rgb",) and args["grid_conv"] and args["init"] == "torch"
    assert args["factored_head"] == (("tok_depth", 128, 64), ("tok_normal", 128, 64))
    assert ckpt["config"]["init_from"] == f"{stage1}/ckpt.pt"
    mixture = ckpt["config"]["masking"]["mixture"]
    assert all(c["weight"] > 0 for c in mixture)                # relative weights (masking normalises them)
    whole = {(tuple(c.get("input_full", ())), tuple(c.get("target_full", ()))) for c in mixture}
    assert {(("audio",), ("caption",)), (("rgb",), ("caption",)), (("caption",), ("audio",))} <= whole
    # stage 2 on another tokenization of the same clips (here: another depth codebook, as tokenize_all.py
    # --depth_norm=image gives): the warm start reads this dataset's code vectors, not stage 1's
    import modality_tokenizers as T
    write_feature_dataset(root, name="feat2")
    T.PatchKMeansTokenizer("tok_depth", torch.rand(128, 1), torch.randn(64, 64) * 3).save(
        os.path.join(root, "feat2", "tok", "tok_depth.pt"))
    proc = train(root, tmp_path / "out2", "--dataset=feat2", "--max_iters=1", f"--init_from={stage1}/ckpt.pt",
                 configs=("config/toyzoo.py",))
    assert "code features of tok_depth differ" in proc.stdout
    first, again = (torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True)["model"]
                    for d in (stage1, tmp_path / "out2"))
    assert torch.equal(first["adapters.code_feat_tok_rgb"], again["adapters.code_feat_tok_rgb"])
    assert not torch.equal(first["adapters.code_feat_tok_depth"], again["adapters.code_feat_tok_depth"])
    # the factored head holds no weights: a warm start takes this run's (with (Km, Ks) from this dataset's
    # tokenizers), one factor or none whatever stage 1 had, and refuses a modality whose ids are not a product code
    for factored, expect in (("('tok_depth',)", (("tok_depth", 128, 64),)), ("()", ())):
        train(root, tmp_path / "out3", "--dataset=feat2", "--max_iters=2", f"--init_from={stage1}/ckpt.pt",
              f"--adapters.factored_head={factored}", configs=("config/toyzoo.py",))
        ckpt = torch.load(tmp_path / "out3" / "ckpt.pt", map_location="cpu", weights_only=True)
        assert ckpt["model_args"]["adapters"]["factored_head"] == expect
    proc = train(root, tmp_path / "out4", "--dataset=feat2", "--max_iters=1", f"--init_from={stage1}/ckpt.pt",
                 "--adapters.factored_head=('tok_audio',)", check=False, configs=("config/toyzoo.py",))
    assert proc.returncode != 0 and "tok_audio" in proc.stderr and "not a product code" in proc.stderr


def test_code_features_train_and_resume(tmp_path):
    """--code_features reads each id's vector from the dataset's tokenizers (here random codebooks of the real
    rgb and audio kinds), keeps them in the checkpoint, trains (with shifted image grids), and resumes on the
    same curve; a dataset whose tokenizers have no codebooks is refused with its meta.json named."""
    import torch
    root = write_feature_dataset(str(tmp_path / "data"))
    common = ["--dataset=feat", "--adapters.code_features=True", "--lr_decay_iters=40", "--eval_interval=20",
              "--eval_iters=2", "--log_interval=5", "--augment_shift=2"]   # the shifts come from the saved rngs too
    train(root, tmp_path / "straight", "--max_iters=40", *common)
    evals = read_jsonl(tmp_path / "straight" / "log.jsonl")
    assert evals[-1]["val"]["loss"] < evals[0]["val"]["loss"] - 1.0
    ckpt = torch.load(tmp_path / "straight" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["model_args"]["adapters"]["code_feature_dims"] == (192, 64, 192, 80, 0)
    assert ckpt["model"]["adapters.code_feat_tok_rgb"].shape == (16384, 192)
    assert ckpt["model"]["adapters.code_feat_tok_rgb"][16 * 64:].abs().sum() == 0     # past the 1,024 codes
    train(root, tmp_path / "split", "--max_iters=20", *common)
    train(root, tmp_path / "split", "--max_iters=40", "--init_from=resume", *common)
    straight = {r["iter"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "train_log.jsonl")}
    resumed = [r for r in read_jsonl(tmp_path / "split" / "train_log.jsonl") if r["iter"] > 20]
    assert resumed and all(abs(r["loss"] - straight[r["iter"]]) <= 1e-6 for r in resumed)
    write_dataset(root)                                         # "synth": tokenizers without codebooks
    proc = train(root, tmp_path / "refused", "--max_iters=1", "--adapters.code_features=True", check=False)
    assert proc.returncode != 0 and "meta.json" in proc.stderr and "synthetic" in proc.stderr


def test_bf16_follows_fp32(data_root, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        train(data_root, tmp_path / dtype, "--max_iters=30", "--lr_decay_iters=30", "--eval_interval=1000",
              f"--dtype={dtype}", "--max_train_clips=24", "--cond_dropout=0.0")
        # (with conditioning dropout on, the two runs at this lr track each other for ~16 steps, then drift
        # apart: 0.23 nats at step 21; the cause is not pinned down, so this test compares dtypes without it)
        runs[dtype] = [r["loss"] for r in read_jsonl(tmp_path / dtype / "train_log.jsonl")]
    fp32, bf16 = runs["float32"], runs["bfloat16"]
    assert len(fp32) == len(bf16) == 30
    assert all(math.isfinite(x) for x in bf16)
    diffs = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(diffs) < 0.1, diffs
    assert bf16[-1] < bf16[0] - 0.5


def test_packed_and_static_head_steps_follow_the_padded_curve(data_root, tmp_path):
    """train.py's packed trunk (on by default on a CPU), static head and plain path (--fast_path=False: model.py's
    F.cross_entropy, no packing) give the padded per-modality step's losses, step after step (float rounding
    apart), and say which step they run."""
    runs = {}
    for name, args in (("padded", ["--packing=off"]), ("packed", ["--packing=on"]),
                       ("static", ["--packing=off", "--static_head=True"]), ("plain", ["--fast_path=False"])):
        proc = train(data_root, tmp_path / name, "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=1000", *args)
        assert f"step: packing {'on' if name == 'packed' else 'off'}, head " \
               f"{'static' if name == 'static' else 'per-modality'}" in proc.stdout
        runs[name] = [r["loss"] for r in read_jsonl(tmp_path / name / "train_log.jsonl")]
    assert len(runs["padded"]) == 6 and len(set(runs["padded"])) > 1
    assert "head per-modality (plain)" in proc.stdout                  # the last run's: the plain path
    for name in ("packed", "static", "plain"):
        assert runs[name] == pytest.approx(runs["padded"], rel=1e-4, abs=1e-5), name
    proc = train(data_root, tmp_path / "refused", "--packing=on", "--compile=True", check=False)
    assert proc.returncode != 0 and "--packing=on needs eager steps" in proc.stderr
    proc = train(data_root, tmp_path / "refused", "--packing=yes", check=False)
    assert proc.returncode != 0 and "choose auto, on or off" in proc.stderr
    proc = train(data_root, tmp_path / "refused", "--static_head=True", "--head=full", check=False)
    assert proc.returncode != 0 and "static_head" in proc.stderr


def test_typo_and_wrong_type_are_refused(data_root, tmp_path):
    procs = iter(run_all([train_cmd(data_root, tmp_path, *a) for a in (
        ["--batchsize=8"], ["--max_iters=2.5"], ["--masking.input_alphas=(1.0, 1.0)"], ["--masking.input_budgett=(1, 2)"],
        ["--adapters.grid_convv=True"], ["--compile=True", "--compile_mode=fast"], ["--max_train_clips=49"])],
        str(tmp_path.parent)))
    proc = next(procs)
    assert proc.returncode != 0
    assert "unknown setting 'batchsize'" in proc.stderr and "batch_size" in proc.stderr
    proc = next(procs)   # --max_iters=2.5 (more types: test_configurator_parsing)
    assert proc.returncode != 0 and "expects an int" in proc.stderr
    proc = next(procs)   # masking validates it
    assert proc.returncode != 0 and "bad masking settings" in proc.stderr
    proc = next(procs)   # a typo inside a group
    assert proc.returncode != 0 and "input_budgett" in proc.stderr and "input_budget" in proc.stderr
    proc = next(procs)
    assert proc.returncode != 0 and "grid_convv" in proc.stderr and "grid_conv" in proc.stderr
    proc = next(procs)
    assert proc.returncode != 0 and "reduce-overhead" in proc.stderr               # lists torch's modes
    proc = next(procs)   # --max_train_clips=49: the data has 48
    assert proc.returncode != 0 and "only 48 train clips" in proc.stderr
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_configurator_parsing(tmp_path):
    from configurator import apply_overrides, ConfigError
    defaults = dict(n=1, lr=1e-4, flag=False, name="out", budget=(16, 256), mixture=None)
    cfg = apply_overrides(defaults, ["--n=3", "--lr=3", "--flag=True", "--name=out-audio",
                                     "--budget=(8, 64)", "--mixture=[{'weight': 1.0}]"], verbose=False)
    assert cfg == dict(n=3, lr=3.0, flag=True, name="out-audio", budget=(8, 64), mixture=[{"weight": 1.0}])
    assert isinstance(cfg["lr"], float)
    assert apply_overrides(defaults, ["--budget=4,32", "--flag=false", "--name=123"], verbose=False) == \
        dict(defaults, budget=(4, 32), flag=False, name="123")
    for bad in ("--n=1.5", "--flag=1", "--lr=fast", "--budget=3", "--nn=2", "--n"):
        with pytest.raises(ConfigError):
            apply_overrides(defaults, [bad], verbose=False)
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("n = n * 4\nbudget = (1, 2)\n")
    assert apply_overrides(defaults, [str(cfg_file)], verbose=False)["n"] == 4
    cfg_file.write_text("batchsize = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'.*budget"):
        apply_overrides(defaults, [str(cfg_file)], verbose=False)
    with pytest.raises(ConfigError, match="not found"):
        apply_overrides(defaults, [str(tmp_path / "missing.py")], verbose=False)


def test_train_resolves_every_masking_setting_from_masking_config(tmp_path):
    """train.py's masking settings are one group whose defaults live in masking.MaskingConfig alone: the dry
    run prints every MaskingConfig field, at its default unless a config or --masking.key=value set it."""
    import dataclasses
    import masking
    cfg, _ = dry_run("--masking.audio_spans=(2, 3)")
    for f in dataclasses.fields(masking.MaskingConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f.name in cfg["masking"], f"train.py lacks MaskingConfig.{f.name}"
        got = cfg["masking"][f.name]
        want = [2, 3] if f.name == "audio_spans" else default
        assert got == want or (isinstance(want, (list, tuple)) and tuple(got) == tuple(want)), f.name
    assert set(cfg["masking"]) == {f.name for f in dataclasses.fields(masking.MaskingConfig)}


def test_help_lists_every_setting_with_its_default(tmp_path):
    """--help on a script that uses the configurator prints its settings (here train.py's) and exits 0
    without reading any data."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    for line in ("--batch_size=64", "--max_iters=18311", "--warmup_iters=916", "--learning_rate=0.0001"):
        assert line in text


def test_the_last_update_is_evaluated_and_saved(data_root, tmp_path):
    """max_iters not a multiple of eval_interval: the run still ends with an eval of the model after its last
    update, and that model is the checkpoint (before, the last max_iters % eval_interval steps were lost)."""
    import torch
    train(data_root, tmp_path, "--max_iters=7", "--lr_decay_iters=7", "--eval_interval=5", "--eval_iters=2",
          "--warmup_iters=2")
    assert [e["iter"] for e in read_jsonl(tmp_path / "log.jsonl")] == [0, 5, 7]
    assert [r["iter"] for r in read_jsonl(tmp_path / "train_log.jsonl")] == list(range(7))
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["iter_num"] == 7
    # the saved weights are those the last eval scored: resuming at the end re-evaluates to the same loss
    train(data_root, tmp_path, "--max_iters=7", "--lr_decay_iters=7", "--eval_interval=5", "--eval_iters=2",
          "--warmup_iters=2", "--init_from=resume")
    evals = read_jsonl(tmp_path / "log.jsonl")
    assert [e["iter"] for e in evals] == [0, 5, 7, 7]
    assert abs(evals[-1]["val"]["loss"] - evals[-2]["val"]["loss"]) <= 1e-6


def dry_runs(*calls):
    """calls: (args, configs) pairs -> each `train.py configs --dry_run=True args`'s (settings, stdout), run side by side."""
    cmds = [[sys.executable, os.path.join(HERE, "train.py"), *[os.path.join(HERE, c) for c in configs],
             "--dry_run=True", *args] for args, configs in calls]
    out = []
    for proc in run_all(cmds, tempfile.gettempdir()):
        assert proc.returncode == 0, proc.stderr[-3000:]
        out.append((json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout))
    return out


def dry_run(*args, configs=()):
    return dry_runs((args, configs))[0]


def test_dry_run_holds_the_reports_recipe_in_config_audio(tmp_path):
    """python train.py config/audio.py --dry_run=True prints every resolved setting without reading data
    (the dataset 'animals' does not exist here): every number the report fixes, and its head and positions."""
    nowhere = f"--data_root={tmp_path}/nowhere"
    (cfg, out), (plus, _), (toy, _), (depth, _), (normal, _), (audio, _), (mine, _) = dry_runs(
        ([nowhere, f"--out_dir={tmp_path}/out"], ("config/audio.py",)), ([nowhere], ("config/audio_plus.py",)),
        ([], ("config/toyzoo.py",)), (["--pos_emb=sincos_layout", "--mimetic_cross=2.0"], ("config/toyzoo_rgb_depth.py",)),
        (["--cross_local=1.0"], ("config/toyzoo_rgb_normal.py",)), ([], ("config/toyzoo_caption_audio.py",)),
        (["--n_embd=64", "--n_head=2", "--head=modality"], ()))
    assert not os.path.exists(tmp_path / "out")                       # nothing written, no data read
    assert (cfg["n_enc_layer"], cfg["n_dec_layer"], cfg["n_embd"], cfg["n_head"]) == (6, 6, 512, 8)
    assert cfg["batch_size"] * cfg["gradient_accumulation_steps"] == 64
    assert cfg["max_iters"] == cfg["lr_decay_iters"] == 18311 and cfg["warmup_iters"] == 916
    assert cfg["decay_lr"] and cfg["learning_rate"] == 1e-4 and cfg["min_lr"] == 1e-6
    assert (cfg["beta1"], cfg["beta2"], cfg["weight_decay"], cfg["grad_clip"]) == (0.9, 0.95, 0.05, 1.0)
    mask = cfg["masking"]
    assert mask["input_budget"] == mask["target_budget"] == [16, 256]
    assert mask["input_alphas"] == mask["target_alphas"] == [1.0] * 5 and mask["mixture"] is None
    assert cfg["derived"]["audio_span_stride"] == 2 and cfg["derived"]["lr_schedule"].endswith("cosine")
    assert cfg["head"] == "full" and cfg["pos_emb"] == "sincos" and cfg["adapters"] is None   # one shared table
    assert cfg["cond_dropout"] == 0.0 and cfg["dtype"] == "float32"
    assert 94e6 < cfg["derived"]["n_params"] < 98e6 and "95." in out
    changed = {k for k in cfg if k != "derived" and plus[k] != cfg[k]}
    assert changed == {"head", "pos_emb", "cond_dropout", "out_dir", "wandb_run_name"}, changed
    assert plus["derived"]["n_params"] > cfg["derived"]["n_params"]   # the learned positions
    # config/toyzoo.py: code features and feature_only, no data read
    assert toy["adapters"]["feature_only"] == ["tok_rgb"] and toy["adapters"]["code_features"] and toy["n_embd"] == 128
    changed = {k for k in toy if k != "derived" and depth[k] != toy[k]}
    assert changed == {"masking", "init_from", "out_dir", "wandb_run_name", "pos_emb", "mimetic_cross",
                       "cross_local"}, changed
    assert toy["cross_local"] == 1.0 and depth["cross_local"] == 0.0   # the default's stage 2 has local heads
    assert [(c["input_full"], c["target_full"]) for c in depth["masking"]["mixture"]] == [(["rgb"], ["depth"])]
    assert depth["derived"]["n_params"] < toy["derived"]["n_params"]   # fixed grid and frame positions
    assert [(c["input_full"], c["target_full"]) for c in normal["masking"]["mixture"]] == [(["rgb"], ["normal"])]
    assert normal["cross_local"] == 1.0 and normal["derived"]["n_params"] == toy["derived"]["n_params"]   # no weights
    assert [(c["input_full"], c["target_full"]) for c in audio["masking"]["mixture"]] == [(["caption"], ["audio"])] * 2
    assert audio["masking"]["mixture"][1]["input_alphas"] == [0.0, 0.0, 0.0, 1.0, 0.0] and audio["max_iters"] == 1200
    assert mine["n_embd"] == 64 and mine["head"] == "modality" and mine["derived"]["n_params"] < 20e6


def write_grouped(root, n_per=(12, 12, 6, 30), sources=("a", "b")):
    """write_dataset's layout, train rows grouped by class (class 0 first, ...) as ToyZoo's manifest is, with
    a raw manifest that alternates two sources within every class."""
    write_dataset(root, name="grouped", n_train=sum(n_per), n_classes=len(n_per))
    tok = os.path.join(root, "grouped", "tok")
    labels = np.repeat(np.arange(len(n_per)), n_per).astype(np.uint16)
    labels.tofile(os.path.join(tok, "train", "label.bin"))
    with open(os.path.join(tok, "train", "clip_ids.json")) as f:
        ids = json.load(f)
    os.makedirs(os.path.join(root, "grouped", "raw"), exist_ok=True)
    with open(os.path.join(root, "grouped", "raw", "manifest.jsonl"), "w") as f:
        for i, cid in enumerate(ids):
            f.write(json.dumps({"clip_id": cid, "class": f"class{labels[i]}", "source": sources[i % 2],
                                "split": "train", "audio": f"clips/{cid}/audio.wav", "frames": []}) + "\n")
    return labels, ids, [sources[i % 2] for i in range(len(ids))]


def test_stratified_order_prefixes_are_nested_and_proportional():
    strata = [(c, s) for c, n in enumerate((40, 40, 10, 110)) for s in ("a", "b") for _ in range(n // 2)]
    order = rawdata.stratified_order(strata, seed=3)
    assert sorted(order.tolist()) == list(range(len(strata)))
    assert np.array_equal(order, rawdata.stratified_order(strata, seed=3))
    assert not np.array_equal(order, rawdata.stratified_order(strata, seed=4))
    sizes = {s: strata.count(s) for s in set(strata)}
    for k in (10, 25, 50, 100, 150):
        got = {s: 0 for s in sizes}
        for i in order[:k]:
            got[strata[i]] += 1
        for s, n in sizes.items():
            assert abs(got[s] - k * n / len(strata)) <= 1.0, (k, s, got[s], k * n / len(strata))


def test_max_train_clips_takes_a_stratified_nested_subset(tmp_path):
    """--max_train_clips=K on a train split grouped by class: the K clips span every class and source in
    proportion (the first K rows would be classes 0 and 1 only), the clips of K lie inside those of 2K, and
    the same seed picks the same clips."""
    labels, ids, sources = write_grouped(str(tmp_path / "data"))
    cls = dict(zip(ids, labels.tolist()))
    src = dict(zip(ids, sources))
    picked = {}
    for k, seed in ((15, 7), (30, 7), (15, 8)):
        out = tmp_path / f"k{k}s{seed}"
        train(str(tmp_path / "data"), out, "--dataset=grouped", f"--max_train_clips={k}", f"--seed={seed}",
              "--max_iters=1", "--eval_interval=1", "--eval_iters=1")
        with open(out / "train_clips.json") as f:
            picked[k, seed] = json.load(f)
        assert len(set(picked[k, seed])) == k
    k15 = picked[15, 7]
    per_class = np.bincount([cls[c] for c in k15], minlength=4)
    assert np.all(np.abs(per_class - 15 * np.array([12, 12, 6, 30]) / 60) <= 1), per_class
    assert abs(sum(src[c] == "a" for c in k15) - 7.5) <= 1
    assert set(k15) <= set(picked[30, 7])                               # nested
    assert picked[15, 8] != k15                                         # the seed decides
    train(str(tmp_path / "data"), tmp_path / "again", "--dataset=grouped", "--max_train_clips=15", "--seed=7",
          "--max_iters=1", "--eval_interval=1", "--eval_iters=1")
    assert json.load(open(tmp_path / "again" / "train_clips.json")) == k15
    proc = train(str(tmp_path / "data"), tmp_path / "toomany", "--dataset=grouped", "--max_train_clips=61",
                 "--max_iters=1", check=False)                          # more than the 60 train clips: refused
    assert proc.returncode != 0 and "max_train_clips=61" in proc.stderr and "only 60 train clips" in proc.stderr


@pytest.mark.parametrize("setting", ["cond_dropout", "audio_levels"])
def test_batch_transforms_reach_the_train_batches_only(data_root, tmp_path, setting):
    """--cond_dropout and --audio_levels change what the training steps see (the same seed, another first-step
    loss) but not the eval batches (the same eval loss before any update); a rate of 1 or more is refused."""
    runs = {}
    # audio_levels splits only samples whose targets are all audio: make every sample one
    extra = ("--masking.target_alphas=(0.0,0.0,0.0,1.0,0.0)",) if setting == "audio_levels" else ()
    for rate in (0.0, 0.9):
        train(data_root, tmp_path / str(rate), "--max_iters=1", "--eval_interval=1", "--eval_iters=2",
              f"--{setting}={rate}", *extra)
        runs[rate] = (read_jsonl(tmp_path / str(rate) / "train_log.jsonl")[0]["loss"],
                      read_jsonl(tmp_path / str(rate) / "log.jsonl")[0]["val"]["loss"])
    assert runs[0.0][1] == runs[0.9][1]
    assert abs(runs[0.0][0] - runs[0.9][0]) > 1e-4
    proc = train(data_root, tmp_path / "bad", "--max_iters=1", f"--{setting}=1.0", check=False)
    assert proc.returncode != 0 and setting in proc.stderr
