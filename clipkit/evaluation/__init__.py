"""Zero-shot classification, retrieval and linear probes, with CLIP_benchmark's definitions and result format.

Pure metric functions over tensors live in ``metrics``; ``zeroshot``, ``retrieval`` and
``linear_probe`` are drivers that embed a dataset with a model (``embed``, split across ranks
by ``distributed``); datasets come from ``dataspec.open_dataset`` (``datasets``: CLIP_benchmark
and clipkit shards, ``folders``: class folders and manifests); models from
``clipkit.models.specs.load_model``; suites (``suite``) run through ``runner``; ``report`` and
``plots`` write results; ``cached`` scores many states of a locked-tower model for one tower pass.
"""

from clipkit.evaluation.datasets import ClipBenchmarkWds, ClipkitShards, write_clip_benchmark_wds
from clipkit.evaluation.dataspec import open_dataset
from clipkit.evaluation.linear_probe import evaluate_linear_probe
from clipkit.evaluation.metrics import retrieval_metrics, zeroshot_metrics
from clipkit.evaluation.report import format_table, result_json, write_result
from clipkit.evaluation.retrieval import evaluate_retrieval
from clipkit.evaluation.source import EvalDataError
from clipkit.evaluation.zeroshot import build_classifier, evaluate_zeroshot, run_zeroshot

__all__ = [
    "ClipBenchmarkWds",
    "ClipkitShards",
    "EvalDataError",
    "build_classifier",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "format_table",
    "open_dataset",
    "result_json",
    "retrieval_metrics",
    "run_zeroshot",
    "write_clip_benchmark_wds",
    "write_result",
    "zeroshot_metrics",
]
