"""ΔW spectra from the factors against a dense SVD, measured side by side in one process.

    python benchmarks/bench_spectra.py            # LLaMA-7B-shaped: 32 layers × q, k, v, d = 4096
    python benchmarks/bench_spectra.py --smoke    # tiny sizes, seconds
    python -m benchmarks --only spectra           # the same rows inside the whole suite's table

Prints a markdown table: the time of `delta_spectra` on one 4096 × 4096 site against
`numpy.linalg.svd` of that site's dense ΔW (alternating the two, median of repeats), and the time of
`delta_spectra` over all 96 sites. Only adapter tensors exist: no 7B model is built.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import LoadWindow, Row, Settings, alternate, fmt_seconds, table  # noqa: E402
from lily_lab.analysis.spectra import delta_spectra, dense_delta  # noqa: E402
from lily_lab.core import Site  # noqa: E402

SPEEDUP = 100  # target: ≥ 100× faster than the dense SVD
ALL_SITES_LIMIT = 2.0  # seconds, all 96 sites


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


def run(settings: Settings) -> list[Row]:
    """One row: one site against the dense SVD, and all 96 sites alone. Raises if the spectra disagree."""
    layers, d, r, E = (4, 256, 8, 4) if settings.smoke else (32, 4096, 16, 4)
    sites = llama_like_sites(layers, d, r, E)
    one = [sites[0]]
    dense = dense_delta(sites[0]).numpy()  # formed once, outside the timing

    check = np.linalg.svd(dense, compute_uv=False)[:r]
    got = delta_spectra(one).sigma.to_numpy()
    assert np.allclose(got, check, rtol=1e-5), "spectra disagree with the dense SVD"

    # The dense SVD takes ~15 s at d = 4096 on 2 cores: at most 5 repeats and one warm-up.
    repeats = min(settings.repeats, 5)
    with LoadWindow() as load:
        ours, ref = alternate(lambda: delta_spectra(one), lambda: np.linalg.svd(dense, compute_uv=False),
                              settings, repeats=repeats, warmup=1)
    speedup = statistics.median(b / a for a, b in zip(ours, ref))
    with LoadWindow() as load_all:
        delta_spectra(sites)  # warm-up
        all_sites = statistics.median(timed(lambda: delta_spectra(sites), repeats))
    smoke = settings.smoke
    met = None if smoke else (speedup >= SPEEDUP and all_sites < ALL_SITES_LIMIT)
    return [Row(
        f"`delta_spectra`, one {d} × {d} site, r = {r}; all {len(sites)} q, k, v sites of a LLaMA-7B-shaped "
        f"adapter ({layers} layers)", "dense `numpy.linalg.svd` of the one site",
        f"≥ {SPEEDUP}× faster; all {len(sites)} sites < {ALL_SITES_LIMIT:g} s",
        f"{fmt_seconds(statistics.median(ours))}; all sites {fmt_seconds(all_sites)}",
        fmt_seconds(statistics.median(ref)), f"{speedup:.0f}× faster", met, f"{load} / {load_all}")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    settings = Settings(smoke=args.smoke, repeats=args.repeats)
    torch.set_num_threads(settings.threads)
    print(table(run(settings), settings))


if __name__ == "__main__":
    main()
