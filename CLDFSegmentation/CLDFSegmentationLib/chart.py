"""The per-slice chart of a run: what the gate decided and how much mask each slice got (Slicer plot nodes).

One table node holds, per slice the bundle cut, the gate's presence probability, its
threshold, whether the slice was judged positive and the mask's area (mm²);
a chart node plots them on [0, 1] (the area relative to the largest slice's).
"""

from __future__ import annotations

import json

import numpy as np
import slicer
import vtk

COLUMNS = ("slice", "presence", "threshold", "judged positive", "mask area (mm2)", "mask area (relative)",
           "slice label")
#: table attribute: the input's slice of each row (JSON list; null when none is), where they differ
INPUT_SLICES = "CLDF.InputSlices"
#: what the chart draws: column, colour, line or bars
SERIES = (("presence", (0.85, 0.33, 0.1), "line"), ("threshold", (0.5, 0.5, 0.5), "line"),
          ("judged positive", (0.2, 0.6, 0.2), "bar"), ("mask area (relative)", (0.2, 0.4, 0.8), "line"),
          ("slice label", (0.6, 0.1, 0.6), "points"))  # the user's weak labels: 1 present, 0 absent, -1 none


def addSliceChart(name: str, slices: int, inputSlices: np.ndarray | None = None, orientation: str = ""):
    """A table of ``slices`` rows (zeros) and a chart of its series; returns (table, chart).

    ``orientation``: the bundle's orientation code when the rows are slices of the input reoriented to it (the
    x axis title says so); ``inputSlices`` then gives the input's slice each row is (`cldf.orientation.slice_order`),
    None when they lie along another axis (the input's slice labels are then not shown).
    """
    scene = slicer.mrmlScene
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} per slice"))
    for column in COLUMNS:
        array = vtk.vtkFloatArray()
        array.SetName(column)
        array.SetNumberOfTuples(slices)
        array.Fill(-1.0 if column == "slice label" else 0.0)
        table.AddColumn(array)
    for z in range(slices):
        table.GetTable().SetValue(z, 0, vtk.vtkVariant(float(z)))
    if orientation:
        table.SetAttribute(INPUT_SLICES, json.dumps(None if inputSlices is None else [int(k) for k in inputSlices]))
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name} per slice"))
    chart.SetTitle(f"{name}: the gate and the mask per slice")
    title = "slice" if not orientation else f"slice of the input reoriented to {orientation} (the bundle's axes)"
    if orientation and inputSlices is None:
        title += "; slice labels, made along another axis, not shown"
    chart.SetXAxisTitle(title)
    chart.SetYAxisTitle("presence / relative mask area")
    for column, color, kind in SERIES:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{chart.GetName()} {column}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("slice")
        series.SetYColumnName(column)
        series.SetPlotType({"bar": series.PlotTypeScatterBar, "line": series.PlotTypeLine,
                            "points": series.PlotTypeScatter}[kind])
        series.SetMarkerStyle(series.MarkerStyleCircle if kind == "points" else series.MarkerStyleNone)
        if kind == "points":
            series.SetLineStyle(series.LineStyleNone)
        series.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return table, chart


def chartSeries(chart) -> list:
    """The chart's plot series nodes (removed with it)."""
    return [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]


def updateSliceChart(table, presence: np.ndarray, threshold: float, mask: np.ndarray, pixelArea: float,
                     start: int = 0, stop: int | None = None) -> None:
    """Fill rows ``start:stop`` from the gate's probabilities and a ``(Z, Y, X)`` mask; the relative area and
    the threshold are rewritten for every row (they depend on all slices)."""
    stop = len(presence) if stop is None else stop
    area = mask.reshape(len(mask), -1).sum(axis=1) * pixelArea
    largest = float(area.max()) if area.max() > 0 else 1.0
    columns = {name: _column(table, name) for name in COLUMNS}
    for z in range(start, stop):
        columns["presence"].SetValue(z, float(presence[z]))
        columns["judged positive"].SetValue(z, float(presence[z] >= threshold))
    for z in range(len(presence)):
        columns["threshold"].SetValue(z, float(threshold))
        columns["mask area (mm2)"].SetValue(z, float(area[z]))
        columns["mask area (relative)"].SetValue(z, float(area[z]) / largest)
    table.GetTable().Modified()
    table.Modified()


def updateSliceLabels(table, labels: np.ndarray) -> None:
    """The weak labels of the run's input (`labels.sliceLabels`, one per input slice) on the chart's rows."""
    column = _column(table, "slice label")
    stored = table.GetAttribute(INPUT_SLICES)
    order = np.arange(len(labels)) if stored is None else json.loads(stored)
    if order is None:
        return
    for z, k in enumerate(order[: column.GetNumberOfTuples()]):
        column.SetValue(z, float(labels[k]))
    table.GetTable().Modified()
    table.Modified()


def tableColumn(table, name: str) -> np.ndarray:
    """One column of the chart's table as an array."""
    array = _column(table, name)
    return np.array([array.GetValue(i) for i in range(array.GetNumberOfTuples())])


def _column(table, name: str):
    array = table.GetTable().GetColumnByName(name)
    if array is None:
        raise KeyError(f"the per-slice table has no column '{name}'")
    return array
