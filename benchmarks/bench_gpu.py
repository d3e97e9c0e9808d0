"""GPU bench: ResNet-18 epochs of SGD and SAM, every preset against SAM, trials sharing a GPU.

Everything runs the trainer's own code: ``samstudy.train.loop.train_epoch`` (the loop
``run_trial`` runs, calling ``optimizer.train_step``) over the device-resident ``DeviceLoader``
(crop and flip on the device), models from ``create_model`` and optimizers from
``create_optimizer``. The data is CIFAR-shaped noise (3x32x32, 10 classes) generated on the
device. Three parts, each a Markdown table:

* matrix: epoch time of SGD and SAM, fp32 and bf16 autocast, eager and ``torch.compile`` of the
  model, channels_last throughout, in interleaved blocks of steps (target: SAM <= 2.05x SGD);
* presets: every entry of ``PRESETS`` (its registered example knobs) against plain SAM, in
  interleaved blocks of steps, bf16 + channels_last eager as trials run (target: <= 1.05x);
* sharing (``benchmarks/gpu_sharing.py``): one trial alone, 2 and 4 trials as Ray tasks with
  0.5 / 0.25 GPU each, aggregate samples/s (target: 4 sharing >= 2x one alone).

Targets are reported as pass/fail columns, not asserted. ``python -m benchmarks --only gpu``
runs it (only with CUDA: without it nothing is written); ``python -m benchmarks.bench_gpu
--device cpu --images 64 --batch 8 --out /tmp/smoke.md`` is a CPU smoke run of the same code.
Full size: 50,000 images, batch 128, an epoch's worth of timed steps per optimizer and matrix
row; the first run on an H200 took 303 s (under the 8 minutes it is sized for).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RECIPE: dict[str, Any] = {"base": "sgd", "lr": 0.05, "rho": 0.05, "momentum": 0.9,
                          "weight_decay": 5e-4}  # fmt: skip
PARTS = ("matrix", "presets", "sharing")
SAM_OVER_SGD_MAX = 2.05
PRESET_OVER_SAM_MAX = 1.05
SHARED_4_MIN = 2.0


@dataclass(frozen=True)
class Sizes:
    """Size knobs: the defaults are the full GPU run, a CPU test shrinks them.

    The presets and sharing parts run bf16 autocast when ``precisions`` has it (what a trial on
    a GPU runs: ``precision: auto``), fp32 otherwise.
    """

    images: int = 50_000
    batch: int = 128
    warmup_steps: int = 20  # before every timed epoch/block (compiling included)
    epochs: int = 1  # epochs' worth of timed steps per optimizer and matrix row
    matrix_blocks: int = 4  # ... split into this many interleaved (SGD block, SAM block) pairs
    preset_steps: int = 40  # steps per timed block in the preset comparison
    # interleaved (preset block, SAM block) pairs per preset; even, so each side goes first
    # equally often
    preset_pairs: int = 4
    share_epochs: int = 1  # epochs each trial trains in the sharing part
    share_counts: tuple[int, ...] = (1, 2, 4)
    precisions: tuple[str, ...] = ("fp32", "bf16")
    compile: tuple[bool, ...] = (False, True)
    # torch.compile's backend: a CPU smoke run takes "aot_eager" (Dynamo's graphs, counted the
    # same, without the minutes of C++ that inductor builds on a CPU)
    compile_backend: str = "inductor"
    parts: tuple[str, ...] = PARTS
    model: str = "resnet18"


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels: a host clock read after this times their work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(images: int, batch: int, device: torch.device, seed: int = 0) -> Any:
    """CIFAR-shaped random data generated on ``device`` behind the trainer's DeviceLoader."""
    from samstudy.data import DeviceLoader

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(images, 3, 32, 32, generator=gen, device=device)
    y = torch.randint(0, 10, (images,), generator=gen, device=device)
    noisy = torch.zeros(images, dtype=torch.bool, device=device)
    fill = torch.zeros(3, device=device)
    return DeviceLoader(x, y, y, noisy, batch, seed=seed, augment=True, fill=fill, device=device)


class Trainer:
    """A model and an optimizer stepped by the trainer's ``train_epoch`` (timed, synchronised)."""

    def __init__(
        self,
        model_name: str,
        optimizer: dict[str, Any],
        device: torch.device,
        *,
        bf16: bool,
        compiled: bool = False,
        backend: str = "inductor",
        model: torch.nn.Module | None = None,
    ) -> None:
        from samstudy.models import create_model
        from samstudy.optim import create_optimizer

        torch.manual_seed(0)
        if model is None:
            model = create_model(model_name, 10, (3, 32, 32))
            model = model.to(device, memory_format=torch.channels_last)
            if compiled:
                # In place: parameter names stay those of the model, which the second pass of
                # SAM (functional_call by name) needs. Static shapes: the last, shorter batch
                # gets its own graph instead of turning every batch's graph dynamic.
                model.compile(dynamic=False, backend=backend)
        self.model, self.device, self.bf16 = model, device, bf16
        self.optimizer = create_optimizer(model.named_parameters(), **{**RECIPE, **optimizer})
        self.epoch = 0

    def steps(self, batches: Iterable[Any], max_steps: int | None = None) -> float:
        """Seconds for ``train_epoch`` over ``batches``, device work included."""
        from samstudy.train.loop import train_epoch

        sync(self.device)
        start = time.perf_counter()
        train_epoch(self.model, self.optimizer, None, batches, bf16=self.bf16,
                    channels_last=True, max_steps=max_steps)  # fmt: skip
        sync(self.device)
        return time.perf_counter() - start

    def epoch_on(self, loader: Any, max_steps: int | None = None) -> float:
        self.epoch += 1
        loader.set_epoch(self.epoch)
        return self.steps(loader, max_steps)

    def warm_up(self, loader: Any, steps: int) -> None:
        """First batches plus the last (shorter) one: compiles every shape an epoch meets.

        At least 2 steps: a step measuring statistics and one that does not (different kernels
        where the optimizer compiles its rule).
        """
        loader.set_epoch(0)
        first, last = max(steps, 2), len(loader) - 1
        self.steps([b for i, b in enumerate(loader) if i < first or i == last])
        self.optimizer.read_stats(reset=True)


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled so far in this process (a private counter; -1 if missing)."""
    try:
        return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    except (AttributeError, KeyError, TypeError):
        return -1


def verdict(ok: bool) -> str:
    return "pass" if ok else "fail"


def failure(exc: BaseException) -> str:
    """One table-safe line for an exception: its type and the start of its message."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("|", "/")
    return text if len(text) <= 160 else text[:157] + "..."


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- part 1: SGD and SAM epochs ------------------------------------------------------------------


def alternate(sides: list[str], i: int) -> list[str]:
    """The order of pair ``i``'s blocks: reversed every other pair (A B, B A, ...), so that a
    cost of running first or second (a sync, a cold cache) falls on both sides alike."""
    return sides if i % 2 == 0 else sides[::-1]


def _block(trainer: Trainer, loader: Any, steps: int) -> float:
    trainer.optimizer.read_stats(reset=True)  # every block measures statistics on the same steps
    return trainer.epoch_on(loader, max_steps=steps) / steps


def matrix_section(device: torch.device, sizes: Sizes, loader: Any) -> tuple[str, list[bool]]:
    """SGD and SAM on models of their own, timed in alternating blocks of steps: the host's
    speed drifts by 10-20% over a minute on a lent machine, and both sides see the same drift."""
    rows = [
        "| precision | model | SGD epoch (s) | SAM epoch (s) | SGD samples/s | SAM samples/s "
        f"| SAM / SGD | SAM <= {SAM_OVER_SGD_MAX}x SGD | graphs compiled: warm-up / timed |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    steps = min(len(loader), max(1, -(-len(loader) * sizes.epochs // sizes.matrix_blocks)))
    ok: list[bool] = []
    for precision in sizes.precisions:
        for compiled in sizes.compile:
            mode = "torch.compile" if compiled else "eager"
            step_s: dict[str, list[float]] = {"sgd": [], "sam": []}
            try:
                # Past Dynamo's recompile limit a model would run eager silently: fail instead.
                with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                    start = graphs_compiled()
                    bf16 = precision == "bf16"
                    trainers = {
                        name: Trainer(
                            sizes.model,
                            {"name": name},
                            device,
                            bf16=bf16,
                            compiled=compiled,
                            backend=sizes.compile_backend,
                        )
                        for name in step_s
                    }
                    for trainer in trainers.values():
                        trainer.warm_up(loader, sizes.warmup_steps)
                    warm = graphs_compiled()
                    for i in range(sizes.matrix_blocks):
                        for name in alternate(list(trainers), i):
                            step_s[name].append(_block(trainers[name], loader, steps))
                    graphs = (warm - start, graphs_compiled() - warm)
            except Exception as exc:  # one failing mode (a compile, say) keeps the other rows
                traceback.print_exc()
                ok.append(False)
                rows.append(f"| {precision} | {mode} | error: {failure(exc)} |" + " |" * 6)
                print(rows[-1], flush=True)
                continue
            finally:
                trainers = {}
                free(device)
            epoch = {name: statistics.median(t) * len(loader) for name, t in step_s.items()}
            pairs = zip(step_s["sam"], step_s["sgd"], strict=True)
            ratio = statistics.median(sam / sgd for sam, sgd in pairs)
            ok.append(round(ratio, 3) <= SAM_OVER_SGD_MAX)  # as printed: 1.050 passes
            rows.append(
                f"| {precision} | {mode} | {epoch['sgd']:.4g} | {epoch['sam']:.4g} "
                f"| {sizes.images / epoch['sgd']:,.0f} | {sizes.images / epoch['sam']:,.0f} "
                f"| {ratio:.3f} | {verdict(ok[-1])} | {graphs[0]} / {graphs[1]} |"
            )
            print(rows[-1], flush=True)
    text = (
        f"### SGD and SAM epochs ({sizes.images:,} images, batch {sizes.batch}, channels_last)\n\n"
        f"Per row: {sizes.warmup_steps} warm-up steps and the last batch, then "
        f"{sizes.matrix_blocks} interleaved pairs of {steps}-step blocks (SGD and SAM in turn "
        "first); an epoch is the median step time x steps per epoch, the ratio the median over "
        "pairs.\n\n" + "\n".join(rows) + "\n"
    )
    return text, ok


# -- part 2: every preset against SAM ------------------------------------------------------------


def presets_section(device: torch.device, sizes: Sizes, loader: Any) -> tuple[str, list[bool]]:
    """Each preset in blocks alternating with plain SAM on one model: load drifts cancel."""
    from samstudy.models import create_model
    from samstudy.optim import PRESETS
    from samstudy.optim.config import DEFAULT_STATS_EVERY

    model = create_model(sizes.model, 10, (3, 32, 32))
    model = model.to(device, memory_format=torch.channels_last)
    bf16 = "bf16" in sizes.precisions
    sam = Trainer(sizes.model, {"name": "sam"}, device, bf16=bf16, model=model)
    sam.warm_up(loader, sizes.warmup_steps)
    steps = min(sizes.preset_steps, len(loader))
    rows = [
        f"| preset | knobs | preset step (ms) | SAM step (ms) | preset / SAM "
        f"| <= {PRESET_OVER_SAM_MAX}x SAM |",
        "|---|---|---:|---:|---:|---|",
    ]
    ok: list[bool] = []
    for name, preset in PRESETS.items():
        trainer = Trainer(sizes.model, {"name": name, **preset.example}, device, bf16=bf16,
                          model=model)  # fmt: skip
        trainer.warm_up(loader, min(2, sizes.warmup_steps))
        times: dict[str, list[float]] = {"preset": [], "sam": []}
        for i in range(sizes.preset_pairs):
            for side in alternate(["preset", "sam"], i):
                times[side].append(_block(trainer if side == "preset" else sam, loader, steps))
        mine, ref = times["preset"], times["sam"]
        ratios = [a / b for a, b in zip(mine, ref, strict=True)]
        ratio = statistics.median(ratios)
        if preset.two_step:
            ok.append(round(ratio, 3) <= PRESET_OVER_SAM_MAX)  # as printed
            cell = verdict(ok[-1])
        else:
            cell = "n/a (one pass)"
        knobs = ", ".join(f"{k}={v}" for k, v in preset.example.items()) or "-"
        rows.append(
            f"| {name} | {knobs} | {statistics.median(mine) * 1e3:.4g} "
            f"| {statistics.median(ref) * 1e3:.4g} | {ratio:.3f} | {cell} |"
        )
        print(rows[-1], flush=True)
        del trainer
    precision = "bf16 autocast" if bf16 else "fp32"
    text = (
        f"### Every preset against SAM ({precision}, channels_last, eager model, optimizer "
        f"defaults: statistics every {DEFAULT_STATS_EVERY} steps)\n\n"
        f"{sizes.preset_pairs} interleaved pairs of {steps}-step blocks (preset and plain SAM on "
        "the same model, in turn first); step times are medians, the ratio the median over "
        "pairs.\n\n" + "\n".join(rows) + "\n"
    )
    del sam, model
    free(device)
    return text, ok


# -- the whole bench ------------------------------------------------------------------------------


def bench(device: torch.device, sizes: Sizes) -> str:
    """The Markdown of every part in ``sizes.parts`` on ``device``."""
    unknown = set(sizes.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; allowed: {', '.join(PARTS)}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        title = f"## GPU bench: {sizes.model} on {name}"
        # "fp32" rows run PyTorch's defaults, which may let convolutions use TF32: say which
        env = (
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, cudnn.allow_tf32 "
            f"{torch.backends.cudnn.allow_tf32}, cudnn.benchmark {torch.backends.cudnn.benchmark}"
            f", float32 matmul precision {torch.get_float32_matmul_precision()}"
        )
    else:
        title = f"## GPU bench, CPU smoke run of {sizes.model} (not GPU figures)"
        env = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    if sizes.compile_backend != "inductor":  # the default goes unsaid
        env += f", torch.compile backend {sizes.compile_backend}"
    sections: list[str] = []
    targets: dict[str, list[bool]] = {}
    took: dict[str, float] = {}
    failed: set[str] = set()

    def timed(part: str, make: Callable[[], tuple[str, list[bool]]]) -> None:
        """Runs one part; a part that raises is reported in its place and the next one runs."""
        start = time.perf_counter()
        try:
            text, targets[part] = make()
        except Exception as exc:
            traceback.print_exc()
            text, targets[part] = f"### {part}: failed\n\n{failure(exc)}\n", [False]
            failed.add(part)
        took[part] = time.perf_counter() - start
        sections.append(text)
        print(f"-- {part}: {took[part]:.0f} s", flush=True)

    if "matrix" in sizes.parts or "presets" in sizes.parts:
        loader = make_loader(sizes.images, sizes.batch, device)
        if "matrix" in sizes.parts:
            timed("matrix", lambda: matrix_section(device, sizes, loader))
        if "presets" in sizes.parts:
            timed("presets", lambda: presets_section(device, sizes, loader))
        del loader  # the sharing trials need the device's memory more than this process
        free(device)
    if "sharing" in sizes.parts:
        from benchmarks.gpu_sharing import sharing_section

        timed("sharing", lambda: sharing_section(sizes))
    summary = ", ".join(f"{p} {s:.0f} s" for p, s in took.items())
    checks = [
        ("presets", "every preset <= 1.05x SAM"),
        ("matrix", "SAM <= 2.05x SGD (every precision and model mode)"),
        ("sharing", "4 trials sharing >= 2x one trial alone"),
    ]
    lines = ["| target | result |", "|---|---|"]
    for part, label in checks:
        ok = targets.get(part)
        result = "not run" if not ok else verdict(all(ok))  # [] too: no row it applies to
        if part in failed:
            result = "error (see its section)"
        lines.append(f"| {label} | {result} |")
    return (
        f"{title}\n\n{env}; CIFAR-shaped random data made on the device, crop and flip on the "
        f"device (`DeviceLoader`), the trainer's `train_epoch`. Parts took: {summary}.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(sections)
    )


def run(quick: bool = False) -> str | None:
    """``python -m benchmarks``: the full bench on CUDA; None (nothing written) without it."""
    if not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available; skipped, results/bench_gpu.md left as it is")
        return None
    sizes = Sizes(images=10_000, preset_steps=20, preset_pairs=1) if quick else Sizes()
    return bench(torch.device("cuda"), sizes)


def main(argv: list[str] | None = None) -> int:
    """CLI with every size knob: e.g. a CPU smoke run written to a scratch file."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    for field in dataclasses.fields(Sizes):
        default = field.default
        if isinstance(default, tuple):
            kind = bool if field.name == "compile" else type(default[0])
            convert = (lambda s: s.lower() in ("1", "true", "yes")) if kind is bool else kind
            parser.add_argument(f"--{field.name.replace('_', '-')}", nargs="+", type=convert,
                                default=list(default), help=f"default: {default}")  # fmt: skip
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default),
                                default=default, help=f"default: {default}")  # fmt: skip
    args = vars(parser.parse_args(argv))
    device, out = torch.device(args.pop("device")), args.pop("out")
    sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    text = bench(device, sizes)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
