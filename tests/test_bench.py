"""bench.py runs on a CPU at its small shape: one table row per setting, the profile when asked, and a clear
refusal of an unknown attention backend."""
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args):
    with tempfile.TemporaryDirectory() as cwd:   # never in the checkout, beside the user's data/ and out/
        return subprocess.run([sys.executable, str(ROOT / "bench.py"), "--small", *args], cwd=cwd,
                              capture_output=True, text=True)


def test_bench_small_prints_a_row_per_setting_and_the_profile():
    r = bench("--dtypes=float32,bfloat16", "--sdpa_backend=math", "--profile=True", "--code_features=True")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith(("float32 ", "bfloat16 "))]
    assert len(rows) == 2
    for row in rows:
        s_per_step = float(row.split("|")[2])
        assert s_per_step > 0
    assert r.stdout.count("profile of 5 steps") == 2
    assert "aten::mm" in r.stdout


def test_bench_refuses_an_unknown_attention_backend():
    r = bench("--sdpa_backend=fast")
    assert r.returncode != 0
    assert "--sdpa_backend='fast'" in r.stderr and "cudnn" in r.stderr


def test_bench_recipe_times_every_layout_on_the_same_batches_and_prints_the_speed_up():
    r = bench("--budgets=recipe", "--dtypes=float32", "--repeats=2", "--steps=2", "--layouts=padded,trimmed,packed",
              "--heads=per_modality,static")
    assert r.returncode == 0, r.stderr
    assert "budgets recipe (input (4, 32), target (4, 32))" in r.stdout
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("float32 ")]
    assert [(c[2].strip(), c[3].strip()) for c in rows] == [
        (layout, head) for head in ("per_modality", "static") for layout in ("padded", "trimmed", "packed")]
    for c in rows:
        assert float(c[4]) > 0 and float(c[7].replace(",", "")) > 0      # s/step, real tokens/s
    assert r.stdout.count("round 2/2: padded") == 2
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("packed/padded speed-up: ") and float(last.split()[2].rstrip("x")) > 0


def test_bench_refuses_an_unknown_layout_or_budget():
    r = bench("--budgets=recipe", "--layouts=padded,bucketed")
    assert r.returncode != 0 and "--layouts=" in r.stderr and "packed" in r.stderr
    r = bench("--budgets=half")
    assert r.returncode != 0 and "--budgets='half'" in r.stderr
