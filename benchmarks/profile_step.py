"""Profile training steps of the notebooks' MAE on the CPU and print where the time goes.

The model is the MAE of benchmarks/throughput.py without a cls token (the
notebooks' setting), trained on random images at batch 256. For each precision
the script runs a few untimed steps, profiles ten more with torch.profiler, and
prints the operators with the most self CPU time:

    python benchmarks/profile_step.py                 # float32 and bfloat16 autocast
    python benchmarks/profile_step.py --rows 25       # a longer table
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from classes import MAE  # noqa: E402
from throughput import MAE_CONFIG  # noqa: E402  (the configuration that the benchmark times)
from training import autocast  # noqa: E402


def profile_steps(dtype, batch_size, steps, rows):
    """Profile `steps` training steps at autocast `dtype` (None for float32) and print the top operators."""
    torch.manual_seed(0)
    model = MAE(**MAE_CONFIG, use_cls_token=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch_size, 1, 28, 28)
    device = torch.device("cpu")

    def step():
        with autocast(device, dtype):
            loss = model(images).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    print(f"\n== {dtype or torch.float32}: {steps} steps at batch {batch_size}, "
          f"{total / 1e6 / steps * 1e3:.0f} ms of self CPU time per step ==")
    print(f"  {'operator':<40} {'share':>7} {'ms/step':>8} {'calls/step':>10}")
    for event in sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:rows]:
        print(f"  {event.key:<40} {event.self_cpu_time_total / total:>7.1%} "
              f"{event.self_cpu_time_total / 1e3 / steps:>8.1f} {event.count / steps:>10.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="images per training step (default 256)")
    parser.add_argument("--steps", type=int, default=10, help="profiled training steps per precision (default 10)")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per precision (default 15)")
    args = parser.parse_args()
    for name in ("batch_size", "steps", "rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    print(f"PyTorch {torch.__version__}, torch.get_num_threads(): {torch.get_num_threads()}")
    for dtype in (None, torch.bfloat16):
        profile_steps(dtype, args.batch_size, args.steps, args.rows)


if __name__ == "__main__":
    main()
