"""Sampling-based evaluation: cosines and retrieval recall, each beside its baselines."""

from .evaluate import build_eval_model, evaluate, format_report, report_name, sampling_label, save_report

__all__ = ["build_eval_model", "evaluate", "format_report", "report_name", "sampling_label", "save_report"]
