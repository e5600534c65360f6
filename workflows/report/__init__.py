"""Presentation: the report's data (`data`), its HTML page and figures (`html`), sample grids (`grid`)."""
from .data import BlockResult, Curve, ModelResult, ReportData, SamplerResult, ScalingPoint
from .grid import grid_png, save_grid
from .html import SECTIONS, draw_figures, render_html, report_files, where_plans_pay, write_report

__all__ = ["BlockResult", "Curve", "ModelResult", "ReportData", "SECTIONS", "SamplerResult", "ScalingPoint",
           "draw_figures", "grid_png", "render_html", "report_files", "save_grid", "where_plans_pay",
           "write_report"]
