"""Benchmarks of the network library (docs/benchmarks.md, "Network library").

    python benchmarks/bench_nn.py [--threads 2] [--clock wall|cpu] [--repeats 15] [--size 32] [--batch 4]
                                  [--escnn-python /tmp/escnn-venv/bin/python] [--out results.json]

1. layer: MomentConv 3D [8 s + 8 v] -> [16 s + 16 v], k=3, forward+backward, against nn.Conv3d with the
   same dense channels (32 -> 64), and escnn's R3Conv with the same field types (O(3): trivial +
   standard representation) when escnn is importable by ``--escnn-python`` (its own environment; escnn
   is never a dependency of the project). Timings interleave the contenders and report medians.
2. memory: peak RSS growth of one forward+backward, each contender in a fresh subprocess.
3. step: one training step (forward, cross-entropy, backward, AdamW) of ~1.5 M-parameter 3D
   segmentation U-Nets: moment-trivial-irrep vs the parameter-matched cnn and vs a cnn with the
   moment net's dense channel counts.
4. params: the zoo's parameter-matched widths (2D MedMNIST-like classification; 3D classification and
   segmentation).
5. equivariance: max relative error of every zoo model over its whole group (float64 and float32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from abc_pipeline.nn import MomentConv, build_model, fields, format_model_table, model_table  # noqa: E402

FIN, FOUT = [8, 8], [16, 16]


def _fwd_bwd(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()

    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def _time_interleaved(steps: dict, repeats: int, warmup: int = 2) -> dict:
    """Seconds (``CLOCK``) of every call of each step, measured round-robin so that load changes hit all
    contenders alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, step in steps.items():
            t = CLOCK()
            step()
            times[k].append(CLOCK() - t)
    return times


def _summary(times: dict, ref: str) -> dict:
    """Median seconds per contender, and ratios to ``ref``: of medians, of minima (least disturbed runs),
    and the median of the per-round ratios (neighbouring calls share the machine's load)."""
    out = {}
    for k, v in times.items():
        paired = [a / b for a, b in zip(v, times[ref])]
        out[k] = {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "ratio": statistics.median(v) / statistics.median(times[ref]),
            "ratio_min": min(v) / min(times[ref]),
            "ratio_paired": statistics.median(paired),
        }
    return out


def bench_layer(args) -> dict:
    torch.manual_seed(0)
    x = torch.randn(args.batch, 32, *(args.size,) * 3, requires_grad=True)
    moment = MomentConv(FIN, FOUT, 3)
    conv = torch.nn.Conv3d(32, 64, 3, padding=1)
    t = _summary(
        _time_interleaved({"moment": _fwd_bwd(moment, x), "conv3d": _fwd_bwd(conv, x)}, args.repeats), "conv3d"
    )
    with torch.no_grad():  # kernel assembly alone
        t_kernel = statistics.median(_time_interleaved({"kernel": moment.kernel}, 50)["kernel"])
    out = {
        **t,
        "kernel_assembly_s": t_kernel,
        "moment_params": sum(p.numel() for p in moment.parameters()),
        "conv3d_params": sum(p.numel() for p in conv.parameters()),
    }
    out["escnn"] = {}
    for size in args.escnn_sizes:
        e = out["escnn"][str(size)] = bench_escnn(args, size)
        if "r3conv" in e:
            e["r3conv_over_moment"] = statistics.median(
                a / b for a, b in zip(e["times"]["r3conv"], e["times"]["moment"])
            )
    return out


ESCNN_SCRIPT = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1])); repeats, size, batch = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
clock = time.process_time if sys.argv[6] == "cpu" else time.perf_counter
sys.path.insert(0, sys.argv[5])
from abc_pipeline.nn import MomentConv
import escnn
from escnn import gspaces, nn as enn
from escnn.nn import init
t0 = time.perf_counter()
gs = gspaces.flipRot3dOnR3()
vec = gs.fibergroup.standard_representation()
t_in = enn.FieldType(gs, 8 * [gs.trivial_repr] + 8 * [vec])
t_out = enn.FieldType(gs, 16 * [gs.trivial_repr] + 16 * [vec])
r3 = enn.R3Conv(t_in, t_out, kernel_size=3, padding=1, initialize=False)
init.generalized_he_init(r3.weights.data, r3.basisexpansion, cache=True)
build = time.perf_counter() - t0
conv = torch.nn.Conv3d(32, 64, 3, padding=1)
torch.manual_seed(0)
x = torch.randn(batch, 32, size, size, size, requires_grad=True)
gx = t_in(x)
def s_r3():
    r3.zero_grad(set_to_none=True); r3(gx).tensor.square().mean().backward()
def s_conv():
    conv.zero_grad(set_to_none=True); conv(x).square().mean().backward()
moment = MomentConv([8, 8], [16, 16], 3)
def s_moment():
    moment.zero_grad(set_to_none=True); moment(x).square().mean().backward()
steps = {"r3conv": s_r3, "moment": s_moment, "conv3d": s_conv}
for s in steps.values():
    s(); s()
times = {k: [] for k in steps}
for _ in range(repeats):
    for k, s in steps.items():
        t = clock(); s(); times[k].append(clock() - t)
print(json.dumps({"escnn_version": escnn.__version__, "build_s": build, "times": times,
                  "r3conv_params": sum(p.numel() for p in r3.parameters())}))
"""


def bench_escnn(args, size: int) -> dict:
    """Time escnn's R3Conv in its own interpreter (``--escnn-python``), interleaved with MomentConv and
    Conv3d in that same process; a reason when it cannot run."""
    py = args.escnn_python
    if not py or not Path(py).exists():
        return {"unavailable": f"no escnn interpreter at {py!r} (see docs/benchmarks.md for the install)"}
    try:
        res = subprocess.run(
            [
                py,
                "-c",
                ESCNN_SCRIPT,
                str(args.threads),
                str(args.repeats),
                str(size),
                str(args.batch),
                str(ROOT),
                args.clock,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except subprocess.TimeoutExpired:
        return {"unavailable": "escnn benchmark timed out (30 min)"}
    if res.returncode != 0:
        return {"unavailable": "escnn failed: " + res.stderr.strip().splitlines()[-1]}
    res = json.loads(res.stdout.strip().splitlines()[-1])
    return {**_summary(res["times"], "conv3d"), **res}


MEM_CHILD = """
import resource, sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from abc_pipeline.nn import MomentConv
kind = {kind!r}
m = MomentConv([8, 8], [16, 16], 3) if kind == "moment" else torch.nn.Conv3d(32, 64, 3, padding=1)
x = torch.randn({batch}, 32, {size}, {size}, {size}, requires_grad=True)
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20  # current RSS
m(x).square().mean().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before)  # peak RSS growth, MiB
"""


def bench_memory(args) -> dict:
    """Peak-RSS growth (MiB) over the RSS before one forward+backward (inputs and module allocated),
    each contender in a fresh interpreter (median of 3)."""
    out = {}
    for kind in ("moment", "conv3d"):
        runs = []
        for _ in range(3):
            code = MEM_CHILD.format(root=str(ROOT), threads=args.threads, kind=kind, batch=args.batch, size=args.size)
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs.append(float(res.stdout.strip()))
        out[f"{kind}_peak_mib"] = statistics.median(runs)
    out["ratio_moment_vs_conv3d"] = out["moment_peak_mib"] / out["conv3d_peak_mib"]
    return out


def bench_step(args) -> dict:
    """One AdamW training step of ~1.5 M-parameter 3D segmentation U-Nets (in_channels 8, 10 classes)."""
    torch.manual_seed(0)
    size, batch, c_in, k = args.step_size, args.step_batch, 8, 10
    moment = build_model("moment-trivial-irrep", 3, c_in, k, "segment", target_params=1_500_000)
    s, v = -(-moment.width // 2), moment.width // 2
    models = {
        "moment-trivial-irrep": moment,
        "cnn (parameter-matched)": build_model("cnn", 3, c_in, k, "segment", target_params=1_500_000),
        "cnn (same dense channels)": build_model("cnn", 3, c_in, k, "segment", width=s + 3 * v),
    }
    x = torch.randn(batch, c_in, *(size,) * 3)
    y = torch.randint(0, k, (batch, *(size,) * 3))
    steps = {}
    for name, m in models.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        steps[name] = step
    t = _summary(_time_interleaved(steps, max(3, args.repeats // 3), warmup=1), "moment-trivial-irrep")
    return {name: {"width": m.width, "params": m.n_params, **t[name]} for name, m in models.items()}


def bench_params() -> dict:
    return {
        "2d_classify_3ch_8cls": model_table(2, 3, 8, "classify", target_params=1_500_000),
        "3d_classify_1ch_11cls": model_table(3, 1, 11, "classify", target_params=1_500_000),
        "3d_segment_8ch_10cls": model_table(3, 8, 10, "segment", target_params=1_500_000),
    }


def bench_equivariance() -> list[dict]:
    """Max relative error over the whole group, random weights, eval mode, odd + even sizes."""
    rows = []
    for name in ("cnn", "moment-trivial", "moment-trivial-irrep", "gcnn-regular", "cfnet"):
        for dim, task in ((2, "classify"), (2, "segment"), (3, "classify"), (3, "segment")):
            if name == "cfnet" and (dim, task) != (2, "classify"):
                continue
            group = [fields.rot90(2, (0, 1), r) for r in range(4)] if name == "cfnet" else fields.grid_group(dim)
            torch.manual_seed(0)
            model = build_model(name, dim, 2, 3, task, width=1 if name == "gcnn-regular" and dim == 3 else 4)
            row = {"model": name, "dim": dim, "task": task, "group": len(group)}
            for dtype in (torch.float64, torch.float32):
                model.to(dtype).train()
                with torch.no_grad():
                    model(torch.randn(4, 2, *(8,) * dim, dtype=dtype))  # batch-norm statistics
                model.eval()
                err = 0.0
                for n in (15, 16) if dim == 2 else (7, 8):
                    x = torch.randn(1, 2, *(n,) * dim, dtype=dtype)
                    err = max(err, fields.equivariance_error(model, x, group, invariant=task == "classify"))
                row[str(dtype).split(".")[1]] = err
            rows.append(row)
    return rows


def _report(res: dict) -> str:
    L = res["layer"]
    row = "| {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:,} |"
    lines = [
        f"threads={res['threads']}, clock={res['clock']}, torch {res['torch']}, {res['cpu']}",
        "",
        f"| layer, fwd+bwd, batch {res['batch']}, {res['size']}^3, float32 | median s | ratio of medians | "
        "ratio of minima | median paired ratio | parameters |",
        "|---|---:|---:|---:|---:|---:|",
        row.format("nn.Conv3d 32 -> 64", L["conv3d"]["median_s"], 1, 1, 1, L["conv3d_params"]),
        row.format(
            "MomentConv [8s+8v] -> [16s+16v]",
            L["moment"]["median_s"],
            L["moment"]["ratio"],
            L["moment"]["ratio_min"],
            L["moment"]["ratio_paired"],
            L["moment_params"],
        ),
    ]
    for size, e in L["escnn"].items():
        if "r3conv" not in e:
            lines += ["", f"escnn at {size}^3: {e['unavailable']}"]
            continue
        lines += [
            "",
            f"escnn {e['escnn_version']} process (its own numpy<2 venv), the three layers interleaved, "
            f"batch {res['batch']}, {size}^3:",
            "",
            "| layer | median s | ratio of medians | ratio of minima | median paired ratio | parameters |",
            "|---|---:|---:|---:|---:|---:|",
            row.format("nn.Conv3d 32 -> 64", e["conv3d"]["median_s"], 1, 1, 1, L["conv3d_params"]),
            row.format(
                "MomentConv [8s+8v] -> [16s+16v]",
                e["moment"]["median_s"],
                e["moment"]["ratio"],
                e["moment"]["ratio_min"],
                e["moment"]["ratio_paired"],
                L["moment_params"],
            ),
            row.format(
                "escnn R3Conv, same field types (O(3))",
                e["r3conv"]["median_s"],
                e["r3conv"]["ratio"],
                e["r3conv"]["ratio_min"],
                e["r3conv"]["ratio_paired"],
                e["r3conv_params"],
            ),
            "",
            f"R3Conv / MomentConv (median paired ratio): {e['r3conv_over_moment']:.2f}; R3Conv build + "
            f"init {e['build_s']:.1f} s.",
        ]
    lines += ["", f"MomentConv kernel assembly (forward, no grad): {L['kernel_assembly_s'] * 1e3:.2f} ms."]
    M = res["memory"]
    lines += [
        "",
        f"Peak RSS growth of one fwd+bwd: MomentConv {M['moment_peak_mib']:.0f} MiB, Conv3d "
        f"{M['conv3d_peak_mib']:.0f} MiB (ratio {M['ratio_moment_vs_conv3d']:.3f})",
        "",
        f"| training step, 3D segmentation, batch {res['step_batch']}, {res['step_size']}^3, 8 ch, 10 classes "
        "| width | parameters | median s | ratio of medians | median paired ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["step"].items():
        lines.append(
            f"| {name} | {r['width']} | {r['params']:,} | {r['median_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['ratio_paired']:.2f} |"
        )
    for key, rows in res["params"].items():
        lines += ["", f"Parameter matching ({key}, target 1.5 M):", "", format_model_table(rows)]
    lines += ["", "| model | dim | task | group | max rel. error float64 | float32 |", "|---|---:|---|---:|---:|---:|"]
    for r in res["equivariance"]:
        lines.append(
            f"| {r['model']} | {r['dim']} | {r['task']} | {r['group']} | {r['float64']:.1e} | {r['float32']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every contender")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine)",
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--step-size", type=int, default=32)
    p.add_argument("--step-batch", type=int, default=2)
    p.add_argument("--escnn-python", default="/tmp/escnn-venv/bin/python")
    p.add_argument("--escnn-sizes", type=int, nargs="*", default=[32, 16], help="grid sizes for the escnn comparison")
    p.add_argument("--only", nargs="+", default=["layer", "memory", "step", "params", "equivariance"])
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args()
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    res = {
        "threads": args.threads,
        "clock": args.clock,
        "torch": torch.__version__,
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "batch": args.batch,
        "size": args.size,
        "step_batch": args.step_batch,
        "step_size": args.step_size,
    }
    benches = {
        "layer": lambda: bench_layer(args),
        "memory": lambda: bench_memory(args),
        "step": lambda: bench_step(args),
        "params": bench_params,
        "equivariance": bench_equivariance,
    }
    for name in args.only:
        t = time.perf_counter()
        res[name] = benches[name]()
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    if set(benches) <= set(args.only):
        print(_report(res))
    else:
        print(json.dumps({k: res[k] for k in args.only}, indent=1))


if __name__ == "__main__":
    main()
