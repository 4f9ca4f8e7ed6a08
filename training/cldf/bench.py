"""`cldf bench`: seconds per slice and peak memory of the fast feature path vs the paper-literal one.

Both paths turn the same slices into the final pixel embeddings (every slice is
treated as positive, so both do the full work):

* fast: `DiffusionFeatures` (timesteps batched, forward stopped after the last
  needed block, features at native resolution) + `PixelDecoder.embed`
  (project, then upsample), 8 slices per batch;
* literal: `literal_feature_stack` (a full forward per timestep, every block
  upsampled to a ``D x H x W`` stack) + `PixelDecoder.embed_stack`, one slice
  at a time as the paper's reference code does.

Each path runs in a fresh process so that one's allocations never hide the
other's peak. Both run under the same autocast (bf16 on CUDA), so the ratios
compare the algorithms, not the precision.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .bundle import Bundle, load_bundle
from .data import load_manifest, normalise, read_channels, to_slices
from .features import DiffusionFeatures, literal_feature_stack
from .segment import autocast, resolve_device

BATCH = 8
PATHS = ("fast", "literal")


def embed_fast(bundle: Bundle, x: torch.Tensor) -> torch.Tensor:
    """Fast path on one batch of ``(B, C, R, R)`` slices -> ``(B, E, R, R)`` embeddings."""
    feats = DiffusionFeatures(bundle.cdm, bundle.schedule, bundle.config.features)
    with autocast(x.device):
        f = feats(x)
    with torch.inference_mode():
        return _decoder(bundle).embed(f, tuple(x.shape[-2:]), feats.block_channels)


def embed_literal(bundle: Bundle, x: torch.Tensor) -> torch.Tensor:
    """Literal path on one batch of slices."""
    with autocast(x.device):
        stack = literal_feature_stack(bundle.cdm, bundle.schedule, bundle.config.features, x)
    with torch.inference_mode():
        return _decoder(bundle).embed_stack(stack)


def _decoder(bundle: Bundle):
    by_seed = bundle.decoders["cdm"]
    return by_seed[min(by_seed)]


def _to(bundle: Bundle, device: torch.device) -> None:
    bundle.cdm.to(device)
    _decoder(bundle).mlp_.to(device)


def _maxrss_mib() -> float:
    """Peak RSS so far: ``ru_maxrss`` is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark to the current RSS (Linux >= 4.0), so loading's peak cannot hide the path's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(path: str, bundle_dir: str, slices: np.ndarray, device: str) -> dict:
    """Run one path over all slices in this (fresh) process: seconds and peak memory above the baseline."""
    torch.manual_seed(0)
    bundle, dev = load_bundle(bundle_dir), torch.device(device)
    x_all = torch.from_numpy(slices)
    _to(bundle, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cuda_base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    exact = _reset_peak_rss()
    rss_base = _maxrss_mib()  # baseline: bundle, slices (and the CUDA context) loaded, nothing else run
    step, fn = (BATCH, embed_fast) if path == "fast" else (1, embed_literal)
    start = time.perf_counter()
    for i in tqdm(range(0, len(x_all), step), desc=path, unit="batch" if step > 1 else "slice", leave=False):
        fn(bundle, x_all[i : i + step].to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"path": path, "seconds": seconds, "s_per_slice": seconds / len(x_all),
           "peak_rss_mib": _maxrss_mib() - rss_base, "rss_exact": exact}
    if dev.type == "cuda":
        out["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / (1 << 20)
    return out


def _in_fresh_process(path: str, bundle_dir: Path, slices: np.ndarray, device: str) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (path, str(bundle_dir), slices, device))


def load_case_slices(bundle: Bundle, data: Path | None, case: str | None, tmp: Path) -> tuple[str, torch.Tensor]:
    """``(Z, C, R, R)`` slices of the chosen case at the bundle's resolution (a phantom when the default data is absent)."""
    from .demo import default_data, sample_case
    from .phantom import make_phantom

    manifest = Path(data) if data is not None else default_data()
    if case is not None:
        c = load_manifest(manifest).case(case)
        case_id, inputs = c.id, {k: v for k, v in c.channels.items() if k in bundle.channels}
    elif manifest.is_file():
        case_id, inputs = sample_case(bundle, manifest)
    else:
        print(f"real data not found at {manifest}: benchmarking a generated phantom instead")
        case_id, inputs = "phantom", make_phantom(tmp)
    volume, _ = read_channels(inputs, bundle.channels)
    d = bundle.config.data
    return case_id, to_slices(normalise(volume, d.percentiles), d.resolution)


def run_bench(bundle: Path | None = None, data: Path | None = None, case: str | None = None,
              slices: int = 0, device: str = "auto") -> dict:
    """Benchmark both paths on one volume; prints a Markdown table and returns the numbers."""
    from .demo import default_bundle

    if slices < 0:
        raise ValueError(f"--slices takes 0 (all) or a positive count, not {slices}")
    bundle_dir = Path(bundle) if bundle is not None else default_bundle()
    b = load_bundle(bundle_dir)
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        case_id, x = load_case_slices(b, data, case, Path(tmp))
    x = x[:slices] if slices else x
    r = b.config.data.resolution
    print(f"bundle {b.id}, case {case_id}: {len(x)} slices at {r}x{r}, device {dev}")

    diff = check_equal(b, x[:BATCH], dev)
    print(f"check: fast vs literal embeddings on the first batch ({min(BATCH, len(x))} slices): max |diff| = {diff:.2e}")
    results = {}
    for path in PATHS:
        print(f"{path} path (fresh process)...")
        results[path] = _in_fresh_process(path, bundle_dir, x.numpy(), str(dev))
    report = summarise(results, dev)
    report.update(bundle=b.id, case=case_id, slices=len(x), resolution=r, device=str(dev), max_abs_diff=diff)
    return report


def check_equal(bundle: Bundle, x: torch.Tensor, device: torch.device) -> float:
    """Max abs difference of the two paths' embeddings, in float32 (no autocast)."""
    _to(bundle, device)
    x = x.to(device)
    with torch.inference_mode():
        fast = DiffusionFeatures(bundle.cdm, bundle.schedule, bundle.config.features)
        emb_fast = _decoder(bundle).embed(fast(x), tuple(x.shape[-2:]), fast.block_channels)
        emb_lit = torch.cat([_decoder(bundle).embed_stack(
            literal_feature_stack(bundle.cdm, bundle.schedule, bundle.config.features, x[i : i + 1])) for i in range(len(x))])
    _to(bundle, torch.device("cpu"))
    return float((emb_fast.float() - emb_lit.float()).abs().max())


def summarise(results: dict[str, dict], device: torch.device) -> dict:
    """Print the table and the fast-vs-literal ratios; return them with the raw numbers."""
    key = "peak_cuda_mib" if device.type == "cuda" else "peak_rss_mib"
    fast, lit = results["fast"], results["literal"]
    speedup = lit["s_per_slice"] / fast["s_per_slice"]
    mem_ratio = lit[key] / fast[key] if fast[key] > 0 else float("inf")
    cuda = device.type == "cuda"
    print("\n| path | s/slice | peak RSS MiB |" + (" peak CUDA MiB |" if cuda else "") + " ratio (time / memory) |")
    print("|---|---|---|" + ("---|" if cuda else "") + "---|")
    for name, res in results.items():
        t, m = res["s_per_slice"] / fast["s_per_slice"], (res[key] / fast[key] if fast[key] > 0 else float("inf"))
        cells = [name, f"{res['s_per_slice']:.4f}", f"{res['peak_rss_mib']:.1f}"]
        cells += [f"{res['peak_cuda_mib']:.1f}"] if cuda else []
        print("| " + " | ".join(cells + [f"{t:.2f} / {m:.2f}"]) + " |")
    what = "CUDA" if cuda else "RSS"
    print(f"\nfast path: {speedup:.1f}x faster per slice, {mem_ratio:.1f}x less peak {what} memory than the literal path")
    if not (fast["rss_exact"] and lit["rss_exact"]):
        print("(could not reset the RSS high-water mark: RSS increases are lower bounds)")
    return {"fast": fast, "literal": lit, "speedup": speedup, "memory_ratio": mem_ratio, "memory_measure": key}
