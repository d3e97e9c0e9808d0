"""The preset registry: every combination rule d = a_k g_p + b_k g, registered once.

A preset is a name, its knobs (a pydantic model: defaults, bounds, descriptions), its 4x2 table
of coefficients as a function of the knobs, and its label in run names. Everything else is
derived from this registry: the typed ``optimizer:`` mapping (``samstudy.optim.config``),
``create_optimizer``, validation messages, run names, and the preset table of
``docs/optimizers.md`` (:func:`markdown_table`, checked by a test).

Adding a variant is one registration here plus one test (docs/optimizers.md, "Adding a variant").
This module imports pydantic only: study files validate without loading torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

REGIONS = ("ckpt1", "ckpt2", "ckpt3", "ckpt4")
REGION_KEYS = (*REGIONS, "zero")

Row = tuple[float, float]
Table = tuple[Row, Row, Row, Row]

SAM_ROW: Row = (1.0, 0.0)
SGD_ROW: Row = (0.0, 1.0)
IDENTITY: Table = (SAM_ROW, SAM_ROW, SAM_ROW, SAM_ROW)

# A finite number; ints are accepted, strings and booleans are not (a YAML typo stays an error).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Knobs(BaseModel):
    """A preset's own knobs (``scales``, ``alpha``, ...); no knobs is ``Knobs`` itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Preset:
    """One registered combination rule (see the module docstring)."""

    name: str
    knobs: type[Knobs]
    table: Callable[[Any], Table]  # knobs -> (a_k, b_k) for ckpt1..ckpt4
    label: Callable[[Any], str] | None  # knobs -> what follows the name in run names
    summary: str  # the closed form, for people
    rows: str = ""  # the table written with its knobs, when it has any
    two_step: bool = True  # False: one forward/backward, no ascent (``sgd``)
    example: dict[str, Any] = field(default_factory=dict)  # valid knobs, for docs and tests

    @property
    def knob_names(self) -> tuple[str, ...]:
        return tuple(self.knobs.model_fields)

    @property
    def labelled_knobs(self) -> tuple[str, ...]:
        """The knobs its run-name label shows (all of them, or none without a label)."""
        return self.knob_names if self.label is not None else ()


PRESETS: dict[str, Preset] = {}
# Set once samstudy.optim.config has built the typed union from PRESETS: a later registration
# would be missing from it, so it is refused instead of silently unusable.
_SEALED: list[bool] = []


def register_preset(
    name: str,
    *,
    summary: str,
    knobs: type[Knobs] = Knobs,
    label: Callable[[Any], str] | None = None,
    rows: str = "",
    two_step: bool = True,
    example: dict[str, Any] | None = None,
) -> Callable[[Callable[[Any], Table]], Callable[[Any], Table]]:
    """Register the decorated ``knobs -> table`` function as preset ``name``.

    ``example`` is one valid setting of the knobs: every preset is built, stepped against a
    reference and named from it by the tests, so a new preset is covered without editing them.
    """

    def register(table: Callable[[Any], Table]) -> Callable[[Any], Table]:
        if name in PRESETS:
            raise ValueError(f"optimizer preset {name!r} is registered twice")
        if _SEALED:
            raise RuntimeError(
                f"optimizer preset {name!r} registered after the typed config was built from "
                "the registry: register presets in samstudy/optim/presets.py"
            )
        preset = Preset(name, knobs, table, label, summary, rows, two_step, dict(example or {}))
        preset.table(knobs.model_validate(preset.example))  # a bad example fails at import
        PRESETS[name] = preset
        return table

    return register


def fmt(value: Any) -> str:
    """Compact text of a knob value for run names: ``1``, ``0.5``, ``[1,0,0,0]``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    return str(value)


def _same_rows(k: Any) -> Table:
    return tuple((1.0 + s, 0.0) for s in k.scales)  # type: ignore[return-value]


# -- knob models -------------------------------------------------------------------------------


class Scales(Knobs):
    scales: tuple[Number, Number, Number, Number] = Field(
        description="4 numbers [s1, s2, s3, s4]: d = (1 + s_k) g_p in region k"
    )


class CustomScales(Scales):
    @model_validator(mode="after")
    def _sign_pattern(self) -> CustomScales:
        s1, s2, s3, s4 = self.scales
        if not (s1 > 0 and s2 == 0 and -1 <= s3 < 0 and s4 > 0):
            raise ValueError(
                "scales: custom_same raises ckpt1, keeps ckpt2, lowers ckpt3, raises ckpt4: "
                f"allowed s1 > 0, s2 = 0, -1 <= s3 < 0, s4 > 0; got {fmt(self.scales)}"
            )
        return self


class Alpha(Knobs):
    alpha: Number = Field(description="the coefficient of g_p in ckpt2 (0 < r < 1)")


class Region(Knobs):
    region: int = Field(strict=True, ge=1, le=4, description="1, 2, 3 or 4 (ckpt1..ckpt4)")


class Coefficients(Knobs):
    coefficients: tuple[
        tuple[Number, Number], tuple[Number, Number], tuple[Number, Number], tuple[Number, Number]
    ] = Field(description="4 rows [a_k, b_k], one per region ckpt1..ckpt4: d = a_k g_p + b_k g")


# -- the presets -------------------------------------------------------------------------------


@register_preset("sgd", summary="d = g", two_step=False)
def _sgd(k: Knobs) -> Table:
    return (SGD_ROW, SGD_ROW, SGD_ROW, SGD_ROW)


@register_preset("sam", summary="d = g_p")
def _sam(k: Knobs) -> Table:
    return IDENTITY


@register_preset(
    "same",
    knobs=Scales,
    label=lambda k: fmt(k.scales),
    rows="(1+s1,0) (1+s2,0) (1+s3,0) (1+s4,0)",
    summary="d = g_p + s_k g_p; SAMECHECKPOINTk: only s_k != 0 (the lab notes' g_p + g_p·mask "
    "is s_k = 1)",
    example={"scales": [1.0, 0, 0, 0]},
)
def _same(k: Scales) -> Table:
    return _same_rows(k)


@register_preset(
    "custom_same",
    knobs=CustomScales,
    label=lambda k: fmt(k.scales),
    rows="as `same`",
    summary="raise ckpt1, keep ckpt2, lower ckpt3, raise ckpt4 "
    "(s1 > 0, s2 = 0, -1 <= s3 < 0, s4 > 0)",
    example={"scales": [0.5, 0, -0.5, 1.0]},
)
def _custom_same(k: CustomScales) -> Table:
    return _same_rows(k)


@register_preset("sam_magnitude_sgd_sign", summary="d = \\|g_p\\| sign(g)")
def _sam_magnitude_sgd_sign(k: Knobs) -> Table:
    return ((1.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (-1.0, 0.0))


@register_preset("sgd_magnitude_sam_sign", summary="d = \\|g\\| sign(g_p)")
def _sgd_magnitude_sam_sign(k: Knobs) -> Table:
    return ((0.0, 1.0), (0.0, 1.0), (0.0, -1.0), (0.0, -1.0))


@register_preset("sam_where_agree", summary="d = g_p where r > 0, else 0 (SAMANATOMY: drop r < 0)")
def _sam_where_agree(k: Knobs) -> Table:
    return ((1.0, 0.0), (1.0, 0.0), (0.0, 0.0), (0.0, 0.0))


@register_preset("sgd_where_agree", summary="d = g where r > 0, else 0")
def _sgd_where_agree(k: Knobs) -> Table:
    return ((0.0, 1.0), (0.0, 1.0), (0.0, 0.0), (0.0, 0.0))


@register_preset(
    "saner",
    knobs=Alpha,
    label=lambda k: f"(a{fmt(k.alpha)})",
    rows="(1,0) (alpha,0) (1,0) (1,0)",
    summary="SANER: down-weight 0 < r < 1 by alpha",
    example={"alpha": 0.25},
)
def _saner(k: Alpha) -> Table:
    return ((1.0, 0.0), (k.alpha, 0.0), (1.0, 0.0), (1.0, 0.0))


class Beta(Knobs):
    beta: Number = Field(ge=0, le=1, description="the coefficient of g_p where r <= 0, in [0, 1]")


@register_preset(
    "sam_damp_disagree",
    knobs=Beta,
    label=lambda k: f"(b{fmt(k.beta)})",
    rows="(1,0) (1,0) (beta,0) (beta,0)",
    summary="damp r <= 0 by beta: `sam` at 1, `sam_where_agree` at 0 (Project 2)",
    example={"beta": 0.5},
)
def _sam_damp_disagree(k: Beta) -> Table:
    return ((1.0, 0.0), (1.0, 0.0), (k.beta, 0.0), (k.beta, 0.0))


@register_preset(
    "sgd_on_region",
    knobs=Region,
    label=lambda k: str(k.region),
    rows="(0,1) on region k, (1,0) elsewhere",
    summary='the group\'s "SGD-Gr" runs',
    example={"region": 2},
)
def _sgd_on_region(k: Region) -> Table:
    rows = [SAM_ROW] * 4
    rows[k.region - 1] = SGD_ROW
    return tuple(rows)  # type: ignore[return-value]


@register_preset(
    "table",
    knobs=Coefficients,
    rows="as given",
    summary="any rule that is linear inside each region",
    example={"coefficients": [[1, 0.5], [2, 1], [0.5, -1], [-1, 2]]},
)
def _table(k: Coefficients) -> Table:
    return tuple((a, b) for a, b in k.coefficients)  # type: ignore[return-value]


# -- documentation -------------------------------------------------------------------------------


def _row_text(table: Table) -> str:
    return " ".join(f"({fmt(a)},{fmt(b)})" for a, b in table)


def _knob_text(preset: Preset) -> str:
    if not preset.two_step:
        return "(none; one pass)"
    parts = []
    for knob, info in preset.knobs.model_fields.items():
        parts.append(f"`{knob}`: {info.description}" if info.description else f"`{knob}`")
    return "; ".join(parts)


DOCS_BEGIN = "<!-- presets: generated by `make docs` from samstudy/optim/presets.py -->"
DOCS_END = "<!-- presets: end -->"


def markdown_table(presets: Sequence[Preset] | None = None) -> str:
    """The preset table of docs/optimizers.md, generated from the registry."""
    lines = [
        "| name | knobs | (a, b) for ckpt1, ckpt2, ckpt3, ckpt4 | closed form |",
        "|---|---|---|---|",
    ]
    for preset in presets or PRESETS.values():
        rows = preset.rows or _row_text(preset.table(preset.knobs.model_validate(preset.example)))
        lines.append(f"| `{preset.name}` | {_knob_text(preset)} | {rows} | {preset.summary} |")
    return "\n".join(lines)


def write_docs(path: str) -> bool:
    """Replace the preset table between the markers of ``path``; True if it changed."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    head, begin, rest = text.partition(DOCS_BEGIN)
    _, end, tail = rest.partition(DOCS_END)
    if not begin or not end:
        raise ValueError(f"{path}: no {DOCS_BEGIN!r} ... {DOCS_END!r} markers")
    new = f"{head}{DOCS_BEGIN}\n{markdown_table()}\n{DOCS_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(new)
    return new != text
