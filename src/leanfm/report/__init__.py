"""Markdown reports and plots from result JSON files."""

from leanfm.report.report import load_results, write_report

__all__ = ["load_results", "write_report"]
