"""Export studies from MLflow to Parquet, and analyse them offline.

Everything here except ``export`` and ``readers`` (and ``synthetic``) reads Parquet only and
never imports MLflow, so a copy of ``results/`` is enough to analyse a study::

    from samstudy.analysis import load_study, curves, verdict_table
    study = load_study("quickstart")                 # results/{runs,metrics}/study=quickstart
    print(verdict_table(study, reference="sam"))

``export_study`` is imported lazily (it needs MLflow).
"""

from __future__ import annotations

from typing import Any

from samstudy.analysis.aggregate import (
    DEFAULT_REFERENCE,
    DEFAULT_STAGES,
    STAGE_METRICS,
    curves,
    differences,
    direction,
    final_and_best,
    final_best_table,
    grid_table,
    heatmap_pairs,
    match_references,
    seed_aggregate,
    stage_values,
)
from samstudy.analysis.load import (
    Study,
    assign_variants,
    load_metrics,
    load_runs,
    load_study,
    varying_params,
)
from samstudy.analysis.schema import METRICS_SCHEMA, exported_studies, runs_schema
from samstudy.analysis.verdicts import (
    LAB_NOTES,
    RULE,
    VERDICTS,
    hypothesis_table,
    stage_differences,
    verdict,
    verdict_table,
    with_lab_notes,
)

__all__ = [
    "DEFAULT_REFERENCE",
    "DEFAULT_STAGES",
    "LAB_NOTES",
    "METRICS_SCHEMA",
    "RULE",
    "STAGE_METRICS",
    "VERDICTS",
    "Study",
    "assign_variants",
    "build_report",
    "curves",
    "differences",
    "direction",
    "export_study",
    "exported_studies",
    "final_and_best",
    "final_best_table",
    "grid_table",
    "heatmap_pairs",
    "hypothesis_table",
    "load_metrics",
    "load_runs",
    "load_study",
    "match_references",
    "runs_schema",
    "seed_aggregate",
    "stage_differences",
    "stage_values",
    "varying_params",
    "verdict",
    "verdict_table",
    "with_lab_notes",
]


def __getattr__(name: str) -> Any:
    # Lazy: export pulls in MLflow, the report pulls in matplotlib; neither is needed to load.
    if name == "export_study":
        from samstudy.analysis.export import export_study

        return export_study
    if name == "build_report":
        from samstudy.analysis.report import build_report

        return build_report
    raise AttributeError(f"module 'samstudy.analysis' has no attribute {name!r}")
