"""Export studies from MLflow to Parquet, and analyse them offline.

Everything here except ``export`` and ``readers`` (and ``synthetic``) reads Parquet only and
never imports MLflow, so a copy of ``results/`` is enough to analyse a study::

    from samstudy.analysis import load_study, curves, verdict_table
    study = load_study("quickstart")                 # results/{runs,metrics}/study=quickstart
    print(verdict_table(study, reference="sam"))

Names are imported on first use: ``export_study`` needs MLflow, the report matplotlib, and
the study file's schema (``comparisons``) is imported by ``samstudy.study.spec`` without pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

# Every name of the API and the module that defines it. Loaded on first use (PEP 562), so that
# ``samstudy.study.spec`` can take the ``analysis:`` block's schema from
# ``samstudy.analysis.comparisons`` without pandas, and so that ``export_study`` (MLflow) and
# ``build_report`` (matplotlib) cost nothing until they are called.
_HOME: dict[str, str] = {
    **dict.fromkeys(
        (
            "DEFAULT_REFERENCE",
            "DEFAULT_STAGES",
            "STAGE_METRICS",
            "curves",
            "differences",
            "direction",
            "final_and_best",
            "final_best_table",
            "grid_table",
            "heatmap_pairs",
            "match_references",
            "reference_pairs",
            "seed_aggregate",
            "stage_values",
        ),
        "aggregate",
    ),
    **dict.fromkeys(
        ("AnalysisSpec", "parse_reference", "read_analysis", "study_analysis"), "comparisons"
    ),
    **dict.fromkeys(
        ("Study", "assign_variants", "load_metrics", "load_runs", "load_study", "varying_params"),
        "load",
    ),
    **dict.fromkeys(("METRICS_SCHEMA", "exported_studies", "runs_schema"), "schema"),
    **dict.fromkeys(
        (
            "LAB_NOTES",
            "RULE",
            "VERDICTS",
            "hypothesis_table",
            "stage_differences",
            "verdict",
            "verdict_table",
            "with_lab_notes",
        ),
        "verdicts",
    ),
    "export_study": "export",
    "build_report": "report",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'samstudy.analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
