"""The GPU bench (benchmarks/bench_gpu.py) end to end on the CPU with tiny sizes.

No GPU has been lent yet: this runs every part of the bench (the SGD/SAM matrix with and
without ``torch.compile``, every preset against SAM, Ray tasks sharing a logical GPU in 0.5 and
0.25 slices) on the CPU and checks the Markdown it writes. Speed is not checked here, only that
the tables are complete and their numbers plausible; the figures come from a GPU run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from benchmarks import __main__ as bench_main
from benchmarks import bench_gpu
from samstudy.optim import PRESETS

RESULT = Path(bench_main.__file__).resolve().parent / "results" / "bench_gpu.md"


def table(text: str, heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the first Markdown table at or after ``heading``."""
    lines = text[text.index(heading) :].splitlines()
    rows, seen = [], False
    for line in lines if heading.startswith("|") else lines[1:]:
        if line.startswith("|"):
            seen = True
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif seen:
            break
    assert rows and set(rows[1][0]) <= set("-:"), f"no table after {heading!r}"
    return rows[2:]


def number(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix("x"))


def positive(*cells: str) -> None:
    for cell in cells:
        value = number(cell)
        assert math.isfinite(value) and value > 0, cells


@pytest.fixture
def local_ray() -> Iterator[None]:
    # A logical GPU: Ray schedules the fractional-GPU tasks; they train on the CPU they find.
    ray.init(num_gpus=1, num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_table(local_ray: None, tmp_path: Path) -> None:
    before = RESULT.read_bytes() if RESULT.exists() else None
    out = tmp_path / "bench_gpu_cpu_smoke.md"
    # 20 images in batches of 8: a shorter last batch, whose shape the warm-up must compile.
    argv = ["--device", "cpu", "--out", str(out), "--images", "20", "--batch", "8"]
    argv += ["--warmup-steps", "1", "--preset-steps", "1", "--preset-pairs", "1"]
    argv += ["--model", "cnn"]  # the same code as ResNet-18, smaller
    # Dynamo's graphs (the warm-up / timed counts below) without inductor's C++ build on a CPU
    argv += ["--compile-backend", "aot_eager"]
    assert bench_gpu.main(argv) == 0
    text = out.read_text()
    assert text.startswith("## GPU bench, CPU smoke run of cnn (not GPU figures)")
    assert "torch.compile backend aot_eager" in text

    targets = {row[0]: row[1] for row in table(text, "| target |")}
    assert len(targets) == 3 and set(targets.values()) <= {"pass", "fail"}, targets

    matrix = table(text, "### SGD and SAM epochs")
    assert [(r[0], r[1]) for r in matrix] == [
        ("fp32", "eager"),
        ("fp32", "torch.compile"),
        ("bf16", "eager"),
        ("bf16", "torch.compile"),
    ]
    for _, mode, sgd_s, sam_s, sgd_rate, sam_rate, ratio, ok, graphs in matrix:
        positive(sgd_s, sam_s, sgd_rate, sam_rate, ratio)
        # the median over block pairs, near the ratio of the median step times
        assert number(ratio) == pytest.approx(number(sam_s) / number(sgd_s), rel=0.2)
        assert ok == ("pass" if number(ratio) <= bench_gpu.SAM_OVER_SGD_MAX else "fail")
        assert number(sam_rate) == pytest.approx(20 / number(sam_s), rel=0.05, abs=1)
        # every shape an epoch meets was compiled in the warm-up, not inside the timing
        warm, timed = (int(n) for n in graphs.split(" / "))
        assert timed == 0, graphs
        if mode == "torch.compile":
            assert warm > 0, graphs

    presets = table(text, "### Every preset against SAM")
    assert [r[0] for r in presets] == list(PRESETS)
    for name, _knobs, mine, ref, ratio, ok in presets:
        positive(mine, ref, ratio)
        if PRESETS[name].two_step:
            assert ok == ("pass" if number(ratio) <= bench_gpu.PRESET_OVER_SAM_MAX else "fail")
        else:
            assert ok == "n/a (one pass)"

    sharing = table(text, "### Trials sharing one GPU")
    assert [(r[0], r[1], r[2]) for r in sharing] == [
        ("1", "1", "cpu"),
        ("2", "0.5", "cpu"),
        ("4", "0.25", "cpu"),
    ]
    for _count, _gpu, _dev, per_trial, aggregate, gain, _ok in sharing:
        positive(per_trial, aggregate, gain)
    assert sharing[0][5] == "1.00x"
    assert sharing[2][6] in {"pass", "fail"}
    # a CPU run never lands where the GPU figures belong
    assert (RESULT.read_bytes() if RESULT.exists() else None) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip is for machines without CUDA")
def test_make_bench_without_cuda_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    before = RESULT.read_bytes() if RESULT.exists() else None
    assert bench_main.main(["--only", "gpu"]) == 0
    assert "CUDA is not available" in capsys.readouterr().out
    assert (RESULT.read_bytes() if RESULT.exists() else None) == before


def test_unknown_part_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown parts"):
        bench_gpu.bench(torch.device("cpu"), bench_gpu.Sizes(parts=("matrix", "gpu")))


def test_a_failing_row_or_part_is_reported_and_the_rest_runs(tmp_path: Path) -> None:
    # One shot on a lent GPU: an error (a compile, say) must cost its row, not the run.
    sizes = bench_gpu.Sizes(images=8, batch=4, warmup_steps=1, epochs=1, preset_steps=1,
                            preset_pairs=1, compile=(False,), precisions=("fp32",),
                            parts=("matrix", "presets"), model="no_such_model")  # fmt: skip
    text = bench_gpu.bench(torch.device("cpu"), sizes)
    matrix = table(text, "### SGD and SAM epochs")
    assert [r[:2] for r in matrix] == [["fp32", "eager"]] and len(matrix[0]) == 9
    assert matrix[0][2].startswith("error: ") and "no_such_model" in matrix[0][2]
    assert "### presets: failed" in text and "no_such_model" in text
    targets = {row[0]: row[1] for row in table(text, "| target |")}
    assert targets["SAM <= 2.05x SGD (every precision and model mode)"] == "fail"
    assert targets["every preset <= 1.05x SAM"] == "error (see its section)"
    assert targets["4 trials sharing >= 2x one trial alone"] == "not run"
