"""`cldf bench`: seconds per slice and peak memory of CLDF's fast path, the paper-literal path and the baselines.

On one volume (optionally resampled to a given number of slices, e.g. the 155 of
a BraTS volume), each in a fresh process:

- ``fast``, ``fast-all``, ``literal``: the diffusion-feature paths (below);
- ``layercam``: the CAM alone; ``cdm-saliency``: CDM saliency (Hu et al. 2023) alone;
- ``cldf-volume``: the whole of `cldf segment` on the volume (maps, gate,
  features, decoder, K-means, back to the input grid); ``cldf-volume-sam`` with LiteMedSAM;
- ``student-volume``: the bundle's student on the volume, as `cldf segment --segmenter student --no-maps`
  runs it (with the student's own refinement setting); ``student-volume-maps``: the same with the CAM and
  mean-gradient overlays; ``student-cohort``: `cldf segment --data` with the student and ``--no-maps`` on
  `COHORT_COPIES` copies of the volume, outputs written (volumes per hour).

The feature paths turn the same slices into the final pixel embeddings (every slice is
treated as positive by `fast-all`; `fast` keeps only the slices the classifier
judges positive, as `cldf segment` does). Fast: `DiffusionFeatures` (timesteps
batched, forward stopped after the last needed block, each block projected by
the decoder's first layer at its native resolution) then
`PixelDecoder.embed_projected` (upsample and add), 8 slices per batch. Literal:
`literal_feature_stack` (full forward per timestep, every block upsampled into a
``D x H x W`` stack) then `PixelDecoder.embed_stack`, one slice at a time as the
paper's reference code does. Each path runs in a fresh process, both under the
same autocast (bf16 on CUDA), so the ratios compare the algorithms, not the precision.
"""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import atomic, cases
from ..bundle import Bundle, load_bundle
from ..config import preset
from ..defaults import DEVICE
from ..device import autocast, resolve_device
from ..features import DiffusionFeatures, literal_feature_stack
from ..manifest import load_manifest
from ..maps import CDMSaliency, LayerCAM
from ..models import NoiseSchedule
from ..segment import Segmenter
from ..slice_maps import slice_presence

BATCH = 8
FEATURE_PATHS = ("fast", "fast-all", "literal")
STUDENT_PATHS = ("student-volume", "student-volume-maps", "student-cohort")
PATHS = FEATURE_PATHS + ("layercam", "cdm-saliency", "cldf-volume", "cldf-volume-sam") + STUDENT_PATHS
COHORT_COPIES = 4


def embed_fast(bundle: Bundle, x: torch.Tensor, amp: bool = True) -> torch.Tensor:
    """Fast path on ``(B, C, R, R)`` slices -> ``(B, E, R, R)`` embeddings (``amp``: the segmenter's autocast)."""
    feats = DiffusionFeatures(bundle.cdm, bundle.schedule, bundle.config.features)
    decoder = _decoder(bundle)
    with autocast(x.device) if amp else contextlib.nullcontext():
        projected = feats(x, project=decoder.block_weights(feats.block_channels))
    with torch.inference_mode():
        return decoder.embed_projected(projected, tuple(x.shape[-2:]))


def embed_literal(bundle: Bundle, x: torch.Tensor, amp: bool = True) -> torch.Tensor:
    """Literal path on ``(B, C, R, R)`` slices."""
    with autocast(x.device) if amp else contextlib.nullcontext():
        stack = literal_feature_stack(bundle.cdm, bundle.schedule, bundle.config.features, x)
    with torch.inference_mode():
        return _decoder(bundle).embed_stack(stack)


def _decoder(bundle: Bundle):
    by_seed = bundle.decoders["cdm"]
    return by_seed[min(by_seed)]


def _to(bundle: Bundle, device: torch.device) -> None:
    bundle.cdm.to(device)
    _decoder(bundle).mlp_.to(device)


def _peak_rss_mib() -> float:
    """RSS high-water mark: Linux's ``VmHWM`` (a child's ``ru_maxrss`` also counts its parent's peak at the exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0), so loading's peak cannot hide the path's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def map_fn(path: str, bundle: Bundle, device: torch.device):
    """The baseline map a path computes, as a function of a batch of slices."""
    cfg = bundle.config
    if path == "layercam":
        return bundle.on_sides(LayerCAM(bundle.cam_classifier.to(device), cfg.maps.cam_layers))
    bundle.cdm.to(device)
    return CDMSaliency(bundle.cdm, bundle.noisy_classifier.to(device), bundle.schedule, cfg.saliency, cfg.maps.noise_seed)


def _run_path(path: str, bundle: Bundle, x_all: torch.Tensor, device: torch.device, desc: str,
              inputs: dict[str, str] | None = None) -> float:
    """Run one path on the slices (or, for ``cldf-volume``, on the input files); returns the seconds it took.

    Progress bars show on a terminal only, so a log file is not flooded.

    ``fast`` embeds only the slices the classifier judges positive (as `cldf segment`
    does); ``fast-all`` and ``literal`` embed every slice.
    """
    if path in STUDENT_PATHS:
        return _student_path(path, bundle, device, inputs)
    if path in ("cldf-volume", "cldf-volume-sam"):
        start = time.perf_counter()
        Segmenter(bundle, str(device), BATCH, refine="sam" if path.endswith("sam") else "none").start(inputs).run(progress=False)
        return time.perf_counter() - start
    if path in ("layercam", "cdm-saliency"):
        step, fn = BATCH, map_fn(path, bundle, device)
        start = time.perf_counter()
        for i in tqdm(range(0, len(x_all), step), desc=desc, unit="batch", leave=False, disable=None):
            with autocast(device):
                fn(x_all[i : i + step].to(device))
        _sync(device)
        return time.perf_counter() - start
    step, fn = (BATCH, embed_fast) if path.startswith("fast") else (1, embed_literal)
    if path == "fast":
        x_all = x_all[slice_presence(bundle.slice_classifier.to(device), x_all, device, BATCH) >= bundle.config.cluster.presence_threshold]
    start = time.perf_counter()
    for i in tqdm(range(0, len(x_all), step), desc=desc, unit="batch" if step > 1 else "slice", leave=False,
                  disable=None):
        fn(bundle, x_all[i : i + step].to(device))
    _sync(device)
    return time.perf_counter() - start


def _student_path(path: str, bundle: Bundle, device: torch.device, inputs: dict[str, str]) -> float:
    from ..cohort import segment_cohort
    from ..student import make_segmenter

    seg = make_segmenter(bundle, "student", str(device), BATCH, overlays=path == "student-volume-maps")
    start = time.perf_counter()
    if path != "student-cohort":
        seg.start(inputs).run(progress=False)
        return time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "manifest.json"
        manifest.write_text(json.dumps({"name": "bench", "cases": [{"id": f"copy-{i}", "channels": inputs}
                                                                   for i in range(COHORT_COPIES)]}))
        start = time.perf_counter()
        segment_cohort(seg, load_manifest(manifest), Path(tmp) / "out", progress=False, write_maps=False)
        return time.perf_counter() - start


def measure(path: str, bundle_dir: str, slices: torch.Tensor, device: str, inputs: dict[str, str] | None = None) -> dict:
    """One path in this (fresh) process: peak memory of a cold pass, then seconds of a warm pass.

    The memory baseline is taken with the bundle, the slices (and the CUDA context)
    loaded and nothing else run; timing a second pass keeps one-off set-up out of s/slice.
    """
    bundle, dev = load_bundle(bundle_dir), torch.device(device)
    _to(bundle, dev)
    _sync(dev)
    cuda_base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    exact = _reset_peak_rss()
    rss_base = _peak_rss_mib()
    cold = _run_path(path, bundle, slices, dev, f"{path} (memory)", inputs)
    out = {"path": path, "peak_rss_mib": _peak_rss_mib() - rss_base, "rss_exact": exact, "cold_seconds": cold}
    if dev.type == "cuda":
        out["peak_cuda_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / (1 << 20)
    out["seconds"] = _run_path(path, bundle, slices, dev, f"{path} (time)", inputs)
    out["s_per_slice"] = out["seconds"] / len(slices)
    return out


def _in_fresh_process(path: str, bundle_dir: Path, slices: torch.Tensor, device: str, inputs: dict[str, str]) -> dict:
    """`measure` in a new interpreter (``python -m cldf.evaluation.bench``): nothing of this process's memory counts."""
    with tempfile.TemporaryDirectory() as tmp:
        x_file, out_file = Path(tmp) / "slices.safetensors", Path(tmp) / "result.json"
        save_file({"slices": slices.contiguous()}, str(x_file))
        cmd = [sys.executable, "-m", "cldf.evaluation.bench", path, str(bundle_dir), str(x_file), device, str(out_file),
               json.dumps(inputs)]
        done = subprocess.run(cmd)
        if done.returncode != 0 or not out_file.is_file():
            raise RuntimeError(f"the {path} path's benchmark process failed (exit code {done.returncode})")
        return json.loads(out_file.read_text())


def load_case_slices(bundle: Bundle, data: Path | None, case: str | None, tmp: Path,
                     depth: int = 0) -> tuple[str, torch.Tensor, dict[str, str]]:
    """``(Z, C, R, R)`` slices of the case at the bundle's resolution (default: the shipped sample case).

    With ``depth`` the volume is first resampled (linearly) to that many slices
    over the same extent. Returns the case id, the slices, and the (resampled)
    channel files written to ``tmp`` for the whole-volume run.
    """
    from .demo import default_data, sample_case

    manifest = Path(data) if data is not None else default_data()
    c = load_manifest(manifest).case(case) if case is not None else sample_case(bundle, manifest)
    case_id, inputs = c.id, {k: v for k, v in c.channels.items() if k in bundle.channels}
    files = {}
    for name in bundle.channels:
        image = sitk.ReadImage(str(inputs[name]))
        image = resample_depth(image, depth) if depth else image
        files[name] = str(tmp / f"{name}.nii.gz")
        sitk.WriteImage(image, files[name])
    d = bundle.config.data
    return case_id, cases.read_case(files, d).slices(d.resolution), files


def resample_depth(image: sitk.Image, depth: int) -> sitk.Image:
    """The image resampled (linearly) to ``depth`` slices spanning the same extent."""
    size = list(image.GetSize())
    spacing = list(image.GetSpacing())
    spacing[2] = spacing[2] * size[2] / depth
    size[2] = depth
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, image.GetPixelID())


def random_bundle(preset_name: str, channels: list[str], out: Path) -> Path:
    """A bundle of randomly initialised networks at a preset's scale: for speed and memory only.

    Time and memory of the two paths do not depend on the weights, so this
    measures the paper's 256x256 scale without training it.
    """
    from ..bundle import decoders_state, save_bundle
    from ..decoder import PixelDecoder
    from ..models import SliceClassifier, build_cdm

    cfg = preset(preset_name)
    cfg.data.channels = list(channels)
    torch.manual_seed(0)
    n = len(channels)
    cdm = build_cdm(cfg.diffusion, n)
    d_in = sum(DiffusionFeatures(cdm, NoiseSchedule(cfg.diffusion), cfg.features).block_channels)
    g = torch.Generator().manual_seed(0)
    decoder = PixelDecoder(cfg.decoder).fit([torch.randn(64, d_in, generator=g)], [torch.tensor([1, 2] * 32)], progress=False)
    networks = {"cdm": cdm.state_dict(), "noisy_classifier": SliceClassifier(cfg.noisy_classifier, n).state_dict(),
                "cam_classifier": SliceClassifier(cfg.cam_classifier, n).state_dict(),
                "decoders": decoders_state({"cdm": {0: decoder}})}
    return save_bundle(out, cfg, networks, {"name": f"random-{preset_name}-scale"})


def run_bench(bundle: Path | None = None, data: Path | None = None, case: str | None = None,
              slices: int = 0, device: str = DEVICE, scale: str | None = None, depth: int = 0,
              paths: tuple[str, ...] = PATHS, out: Path | None = None) -> dict:
    """Benchmark the paths on one volume; prints a Markdown table and returns the numbers.

    With ``scale`` (a preset name) the networks are random ones at that preset's
    size and resolution, on the same volume as the shipped bundle would use.
    With ``out`` the table is also written there (Markdown, and JSON beside it).
    """
    from .demo import default_bundle

    if slices < 0 or depth < 0:
        raise ValueError(f"--slices and --depth take 0 (as is) or a positive count, not {slices}, {depth}")
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not {"fast", "literal"} <= set(paths):
        raise ValueError(f"paths must include fast and literal and come from {', '.join(PATHS)}; got {paths}")
    if slices:  # the whole volume is not a slice subset
        paths = tuple(p for p in paths if not p.startswith("cldf-volume") and p not in STUDENT_PATHS)
    bundle_dir = Path(bundle) if bundle is not None else default_bundle()
    if scale is not None:
        channels = load_bundle(bundle_dir).channels if (bundle_dir / "bundle.json").is_file() else ["FLAIR", "T1"]
        bundle_dir = random_bundle(scale, channels, Path(tempfile.mkdtemp(prefix="cldf-bench-")))
    b = load_bundle(bundle_dir)
    if b.student is None:
        paths = tuple(p for p in paths if p not in STUDENT_PATHS)
    dev = resolve_device(device)
    tmp = tempfile.TemporaryDirectory()
    case_id, x, files = load_case_slices(b, data, case, Path(tmp.name), depth)
    x = x[:slices] if slices else x
    r = b.config.data.resolution
    print(f"bundle {b.id}, case {case_id}{f' resampled to {depth} slices' if depth else ''}: "
          f"{len(x)} slices at {r}x{r}, device {dev}, {torch.get_num_threads()} threads")

    n_pos = int((slice_presence(b.slice_classifier.to(dev), x, dev, BATCH) >= b.config.cluster.presence_threshold).sum())
    print(f"{n_pos} of {len(x)} slices judged positive: `fast` embeds those (as `cldf segment` does), "
          "`fast-all` and `literal` embed every slice; s/slice is over all slices")
    diff = check_equal(b, x[:BATCH], dev)
    print(f"check: fast vs literal embeddings of the first batch ({min(BATCH, len(x))} slices): max |diff| = {diff:.2e}")
    results = {}
    with tmp:
        for path in paths:
            print(f"{path} path (fresh process)...")
            results[path] = _in_fresh_process(path, bundle_dir, x, str(dev), files)
    report = summarise(results, dev)
    report.update(bundle=b.id, case=case_id, depth=depth or None, slices=len(x), positive_slices=n_pos, resolution=r,
                  device=_device_name(dev), threads=torch.get_num_threads(), max_abs_diff=diff)
    if out is not None:
        write_speed_report(report, Path(out))
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_name()})"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return names[0] if names else platform.processor() or platform.machine()


def check_equal(bundle: Bundle, x: torch.Tensor, device: torch.device) -> float:
    """Max abs difference of the two paths' embeddings of ``x``, in float32."""
    _to(bundle, device)
    x = x.to(device)
    fast = embed_fast(bundle, x, amp=False)
    literal = torch.cat([embed_literal(bundle, x[i : i + 1], amp=False) for i in range(len(x))])
    _to(bundle, torch.device("cpu"))
    return float((fast - literal).abs().max())


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def summarise(results: dict[str, dict], device: torch.device) -> dict:
    """Print the table and the fast-vs-literal ratios; return them with the raw numbers and the table.

    Memory ratios use CUDA's peak allocation on a GPU, the RSS increase otherwise.
    """
    cuda = device.type == "cuda"
    key = "peak_cuda_mib" if cuda else "peak_rss_mib"
    fast, lit = results["fast"], results["literal"]
    extra = " peak CUDA MiB |" if cuda else ""
    rows = [f"| path | s/slice | peak RSS MiB |{extra} ratio to fast (time / memory) |",
            "|---|---|---|" + ("---|" if cuda else "") + "---|"]
    for name, res in results.items():
        cells = [name, f"{res['s_per_slice']:.4f}", f"{res['peak_rss_mib']:.1f}"]
        cells += [f"{res[key]:.1f}"] if cuda else []
        ratios = f"{_ratio(res['s_per_slice'], fast['s_per_slice']):.2f} / {_ratio(res[key], fast[key]):.2f}"
        rows.append("| " + " | ".join([*cells, ratios]) + " |")
    speedup, memory = _ratio(lit["s_per_slice"], fast["s_per_slice"]), _ratio(lit[key], fast[key])
    lines = [f"fast vs literal: the literal path takes {speedup:.2f}x the time per slice "
             f"and {memory:.2f}x the peak {'CUDA' if cuda else 'RSS'} memory of the fast path"]
    if "fast-all" in results:
        lines.append(f"on every slice (fast-all vs literal): {_ratio(lit['s_per_slice'], results['fast-all']['s_per_slice']):.2f}x")
    if "cldf-volume" in results:
        lines.append(f"whole volume with `cldf segment` (cldf-volume): {results['cldf-volume']['seconds']:.1f} s")
    if "cldf-volume-sam" in results:
        lines.append(f"whole volume with `cldf segment --refine sam` (cldf-volume-sam): "
                     f"{results['cldf-volume-sam']['seconds']:.1f} s")
    lines += _student_notes(results)
    if not all(r["rss_exact"] for r in results.values()):
        lines.append("(the RSS high-water mark could not be reset: RSS increases are lower bounds)")
    print("\n" + "\n".join(rows) + "\n\n" + "\n".join(lines))
    return {**results, "speedup": speedup, "memory_ratio": memory, "memory_measure": key,
            "table": rows, "notes": lines}


def _student_notes(results: dict[str, dict]) -> list[str]:
    """The student's whole-volume time, its speed-up over the shipped CLDF + SAM run, and the cohort rate."""
    lines = []
    student, sam = results.get("student-volume"), results.get("cldf-volume-sam")
    if student:
        lines.append(f"whole volume with the student (student-volume): {student['seconds']:.1f} s, "
                     f"peak RSS {student['peak_rss_mib']:.0f} MiB"
                     + (f"; {_ratio(sam['seconds'], student['seconds']):.1f}x faster than cldf-volume-sam" if sam else ""))
    if "student-volume-maps" in results:
        lines.append(f"the same with the CAM and mean-gradient overlays: {results['student-volume-maps']['seconds']:.1f} s")
    if "student-cohort" in results:
        seconds = results["student-cohort"]["seconds"]
        lines.append(f"cohort with the student (`cldf segment --data ... --no-maps`, {COHORT_COPIES} volumes, outputs "
                     f"written): {3600 * COHORT_COPIES / seconds:.0f} volumes per hour")
    return lines


def write_speed_report(report: dict, path: Path) -> None:
    """``report`` as Markdown at ``path`` and as JSON beside it (``.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    depth = f", resampled to {report['depth']} slices" if report.get("depth") else ""
    text = [
        "# Speed and memory",
        "",
        f"`cldf bench` on bundle `{report['bundle']}`, case {report['case']}{depth}: {report['slices']} slices at "
        f"{report['resolution']} x {report['resolution']} ({report['positive_slices']} judged positive), "
        f"device {report['device']}, {report['threads']} threads, one run. Each path ran in a fresh process; "
        "s/slice is over all slices, from a second (warm) pass; peak memory is the increase over the loaded "
        "bundle during the first pass.",
        "",
        "- fast: CLDF's feature path on the slices judged positive (as `cldf segment`); fast-all: on every slice;",
        "- literal: the paper-literal feature stack, one slice at a time, every slice;",
        "- layercam: the CAM alone; cdm-saliency: CDM saliency (Q, R, tau, s from the bundle) alone;",
        "- cldf-volume: the whole `cldf segment` run (maps, gate, features, decoder, K-means, resampling back);",
        "- cldf-volume-sam: the same with `--refine sam` (LiteMedSAM on the scan's own grid, slices with a mask only);",
        "- student-volume: `cldf segment --segmenter student --no-maps` (the student U-Net, one pass per slice); "
        "student-volume-maps: with the CAM and mean-gradient overlays; student-cohort: a cohort run of "
        f"{COHORT_COPIES} copies of the volume with the student (s/slice over one volume's slices: divide by "
        f"{COHORT_COPIES} per volume).",
        "",
        *report["table"],
        "",
        *[f"- {line}" for line in report["notes"]],
        "",
    ]
    atomic.write_text(path, "\n".join(text))
    atomic.write_json(path.with_suffix(".json"), {k: v for k, v in report.items() if k not in ("table", "notes")})


if __name__ == "__main__":
    # child of `_in_fresh_process`: PATH BUNDLE_DIR SLICES_PT DEVICE RESULT_JSON INPUTS_JSON
    name, bundle_arg, x_arg, device_arg, result_arg, inputs_arg = sys.argv[1:7]
    res = measure(name, bundle_arg, load_file(x_arg)["slices"], device_arg, json.loads(inputs_arg))
    Path(result_arg).write_text(json.dumps(res))
