"""Continual-learning metrics (Last, Avg, Transfer, BWT, forgetting) and the results.json reader."""
from mozo.metrics.summary import (
    PROTOCOLS,
    REQUIRED_KEYS,
    SUMMARY_KEYS,
    ResultsError,
    backward_transfer,
    fmt,
    forgetting,
    load_results,
    results_path,
    summarize,
    summarize_results,
    summary_differences,
    validate_matrix,
)

__all__ = [
    "PROTOCOLS",
    "REQUIRED_KEYS",
    "SUMMARY_KEYS",
    "ResultsError",
    "backward_transfer",
    "fmt",
    "forgetting",
    "load_results",
    "results_path",
    "summarize",
    "summarize_results",
    "summary_differences",
    "validate_matrix",
]
