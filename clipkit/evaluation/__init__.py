"""Zero-shot classification and retrieval, with CLIP_benchmark's definitions and result format.

Pure metric functions over tensors live in ``metrics``; ``zeroshot`` and ``retrieval`` are
thin drivers that embed a dataset with a DualEncoder; ``datasets`` reads CLIP_benchmark's
local webdataset layout; ``report`` writes results and prints tables.
"""

from clipkit.evaluation.datasets import ClipBenchmarkWds, EvalDataError, write_clip_benchmark_wds
from clipkit.evaluation.metrics import retrieval_metrics, zeroshot_metrics
from clipkit.evaluation.report import format_table, result_json, write_result
from clipkit.evaluation.retrieval import evaluate_retrieval
from clipkit.evaluation.zeroshot import build_classifier, evaluate_zeroshot

__all__ = [
    "ClipBenchmarkWds",
    "EvalDataError",
    "build_classifier",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "format_table",
    "result_json",
    "retrieval_metrics",
    "write_clip_benchmark_wds",
    "write_result",
    "zeroshot_metrics",
]
