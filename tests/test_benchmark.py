"""Smoke test of benchmarks/throughput.py: a --tiny run must finish and print every section.

It checks that the figures are printed, never their values, so it passes on any machine.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "throughput.py"
TIMEOUT_SECONDS = 600  # generous: a --tiny run took about 20 s on a busy 2-core CPU

NUMBER = r"[0-9]+(?:\.[0-9]+)?"

# (what the line reports, a pattern that matches it)
EXPECTED_LINES = [
    ("header with the PyTorch version", r"PyTorch \d+\.\d+"),
    ("header with the thread count", r"torch\.get_num_threads\(\): \d+"),
    ("epoch seconds", rf"epoch time: {NUMBER} s per epoch of 60,000 images"),
    ("compile choice of the notebooks", r"torch\.compile: (yes|no) \(training\.resolve_compile"),
    ("peak memory", rf"peak memory: {NUMBER} MiB peak resident set size"),
    ("float32 matmul rate", rf"float32 matmul: +{NUMBER} GFLOP/s"),
    ("bfloat16 matmul rate", rf"bfloat16 matmul: +{NUMBER} GFLOP/s"),
    ("adaptation of vit-pytorch", r"adapted vit-pytorch's MAE: .*pos_embedding"),
    ("token counts", r"use_cls_token=True \(default\) matches the reference's token count in"),
    ("reference MFLOP per image", rf"reference: +{NUMBER} MFLOP per image"),
    ("our MFLOP per image", rf"ours \(cls token\): +{NUMBER} MFLOP per image"),
    ("table header", r"images/s .*/ref f32 .*/ref same .*MFLOP/img .*GFLOP/s .*MFU"),
    ("reference images/s and MFU", rf"reference, float32 eager +{NUMBER} .* {NUMBER}%$"),
    ("our images/s, ratio and MFU", rf"ours \(cls token\), float32 eager +{NUMBER} .* {NUMBER} .* {NUMBER}%$"),
    ("ours without cls token", rf"ours \(no cls token\), float32 eager +{NUMBER}"),
    ("bfloat16 autocast", rf"ours \(cls token\), bfloat16 eager +{NUMBER}"),
    ("torch.compile", rf"ours \(cls token\), compile +{NUMBER}"),
    ("torch.compile with bfloat16", rf"ours \(cls token\), compile-bfloat16 +{NUMBER}"),
    ("compile time", rf"compile time, ours \(cls token\), compile: about -?{NUMBER} s"),
    ("loss tolerance", r"tolerance: \d+\.\d% largest relative difference"),
    ("loss-curve verdict", r"loss curves agree within"),
]


@pytest.fixture(scope="module")
def tiny_run():
    """Run the benchmark once with --tiny and return the finished process."""
    if importlib.util.find_spec("vit_pytorch") is None:
        pytest.fail(
            "vit-pytorch, the benchmark's reference MAE, is not installed; run "
            "pip install -r benchmarks/requirements.txt",
            pytrace=False,
        )
    return subprocess.run(
        # one thread, because two OpenMP threads stall badly when another process keeps a core busy
        [sys.executable, str(SCRIPT), "--tiny", "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )


def test_tiny_run_exits_zero(tiny_run):
    assert tiny_run.returncode == 0, f"stdout:\n{tiny_run.stdout}\nstderr:\n{tiny_run.stderr}"


@pytest.mark.parametrize("pattern", [pattern for _, pattern in EXPECTED_LINES],
                         ids=[name for name, _ in EXPECTED_LINES])
def test_tiny_run_prints_line(tiny_run, pattern):
    assert re.search(pattern, tiny_run.stdout, re.MULTILINE), (
        f"no output line matches {pattern!r}; stdout:\n{tiny_run.stdout}"
    )


def test_profile_script_lists_operators():
    script = ROOT / "benchmarks" / "profile_step.py"
    result = subprocess.run(
        [sys.executable, str(script), "--batch-size", "8", "--steps", "1", "--rows", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert re.search(r"== torch\.float32: 1 steps at batch 8", result.stdout), result.stdout
    assert re.search(r"== torch\.bfloat16: 1 steps at batch 8", result.stdout), result.stdout
    operator_rows = re.findall(rf"^  aten::\S+ +{NUMBER}%", result.stdout, re.MULTILINE)
    assert len(operator_rows) >= 2, result.stdout


def run_benchmark_script(name, *arguments):
    """Run benchmarks/<name> with `arguments` from the repository root and return the finished process."""
    script = ROOT / "benchmarks" / name
    return subprocess.run([sys.executable, str(script), *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_SECONDS)


def test_profile_script_rejects_zero_steps():
    result = run_benchmark_script("profile_step.py", "--steps", "0")
    assert result.returncode == 2
    assert "--steps must be at least 1; got 0" in result.stderr


def test_compile_script_times_both_runs(data_dir):
    if not (data_dir / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST is not in {data_dir}; set MIM_DATA_DIR to the folder that contains MNIST/raw",
                    pytrace=False)
    script = ROOT / "benchmarks" / "compile_epochs.py"
    result = subprocess.run(
        [sys.executable, str(script), "--epochs", "1", "--train-size", "256", "--test-size", "128"],
        cwd=ROOT,
        env={**os.environ, "MIM_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert re.search(rf"^eager +{NUMBER} s in training\.train", result.stdout, re.MULTILINE), result.stdout
    assert re.search(rf"^compile +{NUMBER} s in training\.train", result.stdout, re.MULTILINE), result.stdout


def test_compile_script_rejects_unknown_model():
    result = run_benchmark_script("compile_epochs.py", "--model", "resnet")
    assert result.returncode == 2
    assert "invalid choice: 'resnet'" in result.stderr
