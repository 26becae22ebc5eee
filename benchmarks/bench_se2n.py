"""Cost of one training step of the 2D zoo models at matched parameters, se2n-interp beside the others.

    python benchmarks/bench_se2n.py [--target-params 100000] [--size 28] [--batch 64] [--repeats 9] [--clock cpu]

One AdamW step (forward, cross-entropy, backward, update) of each model, classifier (1 channel, 3 classes,
``size x size`` images) and U-Net (``--seg-size``), widths solved for ``--target-params``; contenders are timed
round-robin (``bench_nn._time_interleaved``) so that the machine's load hits all alike; medians and paired
ratios to ``moment-trivial-irrep``. Also the share of a se2n-interp step spent assembling its interpolated
kernels (``InterpGroupConv.kernel``, forward only).
"""

from __future__ import annotations

import argparse
import time

import bench_nn
import torch
import torch.nn.functional as F

from abc_pipeline.nn import build_model
from abc_pipeline.nn.se2n import InterpGroupConv

MODELS = ("cnn", "gcnn-regular", "moment-trivial-irrep", "se2n-interp")


def bench(task: str, size: int, batch: int, target: int, repeats: int) -> dict:
    torch.manual_seed(0)
    models = {n: build_model(n, 2, 1, 3, task, target_params=target) for n in MODELS}
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 3, (batch,) if task == "classify" else (batch, size, size))
    steps = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        steps[name] = step
    t = bench_nn._summary(bench_nn._time_interleaved(steps, repeats, warmup=1), "moment-trivial-irrep")
    se2n = models["se2n-interp"]
    convs = [m for m in se2n.modules() if isinstance(m, InterpGroupConv)]
    start = bench_nn.CLOCK()
    for _ in range(repeats):
        for c in convs:
            c.kernel()
    kernel_s = (bench_nn.CLOCK() - start) / repeats
    return {
        "models": {n: {"width": m.width, "params": m.n_params, **t[n]} for n, m in models.items()},
        "se2n_kernel_share": kernel_s / t["se2n-interp"]["median_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-params", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--seg-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seg-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=sorted(bench_nn.CLOCKS), default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bench_nn.CLOCK = bench_nn.CLOCKS[a.clock]
    started = time.time()
    for task, size, batch in (("classify", a.size, a.batch), ("segment", a.seg_size, a.seg_batch)):
        res = bench(task, size, batch, a.target_params, a.repeats)
        print(f"\n{task}, batch {batch}, {size}x{size}, target {a.target_params:,} parameters, {a.clock} clock:\n")
        print("| model | width | parameters | median s / step | ratio to moment-trivial-irrep (paired) |")
        print("|---|---:|---:|---:|---:|")
        for name, r in res["models"].items():
            print(f"| {name} | {r['width']} | {r['params']:,} | {r['median_s']:.3f} | {r['ratio_paired']:.2f} |")
        print(f"\nse2n-interp kernel assembly: {res['se2n_kernel_share']:.1%} of its step")
    print(f"\n({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
