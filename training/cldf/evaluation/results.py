"""`cldf results`: the paper's tables from the test metrics recorded in shipped bundles.

Each bundle's ``bundle.json`` carries the metrics `cldf evaluate --record` wrote
(section ``metrics.<split>``); this module only reads and arranges them: one
column per bundle (task), one row per method, Dice and IoU (mean ± std over
positive slices), HD95 and the per-case 3D Dice.
"""

from __future__ import annotations

from pathlib import Path

from .. import atomic
from ..bundle import read_card
from ..defaults import TARGET_NAME
from .evaluate import BASELINES, METHODS

#: row labels, in the paper's order
LABELS = {
    "gradcam": "GradCAM", "layercam": "LayerCAM", "scorecam": "ScoreCAM", "ame-cam": "AME-CAM", "cpf-cte": "CPF-CTE",
    "mg": "MG",
    "fusion": "fusion (CAM AND MG)", "cdm": "CDM saliency", "layercam+cl": "LayerCAM+CL", "mg+cl": "MG+CL",
    "ame-cam+cl": "AME-CAM+CL", "ame-cam+mg+cl": "AME-CAM+MG+CL", "cpf-cte+cl": "CPF-CTE+CL",
    "cldf-untrained": "CLDF, untrained CDM", "encoder-features": "CLDF, classifier-encoder features", "cldf": "CLDF",
    "cldf+sam": "CLDF + SAM refinement", "student": "student (U-Net on CLDF's masks)",
    "student+sam": "student + SAM refinement",
}
CAM_LABELS = {"layercam": "LayerCAM", "gradcam": "GradCAM", "ame-cam": "AME-CAM", "cpf-cte": "CPF-CTE"}
#: the rows the shipped CLDF is compared against for "best"; the Table 2 rows (untrained CDM, encoder features)
#: stand beside it
COMPARED = BASELINES + ("layercam+cl", "mg+cl", "ame-cam+cl", "ame-cam+mg+cl", "cpf-cte+cl")
SHIPPED = ("cldf", "cldf+sam", "student", "student+sam")


def task_column(card: dict, split: str) -> dict:
    """One table column: the task, its dataset and the split the numbers come from."""
    metrics = card.get("metrics", {}).get(split)
    if not metrics:
        raise ValueError(f"bundle '{card.get('name')}' has no recorded {split} metrics; run "
                         f"`cldf evaluate --bundle ... --split {split} --record` first")
    dataset = Path(card.get("training", {}).get("manifest", "")).parent.name or "data"
    methods = metrics["methods"]
    slices = int(next(iter(methods.values()))["n_slices"])
    config = card.get("config", {})
    shipped = shipped_row(config)
    return {"bundle": card.get("name"), "task": card.get("task", {}).get("target", TARGET_NAME), "dataset": dataset,
            "split": split, "cases": metrics["cases"], "positive_slices": slices, "command": metrics.get("command"),
            "methods": methods, "per_case": metrics.get("per_case", {}), "shipped": shipped,
            "cam_source": config.get("maps", {}).get("cam_method", "layercam")}


def shipped_row(config: dict) -> str:
    """The row of the segmenter a bundle's config ships: CLDF or its student, refined with SAM or not."""
    student = config.get("student", {})
    if student.get("segmenter") == "student":
        return "student+sam" if student.get("refine") == "sam" else "student"
    return "cldf+sam" if config.get("refine", {}).get("method") == "sam" else "cldf"


def build_results(bundle_dirs: list[Path], split: str = "test") -> dict:
    columns = [task_column(read_card(d), split) for d in bundle_dirs]
    wins = [c["task"] for c in columns if cldf_is_best(c["methods"], c["shipped"])]
    return {"split": split, "columns": columns, "cldf_best_on": wins,
            "compared_rows": [LABELS[m] for m in COMPARED]}


def cldf_is_best(methods: dict, shipped: str = "cldf") -> bool:
    """Whether the shipped CLDF row (refined or not, as the bundle says) beats every compared row's mean Dice."""
    others = [methods[m]["dice"] for m in COMPARED if m in methods]
    return shipped in methods and all(methods[shipped]["dice"] > d for d in others)


STD_KEYS = {"dice": "dice_std", "iou": "iou_std", "hd95_mm": "hd95_std"}  # the 3D Dice is a mean over cases only


def _cell(r: dict | None, key: str, digits: int = 3) -> str:
    if r is None or key not in r:
        return "—"
    std = STD_KEYS.get(key)
    return f"{r[key]:.{digits}f} ± {r[std]:.{digits}f}" if std in r else f"{r[key]:.{digits}f}"


def markdown(results: dict) -> str:
    cols = results["columns"]
    head = [f"{c['task']} ({c['dataset']}, {c['split']}: {len(c['cases'])} cases, {c['positive_slices']} slices)"
            for c in cols]
    sep = "|---|" + "---|" * len(cols)

    def table(title: str, cell) -> list[str]:
        rows = [f"**{title}**", "", "| method | " + " | ".join(head) + " |", sep]
        for m in METHODS:
            cells = [cell(c["methods"].get(m), c) for c in cols]
            if all(text == "—" for text in cells):  # the method is in no column, or lacks this number
                continue
            rows.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        return rows + [""]

    def dice(r, c):
        text = _cell(r, "dice")
        best = r is not None and r["dice"] == max(c["methods"][m]["dice"] for m in c["methods"] if m in COMPARED + SHIPPED)
        return f"**{text}**" if best else text

    lines = table("Dice on positive slices (mean ± std over slices; best of the compared rows in bold)", dice)
    lines += table("IoU on positive slices", lambda r, c: _cell(r, "iou"))
    lines += table("HD95 (mm) on positive slices (an empty mask scores the slice's diagonal)", lambda r, c: _cell(r, "hd95_mm", 1))
    lines += table("3D Dice per case (mean over cases; false positives on slices without target count)",
                   lambda r, c: _cell(r, "dice_3d"))
    lines += table("False-positive volume on slices without target (ml per case, mean over cases)",
                   lambda r, c: _cell(r, "fp_ml_empty_slices", 1))
    lines += table("Precision on positive slices (share of predicted pixels on the target; "
                   "the fusion row is CLDF's foreground seeds)", lambda r, c: _cell(r, "precision"))
    lines += table("Pointing game (share of positive slices whose map maximum lies on the target)",
                   lambda r, c: _cell(r, "pointing"))
    lines += per_case_table(cols)
    n = len(cols)
    lines.append("Chosen on the validation patients, per task: " + "; ".join(
        f"{c['task']}: {CAM_LABELS.get(c['cam_source'], c['cam_source'])} seeds, "
        f"{'SAM-refined' if c['shipped'].endswith('+sam') else 'unrefined'} masks"
        f"{' of the student' if c['shipped'].startswith('student') else ''}" for c in cols)
        + ". The AME-CAM+MG+CL row is CLDF itself where AME-CAM is the chosen source (—).")
    lines.append("")
    lines.append(f"The shipped segmenter (CLDF or its student) has the best mean Dice of all compared rows ({', '.join(results['compared_rows'])}) "
                 f"on {len(results['cldf_best_on'])} of {n} tasks"
                 + (f": {', '.join(results['cldf_best_on'])}." if results["cldf_best_on"] else "."))
    lines.append("")
    lines.append("Test cases per column: " + "; ".join(f"{c['task']}: {', '.join(c['cases'])}" for c in cols) + ".")
    return "\n".join(lines) + "\n"


def per_case_table(cols: list[dict]) -> list[str]:
    """The shipped CLDF's 3D Dice and false-positive volume on slices without target, case by case."""
    lines = ["**Shipped CLDF per case: 3D Dice / false-positive volume on slices without target (ml)**", ""]
    for c in cols:
        per_case = c.get("per_case") or {}
        shipped = c.get("shipped", "cldf")
        if not per_case:
            continue
        lines.append(f"{c['task']} ({LABELS[shipped]}): " + "; ".join(
            f"{cid} {r[shipped]['dice_3d']:.3f} / {r[shipped]['fp_ml_empty_slices']:.1f}"
            for cid, r in per_case.items() if shipped in r))
        lines.append("")
    return lines if len(lines) > 2 else []


def write_results(results: dict, path: Path) -> None:
    """``results.md`` at ``path`` and ``results.json`` beside it, each written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, markdown(results))
    atomic.write_json(path.with_suffix(".json"), results)
