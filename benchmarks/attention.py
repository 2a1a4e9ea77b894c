"""Attention layer forward+backward against bare scaled_dot_product_attention.

For causal self-attention at sequence lengths 128 … 2048 it times, in alternation:
  - lmforge SelfAttention, fast path (SDPA behind the layer's mask handling);
  - a bare reference: the same four nn.Linear projections around one F.scaled_dot_product_attention
    call, with nothing else (what the layer costs at minimum);
  - the SDPA kernel alone on ready-made q/k/v (how much of the time is attention proper);
  - lmforge SelfAttention, explicit path (materializes the T×T weights).
and measures peak extra memory of one forward+backward of each lmforge path in a fresh process.
Target: fast path within 10% of the bare reference at T = 1024, memory linear in T.

    python benchmarks/attention.py                 # full sweep, appends to RESULTS.md
    python benchmarks/attention.py --seq 256 512   # a quick look
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results, interleaved  # noqa: E402

from lmforge import SelfAttention  # noqa: E402


class BareAttention(nn.Module):
    """The minimum: project, SDPA, project back. No masks, no cache, no checks."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, E // H).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, E // H).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, E // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, E))


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    module(x).sum().backward()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def high_water_mb() -> float:
    """Peak resident memory of this process image (VmHWM: unlike ru_maxrss, not inherited
    from the parent across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_peak_memory(path: str, seq: int, batch: int, embed: int, heads: int) -> None:
    """Run in a fresh process: print the peak memory (MB) one forward+backward adds."""
    torch.manual_seed(0)
    layer = SelfAttention(embed, heads, causal=True)
    layer.use_sdpa = path == "fast"
    x = torch.randn(batch, seq, embed, requires_grad=True)
    try:  # reset the high-water mark to the current resident size (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = rss_mb()
    fwd_bwd(layer, x)
    peak = high_water_mb()
    print(f"{max(peak - base, 0.0):.1f}")


def peak_memory(path: str, seq: int, args: argparse.Namespace) -> float:
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            path,
            str(seq),
            str(args.batch),
            str(args.embed),
            str(args.heads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, *numbers = args.child
        child_peak_memory(path, *map(int, numbers))
        return

    rows = []
    for seq in args.seq:
        torch.manual_seed(0)
        ours = SelfAttention(args.embed, args.heads, causal=True)
        explicit = SelfAttention(args.embed, args.heads, causal=True)
        explicit.use_sdpa = False
        bare = BareAttention(args.embed, args.heads)
        x = torch.randn(args.batch, seq, args.embed, requires_grad=True)
        D = args.embed // args.heads
        q, k, v = (torch.randn(args.batch, args.heads, seq, D, requires_grad=True) for _ in range(3))

        def kernel_only(q=q, k=k, v=v) -> None:  # noqa: ANN001
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

        fns = {
            "fast": lambda: fwd_bwd(ours, x),  # noqa: B023
            "bare": lambda: fwd_bwd(bare, x),  # noqa: B023
            "kernel": kernel_only,
        }
        if seq <= 2048:
            fns["explicit"] = lambda: fwd_bwd(explicit, x)  # noqa: B023
        rounds = args.rounds if seq <= 1024 else max(3, args.rounds // 2)
        times = interleaved(fns, rounds=rounds, warmup=2)
        mem_fast = peak_memory("fast", seq, args)
        mem_explicit = peak_memory("explicit", seq, args)
        rows.append((seq, times, mem_fast, mem_explicit))
        print(
            f"T={seq:5d} fast {times['fast'] * 1e3:8.1f} ms  bare {times['bare'] * 1e3:8.1f} ms  "
            f"ratio {times['fast'] / times['bare']:.3f}  kernel {times['kernel'] * 1e3:8.1f} ms  "
            f"explicit {times.get('explicit', float('nan')) * 1e3:8.1f} ms  "
            f"mem fast {mem_fast:7.1f} MB explicit {mem_explicit:7.1f} MB",
            flush=True,
        )

    header = (
        "| T | fast path ms | bare Linear+SDPA ms | **fast / bare** | SDPA kernel alone ms | explicit path ms | "
        "peak MB fast | peak MB explicit |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {seq} | {t['fast'] * 1e3:.1f} | {t['bare'] * 1e3:.1f} | **{t['fast'] / t['bare']:.3f}** | "
        f"{t['kernel'] * 1e3:.1f} | {t['explicit'] * 1e3:.1f} | {mf:.0f} | {me:.0f} |"
        for seq, t, mf, me in rows
    ]
    growth = ""
    if len(rows) >= 2:
        (s0, _, f0, e0), (s1, _, f1, e1) = rows[-2], rows[-1]
        growth = (
            f"\nPeak memory from T={s0} to T={s1} ({s1 / s0:.0f}× longer): fast path ×{f1 / max(f0, 1e-9):.2f}, "
            f"explicit path ×{e1 / max(e0, 1e-9):.2f}.\n"
        )
    body = (
        f"Causal self-attention, batch {args.batch}, width {args.embed}, {args.heads} heads, fp32, forward+backward; "
        "times are medians of interleaved rounds; peak MB is the extra resident memory of one forward+backward "
        "in a fresh process.\n\n" + header + "\n".join(lines) + "\n" + growth
    )
    if args.no_record:
        print(body)
    else:
        append_results("Attention layer vs bare SDPA (benchmarks/attention.py)", body)


if __name__ == "__main__":
    main()
