"""The region rule, the SGD step and ASAM's ascent as one C loop per parameter tensor: the CPU
path.

Long because the C source of its four loops (the rule, the SGD step, both in one, ASAM's w + e)
lives here, beside the ctypes bindings and the checks against torch that must match it line for
line.

The eager rule (``rules._Masks``) is a dozen elementwise passes; on a 0.3M-parameter MLP each
pass costs about 1% of a SAM step, so a preset cost 13-50% on top of SAM. This loop reads g and
g_p once and writes d once, with the same IEEE operations in the same order as the eager rule,
so the region counts are the eager counts and, for finite g and g_p, d is bit for bit the eager
d (``tests/test_optim_native.py`` checks both on every boundary of the region table and on
random data; where g or g_p is infinite or NaN, a diverged step, d is not finite here while the
eager passes may keep g_p):

* h = g_p * (g / |g|) and the four threshold tests of ``rules`` (NaN where g = 0: no region);
* d = (g_p + A_k g_p) + B_k g with A_k = a_k - 1 and B_k = b_k of the coordinate's region k:
  each product and each sum rounded once, as ``torch.addcmul`` rounds them (``-ffp-contract=off``
  keeps the compiler from fusing them into one FMA); A = B = 0 outside the table's groups
  gives d = g_p, and the SGD row (A = -1, B = 1) gives exactly g.

:func:`sgd_step` is torch's single-tensor SGD step (weight decay, momentum, dampening, nesterov,
maximize) in one pass instead of four, with torch's roundings: ``SamOptimizer`` takes it for its
base step where it applies (``torch.optim.SGD`` on CPU tensors, no step hooks), a third to a half of
torch's time (42 us against 140 on the digits MLP, 3.4 ms against 7.5 on ResNet-18). With a
rule, ``sgd_step`` runs both in one loop (``RULE_SGD``): the step on d, which stays in a register.

:func:`adaptive_perturb` is ASAM's e and w + e (eta = 0) in one pass where torch makes four, with
their roundings in their order (``ascent.adaptive_perturbed`` calls it after w g's norm).

The library is built once per machine with the system C compiler (``$CC``, default ``cc``; 1-3
s) into ``$SAMSTUDY_KERNEL_CACHE`` (default ``~/.cache/samstudy/kernels``), keyed by
the source, the flags and the CPU's feature flags (``-march=native``), and loaded with ctypes.
Without a compiler, or with ``SAMSTUDY_NATIVE_KERNEL=0``, ``library()`` is None and the rule
runs its eager passes (one warning says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import itertools
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.optim import optimizer as _torch_optimizer

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

/* The table's coefficients by region as locals (index 0: the zero set): loaded once, before a
   loop whose stores the compiler could not otherwise tell apart from A and B. */
#define COEFS(T)                                                                             \
    const T A1 = A[1], A2 = A[2], A3 = A[3], A4 = A[4], A0 = A[0];                          \
    const T B1 = B[1], B2 = B[2], B3 = B[3], B4 = B[4], B0 = B[0];

/* Coordinate i's h = g_p * (g / |g|) and its four threshold tests (NaN where g = 0: none). */
#define MASKS(T, ABS)                                                                        \
    const T gi = g[i], pi = gp[i];                                                           \
    const T ag = ABS(gi);                                                                    \
    const T h = pi * (gi / ag);                                                              \
    const int ge = h >= ag, gt0 = h > 0, le = -h >= ag, le0 = h <= 0;

/* d of coordinate i into OUT. The region's coefficients by nested masks (ckpt1 inside gt0,
   ckpt3 inside le0), one select each: flat selects vectorise, a chain of ternaries would not. */
#define D_OF(T, OUT)                                                                         \
    {                                                                                        \
        T a = A0, b = B0;                                                                    \
        a = le0 ? A4 : a; b = le0 ? B4 : b;                                                  \
        a = le ? A3 : a;  b = le ? B3 : b;                                                   \
        a = gt0 ? A2 : a; b = gt0 ? B2 : b;                                                  \
        a = ge ? A1 : a;  b = ge ? B1 : b;                                                   \
        OUT = (pi + a * pi) + b * gi;                                                        \
    }

/* One loop per (dtype, want d, measure): the branches stay outside the loops, which the
   compiler vectorises (selects, no jumps). With ``counts`` ([gt0, ge, le0, le]) the loop also
   counts, and adds [<g, g_p>, <g_p, g_p>] to ``dots``. */
#define RULE(T, NAME, ABS)                                                                    \
void NAME(const T *g, const T *gp, T *d, int64_t n, const T *A, const T *B,                 \
          int64_t *counts, double *dots) {                                                   \
    COEFS(T)                                                                                 \
    if (counts == 0) {                                                                       \
        for (int64_t i = 0; i < n; i++) {                                                    \
            MASKS(T, ABS)                                                                    \
            D_OF(T, d[i])                                                                    \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    /* int32 sums per block of 2^30 coordinates: they vectorise, int64 ones did not (4x) */  \
    for (int64_t s = 0; s < n; s += (int64_t)1 << 30) {                                      \
        const int64_t e = n - s < ((int64_t)1 << 30) ? n : s + ((int64_t)1 << 30);           \
        int32_t c_gt0 = 0, c_ge = 0, c_le0 = 0, c_le = 0;                                    \
        for (int64_t i = s; i < e; i++) {                                                    \
            MASKS(T, ABS)                                                                    \
            c_gt0 += gt0; c_ge += ge; c_le0 += le0; c_le += le;                              \
            if (d) D_OF(T, d[i])                                                             \
        }                                                                                    \
        counts[0] += c_gt0; counts[1] += c_ge; counts[2] += c_le0; counts[3] += c_le;        \
    }                                                                                        \
    /* <g, g_p> and <g_p, g_p> in double (float products are exact there), 8 partial sums */ \
    double s1[8] = {0}, s2[8] = {0};                                                         \
    int64_t i = 0;                                                                           \
    for (; i + 8 <= n; i += 8)                                                               \
        for (int j = 0; j < 8; j++) {                                                        \
            const double p = gp[i + j];                                                      \
            s1[j] += (double)g[i + j] * p;                                                   \
            s2[j] += p * p;                                                                  \
        }                                                                                    \
    for (; i < n; i++) {                                                                     \
        const double p = gp[i];                                                              \
        s1[0] += (double)g[i] * p;                                                           \
        s2[0] += p * p;                                                                      \
    }                                                                                        \
    for (int j = 0; j < 8; j++) { dots[0] += s1[j]; dots[1] += s2[j]; }                      \
}

RULE(float, samstudy_rule_f32, fabsf)
RULE(double, samstudy_rule_f64, fabs)

/* torch's single-tensor SGD step on coordinate i of one tensor, gradient GRAD, with its
   roundings: on the CPU, torch's add with alpha (x + alpha * y) rounds once, as FMA does, and
   a product with a Scalar rounds on its own. torch makes four passes for it. */
#define SGD_UPDATE(T, FMA, GRAD)                                                             \
    {                                                                                        \
        T s = maxi ? -(GRAD) : (GRAD);                                                       \
        if (has_wd) s = FMA(p[i], wd, s);                /* grad.add(param, alpha=wd) */     \
        if (has_m) {                                                                         \
            T mb;                                                                            \
            if (first) mb = s;                           /* buf = grad.clone() */            \
            else { const T t = buf[i] * m; mb = FMA(s, damp1, t); } /* mul_, add_ */         \
            buf[i] = mb;                                                                     \
            s = nest ? FMA(mb, m, s) : mb;               /* grad.add(buf, alpha=m) */        \
        }                                                                                    \
        p[i] = FMA(s, neg_lr, p[i]);                     /* param.add_(grad, alpha=-lr) */   \
    }

/* flags: 1 weight decay, 2 momentum, 4 first step (buf is written, not read), 8 nesterov,
   16 maximize. A loop is compiled once per combination of flags (the switch), each without a
   test in its body: with the tests inside, GCC keeps the loop scalar ("control flow in
   loop"), 4-5x slower than its vectorised form. */
#define SGD_FLAGS const int has_wd, const int has_m, const int first, const int nest, const int maxi
#define SGD_CASE(NAME, k, ...)                                                               \
    case k: NAME##_loop(__VA_ARGS__, (k) & 1, (k) & 2, (k) & 4, (k) & 8, (k) & 16); return;
#define SGD_CASES4(NAME, k, ...) SGD_CASE(NAME, k, __VA_ARGS__) SGD_CASE(NAME, k + 1, __VA_ARGS__) \
    SGD_CASE(NAME, k + 2, __VA_ARGS__) SGD_CASE(NAME, k + 3, __VA_ARGS__)
#define SGD_SWITCH(NAME, ...)                                                                \
    switch (flags) {                                                                         \
        SGD_CASES4(NAME, 0, __VA_ARGS__) SGD_CASES4(NAME, 4, __VA_ARGS__)                    \
        SGD_CASES4(NAME, 8, __VA_ARGS__) SGD_CASES4(NAME, 12, __VA_ARGS__)                   \
        SGD_CASES4(NAME, 16, __VA_ARGS__) SGD_CASES4(NAME, 20, __VA_ARGS__)                  \
        SGD_CASES4(NAME, 24, __VA_ARGS__) SGD_CASES4(NAME, 28, __VA_ARGS__)                  \
    }
#define INLINE static inline __attribute__((always_inline)) void

/* The SGD step on gradient g. */
#define SGD(T, NAME, FMA)                                                                    \
INLINE NAME##_loop(T *p, const T *g, T *buf, int64_t n, T wd, T m, T damp1, T neg_lr,       \
                   SGD_FLAGS) {                                                              \
    for (int64_t i = 0; i < n; i++) SGD_UPDATE(T, FMA, g[i])                                 \
}                                                                                            \
void NAME(T *p, const T *g, T *buf, int64_t n, T wd, T m, T damp1, T neg_lr, int flags) {   \
    SGD_SWITCH(NAME, p, g, buf, n, wd, m, damp1, neg_lr)                                     \
}

SGD(float, samstudy_sgd_f32, fmaf)
SGD(double, samstudy_sgd_f64, fma)

/* The rule and the SGD step in one pass: the SGD step on the d of (g, g_p), which stays in a
   register (the same macros as the two loops above, so the same values bit for bit). */
#define RULE_SGD(T, NAME, FMA, ABS)                                                          \
INLINE NAME##_loop(T *p, const T *g, const T *gp, const T *A, const T *B, T *buf,           \
                   int64_t n, T wd, T m, T damp1, T neg_lr, SGD_FLAGS) {                     \
    COEFS(T)                                                                                 \
    for (int64_t i = 0; i < n; i++) {                                                        \
        MASKS(T, ABS)                                                                        \
        T di;                                                                                \
        D_OF(T, di)                                                                          \
        SGD_UPDATE(T, FMA, di)                                                               \
    }                                                                                        \
}                                                                                            \
void NAME(T *p, const T *g, const T *gp, const T *A, const T *B, T *buf, int64_t n, T wd,    \
          T m, T damp1, T neg_lr, int flags) {                                               \
    SGD_SWITCH(NAME, p, g, gp, A, B, buf, n, wd, m, damp1, neg_lr)                           \
}

RULE_SGD(float, samstudy_rule_sgd_f32, fmaf, fabsf)
RULE_SGD(double, samstudy_rule_sgd_f64, fma, fabs)

/* ASAM's w + e (eta = 0): ((w * w) * g) * scale + w, each product and the sum rounded in that
   order, as torch's four passes round them. out may be g itself, never w. */
#define ADAPTIVE(T, NAME)                                                                    \
void NAME(T *out, const T *g, const T *w, int64_t n, T scale) {                              \
    for (int64_t i = 0; i < n; i++) {                                                        \
        const T wi = w[i];                                                                   \
        const T e = ((wi * wi) * g[i]) * scale;                                              \
        out[i] = e + wi;                                                                     \
    }                                                                                        \
}

ADAPTIVE(float, samstudy_adaptive_f32)
ADAPTIVE(double, samstudy_adaptive_f64)
"""

# -ffp-contract=off: no fused multiply-adds but the explicit fma() calls (they would round d
# differently from the eager rule); no -ffast-math for the same reason. -march=native: the
# library is keyed by the CPU.
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared")
_SYMBOLS = {torch.float32: "samstudy_rule_f32", torch.float64: "samstudy_rule_f64"}
_SGD_SYMBOLS = {torch.float32: "samstudy_sgd_f32", torch.float64: "samstudy_sgd_f64"}
_RULE_SGD_SYMBOLS = {torch.float32: "samstudy_rule_sgd_f32", torch.float64: "samstudy_rule_sgd_f64"}
_ADAPTIVE_SYMBOLS = {torch.float32: "samstudy_adaptive_f32", torch.float64: "samstudy_adaptive_f64"}
DTYPES = tuple(_SYMBOLS)
_C_TYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}

_loaded: dict[tuple[str | None, ...], ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$SAMSTUDY_KERNEL_CACHE`` or ~/.cache/samstudy/kernels."""
    env = os.environ.get("SAMSTUDY_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "samstudy" / "kernels"


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), or its name where unknown.
    Read once per process: the rule asks for its library on every step."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library() -> ctypes.CDLL | None:
    """The built kernel library, or None where it cannot be built or is switched off."""
    if os.environ.get("SAMSTUDY_NATIVE_KERNEL", "1") == "0":
        return None
    compiler = os.environ.get("CC", "cc")
    # what decides the library's path, cheap to read on every step
    where = (compiler, *map(os.environ.get, ("SAMSTUDY_KERNEL_CACHE", "XDG_CACHE_HOME", "HOME")))
    if where in _loaded:
        return _loaded[where]
    path = cache_dir() / _library_name(compiler)
    lib = None
    try:
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
        for dtype, symbol in _SYMBOLS.items():
            fn = getattr(lib, symbol)
            ptr = ctypes.POINTER(_C_TYPES[dtype])
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ptr, ptr] + [ctypes.c_void_p] * 2
            fn.restype = None
        for dtype, symbol in _SGD_SYMBOLS.items():
            fn = getattr(lib, symbol)
            scalar = _C_TYPES[dtype]
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [scalar] * 4 + [ctypes.c_int]
            fn.restype = None
        for dtype, symbol in _RULE_SGD_SYMBOLS.items():
            fn = getattr(lib, symbol)
            scalar, ptr = _C_TYPES[dtype], ctypes.POINTER(_C_TYPES[dtype])
            fn.argtypes = (
                [ctypes.c_void_p] * 3 + [ptr, ptr, ctypes.c_void_p, ctypes.c_int64]
                + [scalar] * 4 + [ctypes.c_int]
            )  # fmt: skip
            fn.restype = None
        for dtype, symbol in _ADAPTIVE_SYMBOLS.items():
            fn = getattr(lib, symbol)
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, _C_TYPES[dtype]]
            fn.restype = None
    except (OSError, subprocess.SubprocessError, AttributeError) as exc:
        warnings.warn(
            f"samstudy: the C kernels could not be built or loaded ({exc}); the CPU region "
            "rule runs its eager passes and SGD steps as torch's (correct, slower on small "
            "models). Set CC to a C compiler, or SAMSTUDY_NATIVE_KERNEL=0 to silence this.",
            stacklevel=2,
        )
        lib = None
    _loaded[where] = lib
    return lib


@functools.cache
def _library_name(compiler: str) -> str:
    """The library's file name: a hash of what it is built from, and for which CPU."""
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *_FLAGS, _cpu_flags()]).encode())
    return f"rule-{key.hexdigest()[:16]}.so"


def _build(compiler: str, path: Path) -> None:
    """Compile into a temporary file next to ``path`` and move it in place (atomic: workers of
    one machine may build at the same time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src = Path(tmp) / "rule.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / path.name
        proc = subprocess.run(
            [compiler, *_FLAGS, str(src), "-o", str(out), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise subprocess.SubprocessError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, path)


class NativeRule:
    """One table's coefficients, ready for the C loop (``supports`` says which tensors)."""

    def __init__(self, lib: ctypes.CDLL, groups: list[tuple[frozenset[int], float, float]]) -> None:
        """``groups``: (regions, a, b) of ``rules._groups``; other regions keep d = g_p."""
        # region k (1..4) of a group with (a, b): A_k = a - 1, B_k = b; others keep d = g_p
        a_minus_1 = [0.0] * 5
        b = [0.0] * 5
        for regions, a_k, b_k in groups:
            for k in regions:
                a_minus_1[k], b[k] = a_k - 1.0, b_k
        self._fns = {}
        for dtype, symbol in _SYMBOLS.items():
            ctype = _C_TYPES[dtype]
            # float32 coefficients are rounded as torch rounds a Scalar for a float tensor
            coef_a, coef_b = (ctype * 5)(*a_minus_1), (ctype * 5)(*b)
            self._fns[dtype] = (getattr(lib, symbol), coef_a, coef_b)

    def coefficients(self, dtype: torch.dtype) -> tuple[ctypes.Array, ctypes.Array]:
        """The C arrays of A_k and B_k (index 0: the zero set) for tensors of ``dtype``."""
        return self._fns[dtype][1:]

    @staticmethod
    def supports(tensors: list[torch.Tensor]) -> bool:
        return all(
            t.device.type == "cpu" and t.dtype in _SYMBOLS and t.is_contiguous() for t in tensors
        )

    def run(
        self,
        g: torch.Tensor,
        gp: torch.Tensor,
        d: torch.Tensor | None,
        counts: torch.Tensor | None = None,
        dots: torch.Tensor | None = None,
    ) -> None:
        """d (if given) of one tensor's g, g_p; with ``counts`` (int64 [4]) and ``dots``
        (float64 [2]) also add its threshold counts and [<g, g_p>, <g_p, g_p>] to them."""
        if (counts is None) != (dots is None) or (d is None and counts is None):
            raise ValueError("NativeRule.run: counts and dots together, and d or both")
        fn, coef_a, coef_b = self._fns[g.dtype]
        fn(
            g.data_ptr(),
            gp.data_ptr(),
            d.data_ptr() if d is not None else None,
            g.numel(),
            coef_a,
            coef_b,
            counts.data_ptr() if counts is not None else None,
            dots.data_ptr() if dots is not None else None,
        )


# -- ASAM's w + e -----------------------------------------------------------------------------


def adaptive_supports(
    out: list[torch.Tensor], g: list[torch.Tensor], w: list[torch.Tensor]
) -> bool:
    """Can :func:`adaptive_perturb` take these tensors (and is the library there)? CPU,
    float32/64, contiguous, each ``out[i]`` shaped and typed like ``g[i]`` and ``w[i]``."""
    for o, gi, wi in zip(out, g, w, strict=True):
        if not (o.is_cpu and o.dtype in _ADAPTIVE_SYMBOLS and o.is_contiguous()):
            return False
        for t in (gi, wi):
            if not (t.dtype == o.dtype and t.shape == o.shape and t.is_contiguous()):
                return False
    return library() is not None


def adaptive_perturb(
    out: list[torch.Tensor], g: list[torch.Tensor], w: list[torch.Tensor], scales: list[float]
) -> None:
    """``out[i] = ((w[i] * w[i]) * g[i]) * scales[i] + w[i]``: one C pass per tensor where
    torch makes four, with their roundings (a scale is the value of a 0-dim tensor of the
    tensors' dtype). The tensors must suit (:func:`adaptive_supports`)."""
    lib = library()
    for o, gi, wi, scale in zip(out, g, w, scales, strict=True):
        fn = getattr(lib, _ADAPTIVE_SYMBOLS[o.dtype])
        fn(o.data_ptr(), gi.data_ptr(), wi.data_ptr(), o.numel(), scale)
    torch.autograd.graph.increment_version(out)


# -- SGD --------------------------------------------------------------------------------------

_sgd_exact: dict[str, bool] = {}  # library path -> its SGD loop matched torch on this machine
# torch runs an elementwise op on one thread below this many elements (ATen's GRAIN_SIZE)
_TORCH_GRAIN = 32768
# The C loop is single-threaded: measured faster than torch's step at 1 and 2 threads (ResNet-18
# 3.4 ms against 7.5 and 6.0 ms); with more threads torch's parallel passes may win on large
# tensors, so they keep torch's step there.
_SGD_MAX_THREADS = 2


def sgd_step(
    opt: torch.optim.Optimizer,
    rule: NativeRule | None = None,
    firsts: dict[int, torch.Tensor] | None = None,
) -> bool:
    """``opt.step()`` of a torch SGD on contiguous CPU tensors, one C loop per tensor; False
    (nothing done) where that does not apply, for ``opt.step()`` to do it.

    With ``rule``, each parameter's ``.grad`` is its g_p and ``firsts[id(p)]`` its g: the step
    is taken on the rule's d of the two, in the same loop (d is never written to memory).

    The result is torch's single-tensor SGD bit for bit (checked against torch once per process
    before first use), in a third to a half of its time: one pass over the tensors instead of four, and
    none of the step's Python wrappers (about 3% of a SAM step on the digits MLP, 1% on
    ResNet-18). It applies to ``torch.optim.SGD`` itself without step hooks, whose groups are not
    ``foreach``, ``fused`` or ``differentiable`` and hold plain-number hyper-parameters, on
    float32/float64 tensors; with more than two torch threads only where every tensor is small
    enough that torch would not split it across threads. Each step moves the autograd version
    of the parameters and buffers it writes (by one; torch's ops move a buffer's by two).
    """
    # a step wrapped on the instance (an LR scheduler built on it, a user's) must run
    if type(opt) is not torch.optim.SGD or "step" in vars(opt) or opt._optimizer_step_pre_hooks:
        return False
    if opt._optimizer_step_post_hooks or _global_step_hooks():
        return False
    lib = library()
    if lib is None or not _sgd_checked(lib):
        return False
    work = []
    # the largest tensor left to the C loop (None: any)
    limit = _TORCH_GRAIN if torch.get_num_threads() > _SGD_MAX_THREADS else None
    for group in opt.param_groups:
        if group["foreach"] or group["fused"] or group["differentiable"]:
            return False
        hyper = (group["lr"], group["weight_decay"], group["momentum"], group["dampening"])
        if not all(type(v) in (float, int) for v in hyper):
            return False
        momentum = group["momentum"]
        flags, args = _group_args(group)
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            # is_cpu, not device.type: the checks run on every tensor of every step
            if not (
                p.is_cpu
                and p.dtype in _SGD_SYMBOLS
                and g.dtype == p.dtype
                and g.layout == torch.strided
                and p.is_contiguous()
                and g.is_contiguous()
                and (limit is None or p.numel() < limit)
            ):
                return False
            first = None
            if rule is not None:
                first = firsts.get(id(p)) if firsts is not None else None
                if not (
                    first is not None
                    and first.dtype == p.dtype
                    and first.is_cpu
                    and first.is_contiguous()
                    and first.shape == p.shape
                ):
                    return False
            # torch's SGD keeps state only with momentum (a state_dict stays torch's)
            state = opt.state[p] if momentum != 0 else None
            buf = state.get("momentum_buffer") if state is not None else None
            if buf is not None and not (
                buf.is_cpu
                and buf.dtype == p.dtype
                and buf.shape == p.shape  # a mismatched state dict: torch's step raises
                and buf.is_contiguous()
            ):
                return False
            work.append((p, g, state, buf, first, flags, args))
    for p, g, state, buf, first, flags, args in work:
        _sgd_tensor(lib, p, g, state, buf, flags, args, rule, first)
    return True


def _group_args(group: dict[str, Any]) -> tuple[int, tuple[float, ...]]:
    """A group's flags for the C loop (all but the first step's, 4: set per tensor) and its
    (weight decay, momentum, 1 - dampening, -lr)."""
    wd, momentum = group["weight_decay"], group["momentum"]
    flags = (1 if wd != 0 else 0) | (16 if group["maximize"] else 0)
    if momentum != 0:
        flags |= 2 | (8 if group["nesterov"] else 0)
    return flags, (wd, momentum, 1 - group["dampening"], -group["lr"])


def _sgd_tensor(lib, p, g, state, buf, flags, args, rule=None, first=None) -> None:  # noqa: ANN001
    """One tensor's step: ``flags`` and ``args`` (wd, momentum, 1 - dampening, -lr) are its
    group's; a momentum buffer is made here on the first step (``state`` holds it)."""
    if state is not None and buf is None:
        buf = state["momentum_buffer"] = torch.empty_like(p)
        flags |= 4
    buf_ptr = buf.data_ptr() if buf is not None else None
    if rule is None:
        fn = getattr(lib, _SGD_SYMBOLS[p.dtype])
        fn(p.data_ptr(), g.data_ptr(), buf_ptr, p.numel(), *args, flags)
    else:  # g is g_p, first is g
        fn = getattr(lib, _RULE_SGD_SYMBOLS[p.dtype])
        coef_a, coef_b = rule.coefficients(p.dtype)
        fn(p.data_ptr(), first.data_ptr(), g.data_ptr(), coef_a, coef_b, buf_ptr, p.numel(),
           *args, flags)  # fmt: skip
    torch.autograd.graph.increment_version(p if buf is None else [p, buf])


def _global_step_hooks() -> bool:
    return bool(
        _torch_optimizer._global_optimizer_pre_hooks
        or _torch_optimizer._global_optimizer_post_hooks
    )


def _sgd_checked(lib: ctypes.CDLL) -> bool:
    """Whether the C loop gives torch's SGD bit for bit here (torch's add-with-alpha rounds as
    one FMA on the CPUs seen so far; a build where it does not keeps torch's own step)."""
    key = str(lib._name)
    if key not in _sgd_exact:
        _sgd_exact[key] = _sgd_matches_torch(lib)
        if not _sgd_exact[key]:
            warnings.warn(
                "samstudy: the C SGD step does not round as torch's does on this machine; "
                "SGD steps stay torch's own",
                stacklevel=3,
            )
    return _sgd_exact[key]


def _sgd_matches_torch(lib: ctypes.CDLL) -> bool:
    """Three steps of every branch (weight decay, momentum with and without dampening,
    nesterov, maximize), on 37 values (the vector loop's tail too), in both dtypes."""
    settings = [
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
        {"lr": 0.7, "momentum": 0.5, "dampening": 0.1, "maximize": True},
        {"lr": 0.3, "weight_decay": 0.01},
    ]
    gen = torch.Generator().manual_seed(0)
    # torch's step itself, less its wrappers (grad mode, profiling hooks, and an import of
    # torch._dynamo that a trial worker need not pay for)
    torch_step = inspect.unwrap(torch.optim.SGD.step)
    for dtype, kwargs in itertools.product(_SGD_SYMBOLS, settings):
        ours, theirs = (torch.randn(37, generator=gen, dtype=dtype) for _ in range(2))
        theirs.copy_(ours)
        mine = torch.optim.SGD([ours], foreach=False, **kwargs)
        ref = torch.optim.SGD([theirs], foreach=False, **kwargs)
        for _ in range(3):
            ours.grad = torch.randn(37, generator=gen, dtype=dtype)
            theirs.grad = ours.grad.clone()
            group = mine.param_groups[0]
            state = mine.state[ours] if group["momentum"] != 0 else None
            buf = state.get("momentum_buffer") if state is not None else None
            _sgd_tensor(lib, ours, ours.grad, state, buf, *_group_args(group))
            with torch.no_grad():
                torch_step(ref)
        if not torch.equal(ours, theirs):
            return False
    return True
