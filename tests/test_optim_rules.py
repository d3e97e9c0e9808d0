"""Combination rules: preset tables, d = a_k g_p + b_k g on boundaries, regions and counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samstudy.optim import PRESETS, REGION_KEYS, RegionRule, preset_table, region_index
from samstudy.optim.flat import FlatSpace
from samstudy.optim.rules import regions_from_thresholds

# The design table, written out independently of the implementation.
EXPECTED = {
    "sgd": [(0, 1)] * 4,
    "sam": [(1, 0)] * 4,
    "sam_magnitude_sgd_sign": [(1, 0), (1, 0), (-1, 0), (-1, 0)],
    "sgd_magnitude_sam_sign": [(0, 1), (0, 1), (0, -1), (0, -1)],
    "sam_where_agree": [(1, 0), (1, 0), (0, 0), (0, 0)],
    "sgd_where_agree": [(0, 1), (0, 1), (0, 0), (0, 0)],
}

KNOBBED = {
    ("same", "scales"): ([2.0, 0.0, 0.0, 0.0], [(3, 0), (1, 0), (1, 0), (1, 0)]),
    ("custom_same", "scales"): ([0.5, 0.0, -0.25, 1.0], [(1.5, 0), (1, 0), (0.75, 0), (2, 0)]),
    ("saner", "alpha"): (0.3, [(1, 0), (0.3, 0), (1, 0), (1, 0)]),
    ("sgd_on_region", "region"): (3, [(1, 0), (1, 0), (0, 1), (1, 0)]),
    ("table", "coefficients"): (
        [[1, 2], [3, 4], [5, 6], [7, 8]],
        [(1, 2), (3, 4), (5, 6), (7, 8)],
    ),
}

# Rule-exercising tables: every preset with a non-trivial table, plus a dense one.
TABLES = {
    **{name: tuple(map(tuple, rows)) for name, rows in EXPECTED.items()},
    **{name: tuple(map(tuple, rows)) for (name, _), (_, rows) in KNOBBED.items()},
    "dense": ((1.0, 0.5), (2.0, 1.0), (0.5, -1.0), (-1.0, 2.0)),
}


def ref_region(g: float, gp: float) -> str:
    """design.md's table, literally."""
    if g == 0:
        return "zero"
    same = (g > 0 and gp > 0) or (g < 0 and gp < 0)
    big = abs(gp) >= abs(g)
    if same:
        return "ckpt1" if big else "ckpt2"
    return "ckpt3" if big else "ckpt4"


def ref_direction(table, g: float, gp: float) -> float:
    region = ref_region(g, gp)
    if region == "zero":
        return gp
    a, b = table[int(region[-1]) - 1]
    return a * gp + b * g


def run_rule(
    table,
    g: torch.Tensor,
    gp: torch.Tensor,
    compile: bool = False,
    flat: bool = True,
    native: bool = True,
):
    """Apply RegionRule on two fake parameter tensors covering g / gp; return (d, counts).

    ``flat``: pass gathered flat buffers (the GPU path) or per-tensor lists (the CPU path: the
    C loop, or with ``native=False`` the chunked eager passes)."""
    n = g.numel()
    shapes = [torch.Size([n // 2]), torch.Size([n - n // 2])]
    space = FlatSpace(shapes, g.device, g.dtype)
    G = [g[: n // 2], g[n // 2 :]]
    P = [gp[: n // 2], gp[n // 2 :]]
    if flat:
        G, P = space.gather("G", G), space.gather("P", P)
    rule = RegionRule(table, compile=compile, native=native)
    D, thresholds, dots = rule.combine(space, G, P, measure=True)
    numels = torch.tensor(space.numels)
    counts = regions_from_thresholds(thresholds, numels)
    # the measured dot products come from the same pass
    g64, gp64 = g.double(), gp.double()
    want = torch.stack([g64 @ gp64, gp64 @ gp64])
    # no float32 overflow in either dot product (g . g_p, and g_p . g_p)
    if (gp64.abs().max() * torch.maximum(g64.abs().max(), gp64.abs().max())).item() * n < 1e37:
        scale = (g64.abs() * gp64.abs()).sum() + (gp64 * gp64).sum()
        assert ((dots - want).abs() <= 1e-5 * scale + 1e-40).all(), (dots, want)
    if D is None:
        return gp.clone(), counts
    return torch.cat([v.reshape(-1) for v in space.views("D")]), counts


def boundary_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Every boundary of the region table, both signs, zeros of both signs, subnormals."""
    tiny = 1e-42  # subnormal in float32
    rows = []
    for s in (1.0, -1.0):
        g = 2.0 * s
        rows += [
            (g, g),  # |g_p| = |g|, same sign -> ckpt1
            (g, -g),  # |g_p| = |g|, opposite -> ckpt3
            (g, 0.0),  # g_p = 0 -> ckpt4
            (g, -0.0),  # g_p = -0 -> ckpt4
            (g, 3 * g),  # ckpt1
            (g, 0.5 * g),  # ckpt2
            (g, -3 * g),  # ckpt3
            (g, -0.5 * g),  # ckpt4
            (tiny * s, tiny * s),  # subnormal, equal -> ckpt1
            (tiny * s, -tiny * s),  # ckpt3
            (g, tiny * s),  # ckpt2
            (g, -tiny * s),  # ckpt4
        ]
    rows += [(0.0, 1.5), (0.0, -1.5), (-0.0, 2.0), (0.0, 0.0), (-0.0, -0.0), (0.0, tiny)]
    g, gp = zip(*rows, strict=True)
    return torch.tensor(g, dtype=torch.float32), torch.tensor(gp, dtype=torch.float32)


def boundary_and_random_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary pairs followed by ``n`` random ones (a compiled kernel sees both)."""
    g, gp = boundary_pairs()
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([g, torch.randn(n, generator=gen)]), torch.cat(
        [gp, torch.randn(n, generator=gen)]
    )


def assert_direction(table, g, gp, d):
    for gi, pi, di in zip(g.tolist(), gp.tolist(), d.tolist(), strict=True):
        want = ref_direction(table, gi, pi)
        scale = max(abs(pi), abs(gi)) * (2 + max(abs(v) for row in table for v in row))
        tol = 4 * 2.0**-24 * scale + 1e-44
        assert abs(di - want) <= tol, (ref_region(gi, pi), gi, pi, di, want)


def test_preset_tables_match_design():
    for name, rows in EXPECTED.items():
        assert preset_table(name) == tuple((float(a), float(b)) for a, b in rows), name
    for (name, knob), (value, rows) in KNOBBED.items():
        got = preset_table(name, **{knob: value})
        assert got == tuple((float(a), float(b)) for a, b in rows), name
    # every preset of the design exists (the registry may hold more: new variants)
    assert set(EXPECTED) | {name for name, _ in KNOBBED} <= set(PRESETS)


def test_sgd_on_region_puts_sgd_only_on_its_region():
    for k in range(1, 5):
        table = preset_table("sgd_on_region", region=k)
        assert [row == (0.0, 1.0) for row in table] == [i == k for i in range(1, 5)]


@pytest.mark.parametrize("path", ["flat", "native", "chunked"])
@pytest.mark.parametrize("name", sorted(TABLES))
def test_each_table_gives_its_direction_on_boundaries(name, path):
    g, gp = boundary_pairs()
    d, counts = run_rule(TABLES[name], g, gp, flat=path == "flat", native=path == "native")
    assert_direction(TABLES[name], g, gp, d)
    direct = [0] * 5
    for a, b in zip(g.tolist(), gp.tolist(), strict=True):
        direct[REGION_KEYS.index(ref_region(a, b))] += 1
    assert counts.sum(0).tolist() == direct


def test_exact_presets_are_bitwise_exact_on_boundaries():
    g, gp = boundary_pairs()
    for name in ("sam_magnitude_sgd_sign", "sgd_magnitude_sam_sign", "sgd_where_agree"):
        d, _ = run_rule(TABLES[name], g, gp)
        want = torch.tensor([ref_direction(TABLES[name], a, b) for a, b in zip(g, gp, strict=True)])
        assert torch.equal(d, want), name


def test_region_index_on_boundaries():
    g, gp = boundary_pairs()
    idx = region_index(g, gp).tolist()
    names = ["zero", "ckpt1", "ckpt2", "ckpt3", "ckpt4"]
    assert [names[i] for i in idx] == [ref_region(a, b) for a, b in zip(g, gp, strict=True)]


def test_identity_rule_skips_the_direction():
    rule = RegionRule(preset_table("sam"))
    assert rule.identity
    space = FlatSpace([torch.Size([3])], torch.device("cpu"), torch.float32)
    G = space.gather("G", [torch.ones(3)])
    P = space.gather("P", [torch.ones(3)])
    assert rule.combine(space, G, P, measure=False) == (None, None, None)


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def grad_pairs(draw):
    """(g, g_p) lists that hit boundaries often: g_p related to g, zeros, or anything."""
    n = draw(st.integers(2, 40))
    g, gp = [], []
    for _ in range(n):
        gi = draw(st.one_of(finite32, st.sampled_from([0.0, -0.0])))
        kind = draw(st.sampled_from(["eq", "neg", "zero", "half", "double", "free"]))
        pi = {
            "eq": gi,
            "neg": -gi,
            "zero": 0.0,
            "half": gi / 2,
            "double": gi * 2 if abs(gi) < 1e38 else gi,
            "free": draw(finite32),
        }[kind]
        g.append(gi)
        gp.append(pi)
    return torch.tensor(g, dtype=torch.float32), torch.tensor(gp, dtype=torch.float32)


@settings(max_examples=150, deadline=None)
@given(grad_pairs())
def test_regions_partition_and_counts_equal_a_direct_count(pair):
    g, gp = pair
    idx = region_index(g, gp)
    # a partition: every coordinate in exactly one region, and it is the reference region
    names = ["zero", "ckpt1", "ckpt2", "ckpt3", "ckpt4"]
    assert [names[i] for i in idx.tolist()] == [
        ref_region(a, b) for a, b in zip(g.tolist(), gp.tolist(), strict=True)
    ]
    _, counts = run_rule(TABLES["dense"], g, gp, flat=g.numel() % 2 == 0)
    direct = {k: 0 for k in REGION_KEYS}
    for a, b in zip(g.tolist(), gp.tolist(), strict=True):
        direct[ref_region(a, b)] += 1
    assert counts.sum(0).tolist() == [direct[k] for k in REGION_KEYS]
    assert counts.sum().item() == g.numel()


@settings(max_examples=100, deadline=None)
@given(grad_pairs(), st.sampled_from(sorted(TABLES)))
def test_direction_property(pair, name):
    g, gp = pair
    # keep products finite: the property is about regions, not overflow
    g, gp = g.clamp(-1e30, 1e30), gp.clamp(-1e30, 1e30)
    d, _ = run_rule(TABLES[name], g, gp, flat=g.numel() % 2 == 1)
    assert_direction(TABLES[name], g, gp, d)


def test_counts_per_tensor_follow_the_segments():
    g = torch.tensor([1.0, 1.0, 1.0, 0.0, -1.0, -1.0])
    gp = torch.tensor([2.0, 0.5, -2.0, 1.0, -0.5, 0.0])
    _, counts = run_rule(TABLES["dense"], g, gp)
    # first tensor: ckpt1, ckpt2, ckpt3; second: zero, ckpt2, ckpt4
    assert counts.tolist() == [[1, 1, 1, 0, 0], [0, 1, 0, 1, 1]]


@pytest.mark.slow
def test_compiled_rule_matches_eager():
    g, gp = boundary_and_random_pairs(1000, seed=0)
    table = TABLES["dense"]
    d_eager, c_eager = run_rule(table, g, gp)
    d_comp, c_comp = run_rule(table, g, gp, compile=True)
    assert torch.equal(c_eager, c_comp)
    assert_direction(table, g, gp, d_comp)
    torch.testing.assert_close(d_comp, d_eager)


def test_nan_free_on_zero_gradients():
    g = torch.zeros(4)
    gp = torch.tensor([1.0, -1.0, 0.0, 2.0])
    d, counts = run_rule(TABLES["dense"], g, gp)
    assert torch.equal(d, gp)
    assert counts.sum(0).tolist() == [0, 0, 0, 0, 4]
    assert not math.isnan(d.sum().item())


def test_chunked_path_matches_flat_path_across_chunk_edges():
    """Tensors longer than a chunk: the CPU paths (the C loop; the chunked eager passes) equal
    the flat path."""
    from samstudy.optim.flat import CHUNK

    gen = torch.Generator().manual_seed(3)
    n = 2 * CHUNK + 1234  # two tensors of more than one chunk each
    g = torch.randn(n, generator=gen)
    gp = g * torch.randn(n, generator=gen).sign() * torch.rand(n, generator=gen) * 2
    g[::97] = 0.0
    gp[::89] = g[::89]  # |g_p| = |g| boundaries
    for name in ("dense", "custom_same", "sgd_on_region"):
        d_flat, c_flat = run_rule(TABLES[name], g, gp, flat=True)
        for native in (True, False):
            d_cpu, c_cpu = run_rule(TABLES[name], g, gp, flat=False, native=native)
            assert torch.equal(d_flat, d_cpu), (name, native)
            assert torch.equal(c_flat, c_cpu), (name, native)
    idx = region_index(g, gp)
    assert c_flat.sum(0).tolist() == [int((idx == k).sum()) for k in (1, 2, 3, 4, 0)]


def test_auto_compiles_only_large_cpu_spaces_the_c_loop_cannot_take():
    from samstudy.optim.rules import AUTO_COMPILE_MIN_NUMEL

    def space(n: int, device: str = "cpu", dtype=torch.float32) -> FlatSpace:
        return FlatSpace([torch.Size([n])], torch.device(device), dtype)

    native = RegionRule(TABLES["dense"], compile="auto")
    eager = RegionRule(TABLES["dense"], compile="auto", native=False)
    large = AUTO_COMPILE_MIN_NUMEL
    assert not native.compiled_for(space(large))  # the C loop: faster than compiled, no compile
    assert native.compiled_for(space(large, dtype=torch.bfloat16))  # no C loop for bfloat16
    assert eager.compiled_for(space(large))
    assert not eager.compiled_for(space(1000))
    assert not eager.compiled_for(space(large, "meta"))  # accelerators keep the flat passes
    assert RegionRule(TABLES["dense"], compile=True).compiled_for(space(1000))
    assert not RegionRule(TABLES["dense"], compile=False, native=False).compiled_for(space(large))
    with pytest.raises(ValueError, match="'auto'"):
        RegionRule(TABLES["dense"], compile="yes")


@pytest.mark.slow
def test_large_cpu_models_take_the_c_loop_or_the_compiled_kernel_with_the_same_result():
    """A 1M-parameter CPU model: ``compile: auto`` (the default) takes the C loop, and without
    it the compiled kernel; the step, statistics included, matches the eager passes (the C
    loop bit for bit)."""
    from samstudy.optim import create_optimizer
    from samstudy.optim.rules import _COMPILED

    coefficients = [[1.0, 0.5], [2.0, 1.0], [0.5, -1.0], [-1.0, 2.0]]
    results = {}
    for path in ("native", "compiled", "eager"):
        torch.manual_seed(0)
        model = torch.nn.Linear(1024, 1024)  # 1,049,600 parameters: over the auto threshold
        x, y = torch.randn(32, 1024), torch.randint(0, 1024, (32,))
        opt = create_optimizer(
            model.named_parameters(),
            name="table",
            coefficients=coefficients,
            lr=1.0,
            rho=0.05,
            stats_every=1,
            **({"compile": False} if path == "eager" else {}),
        )
        opt.rule.native = path == "native"
        _COMPILED.clear()
        for _ in range(2):
            opt.train_step(model, torch.nn.functional.cross_entropy, x, y)
        assert ((True, True) in _COMPILED) == (path == "compiled"), path
        assert (opt.rule._native_rule is not None) == (path == "native"), path
        assert opt.rule.compile == ("auto" if path != "eager" else False)  # no failed compile
        results[path] = ([p.detach().clone() for p in model.parameters()], opt.read_stats())
    w_eager, s_eager = results["eager"]
    for path in ("native", "compiled"):
        w, s = results[path]
        for a, b in zip(w, w_eager, strict=True):
            if path == "native":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b)
        for key in s_eager:
            assert s[key] == pytest.approx(s_eager[key], rel=1e-5, nan_ok=True), (path, key)


@pytest.mark.slow
def test_one_compiled_rule_serves_every_table():
    """The coefficients are a kernel input: new tables neither recompile nor give stale d."""
    import warnings

    import torch._dynamo

    g, gp = boundary_and_random_pairs(2000, seed=1)
    tables = [TABLES["dense"], preset_table("sgd_where_agree"), preset_table("saner", alpha=0.3)]
    tables += [tuple((0.1 * k + j, 1.0 - j) for j in range(4)) for k in range(10)]
    run_rule(tables[0], g, gp, compile=True)  # compiled for these shapes
    # from here a recompile raises, and the rule's fallback warning would be an error
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        for table in tables:
            d, _ = run_rule(table, g, gp, compile=True)
            assert_direction(table, g, gp, d)
