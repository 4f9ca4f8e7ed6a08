"""One implementation of every shared step: patch it, and every caller changes.

Reading a case into the bundle's slices (`cldf.cases`), the per-slice clustering rule (`cldf.cluster`) and the
metrics (`cldf.metrics`) are called through their modules by the product, training's selection, evaluation,
the figure and the benchmarks, so what selection scores is what ships.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cldf import cases, cluster, metrics
from cldf.bundle import load_bundle
from cldf.manifest import load_manifest
from cldf.segment import Segmenter

ROOT = Path(__file__).resolve().parents[2]
SHARED = {"cldf.cases": {"read_case", "case_from_images", "read_truth", "scored_slices"},
          "cldf.cluster": {"cluster_slice"},
          "cldf.metrics": {"dice", "iou", "slice_dice", "target_slice_dice"}}
# the steps a shared function is built from: only its own module calls them
PARTS = {"cldf.cases": {"stack_channels", "read_channels", "robust_range"},
         "cldf.cluster": {"kmeans", "choose_clusters", "seed_references"}}


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spy(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _imported_names(tree: ast.Module, path: Path) -> set[tuple[str, str]]:
    """``(module, name)`` of every ``from X import name`` in a file, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT / "training").with_suffix("").parts[:-1]) if "training" in path.parts else ""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            out |= {(base, a.name) for a in node.names}
    return out


def _callers() -> list[Path]:
    engine = [p for p in (ROOT / "training" / "cldf").rglob("*.py")]
    return [*engine, *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "CLDFSegmentation").rglob("*.py")]


def test_no_caller_binds_a_shared_step_or_its_parts_by_name():
    """A name imported into a caller would keep the old function when the shared one is patched or changed."""
    found = []
    for path in _callers():
        module = ".".join(path.relative_to(ROOT / "training").with_suffix("").parts) if "training" in path.parts else ""
        for source, name in _imported_names(ast.parse(path.read_text(encoding="utf-8")), path):
            if name in SHARED.get(source, ()) or any(name in parts and module != owner for owner, parts in PARTS.items()):
                found.append(f"{path.relative_to(ROOT)}: from {source} import {name}")
    assert not found, found


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    manifest = load_manifest(bundle.card["training"]["manifest"])
    return bundle, manifest, bundle.card["training"]["split"]["val"][0], bundle.card["task"]["mask_labels"]


def test_every_caller_reads_a_case_through_cases(tiny, monkeypatch, tmp_path):
    bundle, manifest, cid, labels = tiny
    from cldf.evaluation.evaluate import _case_masks
    from cldf.evaluation.figure import figure_rows
    from cldf.trainer.select import _val_slices
    from cldf.trainer.tensorstore import TensorStore
    from cldf.trainer.volume_select import _val_volume

    seg = Segmenter(bundle, "cpu")
    case = manifest.case(cid)
    inputs = {k: v for k, v in case.channels.items() if k in bundle.channels}
    with TensorStore(tmp_path / "val.bin") as store:
        runs = {
            "cldf segment": lambda: seg.start(inputs),
            "selection": lambda: _val_slices(seg, manifest, [cid], labels, False, ["layercam"], store),
            "post-processing selection": lambda: _val_volume(seg, manifest, cid, labels, (0,)),
            "evaluation": lambda: _case_masks({"cldf": seg}, manifest, cid, bundle, labels, ("cldf",), (0,)),
            "figure": lambda: figure_rows(bundle.path, manifest.path, "val", 1, "cpu"),
            "benchmarks": lambda: _benchmark("mg_stripes").validation_positives(bundle, manifest.path),
        }
        for name, run in runs.items():
            calls = _spy(monkeypatch, cases, "case_from_images")
            run()
            assert calls, f"{name} read the case without cases.case_from_images"
            monkeypatch.undo()


def test_the_product_and_selection_cluster_with_the_rule_that_ships(tiny, monkeypatch):
    """Patch `cluster.cluster_slice` to keep nothing: the shipped pipeline's masks and selection's scores both vanish."""
    bundle, manifest, cid, labels = tiny
    from cldf.trainer.select import _cluster_scores

    monkeypatch.setattr(cluster, "cluster_slice", lambda emb, *a, **k: (torch.zeros(emb.shape[1:], dtype=torch.bool),
                                                                         float("nan")))
    seg = Segmenter(bundle, "cpu")
    case = manifest.case(cid)
    result = seg.start({k: v for k, v in case.channels.items() if k in bundle.channels}).run(progress=False)
    assert not result.mask.any()
    decoder = bundle.decoders[seg.variant][0]
    size = (bundle.config.data.resolution,) * 2
    x = cases.read_case(case.channels, bundle.config.data).slices(size[0])[:2]
    maps = seg.slice_maps(x, torch.arange(2))

    class Val:  # what selection keeps of the validation slices: features per slice, body masks
        features = [seg.features(x[i : i + 1]) for i in range(2)]
        body = maps.body.cpu()

    truths = [torch.ones(8, 8, dtype=torch.bool).numpy()] * 2
    scores = _cluster_scores(decoder, Val, maps.seeds.cpu(), torch.ones(2, dtype=torch.bool), truths, [(8, 8)] * 2,
                             size, seg)
    assert scores and all(v == 0.0 for v in scores.values())


def test_every_scorer_uses_the_one_dice(tiny, monkeypatch):
    import numpy as np

    from cldf.evaluation.demo import dice_scores
    from cldf.evaluation.evaluate import _slice_scores
    from cldf.trainer.volume_select import _score_rules, _ValVolume

    monkeypatch.setattr(metrics, "slice_dice", lambda p, g: np.full(len(p), 0.125))
    truth = np.zeros((3, 8, 8), bool)
    truth[1, 2:5, 2:5] = True
    pred = truth.copy()
    assert _slice_scores(pred, truth, np.array([1]), (1.0, 1.0)).dice == [0.125]
    assert dice_scores(pred, truth)[:2] == (0.125, 0.125)
    volume = _ValVolume(truth, {0: pred}, {}, truth.astype(np.float32), (1.0, 1.0))
    d3, ds = {}, {}
    monkeypatch.setattr("cldf.trainer.volume_select._slice_rule", lambda v, s, cfg: v.masks[s])
    _score_rules(volume, [(-1.0, False, 0.0)], ["postprocess.min_similarity", "postprocess.require_seeds",
                                                "postprocess.min_presence"], [0.0], (0,), d3, ds)
    assert list(d3.values()) == [[0.125]] and list(ds.values()) == [[0.125]]
    assert metrics.dice(pred, truth) == 0.125
    assert json.dumps(metrics.target_slice_dice(pred, truth)) == "[0.125]"
