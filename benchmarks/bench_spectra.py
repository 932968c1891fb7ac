"""ΔW spectra from the factors against a dense SVD, measured side by side in one process.

    python benchmarks/bench_spectra.py            # LLaMA-7B-shaped: 32 layers × q, k, v, d = 4096
    python benchmarks/bench_spectra.py --smoke    # tiny sizes, seconds (run by `make test`)

Prints a markdown table: the time of `delta_spectra` on one 4096 × 4096 site against
`numpy.linalg.svd` of that site's dense ΔW (alternating the two, median of repeats), and the time of
`delta_spectra` over all 96 sites. Only adapter tensors exist: no 7B model is built.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from lily_lab.analysis.spectra import delta_spectra, dense_delta
from lily_lab.core import Site


def llama_like_sites(layers: int, d: int, r: int, E: int, stride: int = 1, seed: int = 0) -> list[Site]:
    """Random Lily tensors shaped like an adapter on every q, k, v projection."""
    g = torch.Generator().manual_seed(seed)
    sites = []
    for target in ("q_proj", "k_proj", "v_proj"):
        B = torch.randn(E, r, d, generator=g) / d**0.5
        As = [torch.randn(r, d, generator=g) / d**0.5 for _ in range(-(-layers // stride))]
        for i in range(layers):
            R = torch.randn(E, r, generator=g)
            name = f"model.layers.{i}.self_attn.{target}"
            sites.append(Site(name, target, f"{target}:{d}x{d}", i, i // stride, As[i // stride], B, R, 1.0,
                              "lily", None, ()))
    return sites


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for make test")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    layers, d, r, E = (4, 256, 8, 4) if args.smoke else (32, 4096, 16, 4)
    sites = llama_like_sites(layers, d, r, E)
    one = [sites[0]]
    dense = dense_delta(sites[0]).numpy()  # formed once, outside the timing

    # Alternate the two sides so drifting machine load hits both alike.
    ours, ref = [], []
    for _ in range(args.repeats):
        ours += timed(lambda: delta_spectra(one), 1)
        ref += timed(lambda: np.linalg.svd(dense, compute_uv=False), 1)
    check = np.linalg.svd(dense, compute_uv=False)[:r]
    got = delta_spectra(one).sigma.to_numpy()
    assert np.allclose(got, check, rtol=1e-5), "spectra disagree with the dense SVD"
    all_sites = timed(lambda: delta_spectra(sites), args.repeats)

    m_ours, m_ref, m_all = statistics.median(ours), statistics.median(ref), statistics.median(all_sites)
    print(f"| what | lily_lab | reference | ratio |")
    print(f"|---|---|---|---|")
    print(f"| one {d}×{d} site, r={r}, E={E}: delta_spectra vs numpy.linalg.svd of dense ΔW | "
          f"{m_ours * 1e3:.1f} ms | {m_ref * 1e3:.1f} ms | {m_ref / m_ours:.0f}× faster |")
    print(f"| all {len(sites)} q,k,v sites ({layers} layers, d={d}): delta_spectra | {m_all:.3f} s | — | "
          f"{'< 2 s ✓' if m_all < 2 else '≥ 2 s ✗'} |")


if __name__ == "__main__":
    main()
