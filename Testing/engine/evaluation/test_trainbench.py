"""`cldf bench --train`'s report: each part is written when measured and named as missing when not."""

from __future__ import annotations

from cldf.evaluation.trainbench import markdown

MACHINE = {"cpu": "a CPU", "cores": 2, "torch": "2.13.0", "gpu": None}
MEMORY = [{"cases": n, "training_slices": 10 * n, "positive_slices": 3 * n, "validation_patients_for_selection": 3,
           "peak_rss_mib": peak, "wall_s": 100.0, "cache": {"build_s": 1.0, "reuse_s": 0.01}}
          for n, peak in ((20, 1000.0), (400, 1100.0))]
THROUGHPUT = [{"preset": "cpu", "resolution": 64, "batch": 16, "processes": 2, "threads_per_process": 1,
               "slices_per_s": {"cdm": 12.5, "noisy_classifier": 40.0}, "peak_rss_mib": 900.0}]


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_a_part_not_measured_is_named_with_its_command_and_leaves_no_empty_table():
    text = markdown({"machine": MACHINE, "manifest": "m.json", "memory": MEMORY, "memory_ratio": 1.1})
    assert "Not measured yet: `cldf bench --train --parts throughput`" in text
    rows = table_rows(text)
    assert [r[0] for r in rows] == ["cases", "---", "20", "400"]
    assert "Peak memory of the larger cohort over the smaller: 1.100." in text


def test_every_row_of_a_measured_part_has_as_many_cells_as_its_header():
    text = markdown({"machine": MACHINE, "manifest": "m.json", "throughput_cases": 20, "throughput": THROUGHPUT})
    assert "## Slices per second (20-case cohort)" in text and "--parts memory" in text
    rows = table_rows(text)
    assert len({len(r) for r in rows}) == 1 and rows[2][4:6] == ["12.50", "40.00"]
