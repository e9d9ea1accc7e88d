"""The fused path (minitf/engine.py `FusedPath`, kernels/layout.py, kernels/numba_fused.py,
kernels/_cython_fused.pyx) against the unfused path it replaces: the same logits at every
step (prefill with T = 1, decode to the exact context boundary, the sliding window past
it), bit for bit for W8A8 models (whose stages must round exactly as the unfused kernels
do), the same greedy text, hooks that do not change the path, no allocation per token."""

import tracemalloc

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.engine import Engine, FusedPath, Int8Linear, Linear
from minitf.kernels import fused_kernels, get_backend, layout, numba_fused
from minitf.kernels import numba_kernels, numpy_ref
from minitf.kernels.layout import pack_vnni, unpack_vnni, unpack_vnni_columns
from minitf.model import init_params
from minitf.quantization import quantize_model
from models import perturbed_params
from tolerances import TOL

FUSED_BACKENDS = ["numba", "cython"]
MODELS = [None, ("ffn", "weight-only"), ("all", "weight-only"), ("ffn", "w8a8"), ("all", "w8a8")]
MODEL_IDS = ["float32", "ffn-weight-only", "all-weight-only", "ffn-w8a8", "all-w8a8"]
# Awkward sizes: K = 26 and 3C = 78 are not multiples of the VNNI tile (4 k, 64 m), the
# head size 13 is odd, block_size 12 is not a multiple of the 16 keys the transposed cache
# is padded to. A second config has three heads.
CONFIGS = [GPTConfig(vocab_size=37, block_size=12, n_layer=2, n_head=2, d_model=26),
           GPTConfig(vocab_size=41, block_size=20, n_layer=3, n_head=3, d_model=24)]
TOL_LOGITS = TOL[("kv_cache_logits", np.float32)]


def relative_error(got, want) -> float:
    """max |got - want| / max(1, max |want|): absolute for logits up to 1, relative to the
    largest logit above (float32 logits of magnitude 10 are a few ulp apart at 1e-5)."""
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=["C26-NH2", "C24-NH3"])
def config_params(request):
    config = CONFIGS[request.param]
    return config, perturbed_params(config)


def engines(config, params, backend, quant):
    """(unfused, fused) engines of the same model on one backend."""
    mode = "weight-only"
    if quant is not None:
        scope, mode = quant
        params, _ = quantize_model(params, config, scope)
    return (Engine(config, params, backend, int8_mode=mode, fused=False),
            Engine(config, params, backend, int8_mode=mode))


class Recorder:
    """A greedy sampler that keeps a copy of every logits vector it is given."""

    def __init__(self):
        self.logits = []

    def __call__(self, logits):
        self.logits.append(np.array(logits))
        return int(np.argmax(logits))


@pytest.mark.parametrize("quant", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_equals_unfused_at_every_step(config_params, backend, quant):
    config, params = config_params
    ref, fused = engines(config, params, backend, quant)
    assert fused.fused is not None and ref.fused is None
    assert fused.fused.exact == (quant is not None and quant[1] == "w8a8")
    B = config.block_size
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=B)
    errors = []
    for T in (1, 5, B):  # prefill: T = 1 and the exact context boundary
        errors.append(("prefill", T, relative_error(fused.prefill(ids[:T]), ref.prefill(ids[:T]))))
    ref.prefill(ids[:1])
    fused.prefill(ids[:1])
    for t in range(1, B):  # decode from position 1 to the last one
        errors.append(("decode", t, relative_error(fused.decode(ids[t]), ref.decode(ids[t]))))
    worst = max(errors, key=lambda e: e[2])
    if fused.fused.exact:  # W8A8: every stage before a quantization rounds as the unfused one
        assert worst[2] == 0, f"{backend} {quant}: {worst[0]} at {worst[1]}: error {worst[2]:.2e}"
    assert worst[2] <= TOL_LOGITS, f"{backend} {quant}: {worst[0]} at {worst[1]}: error {worst[2]:.2e}"
    # past the context: the window slides (re-prefill every step); greedy text identical
    want, got = Recorder(), Recorder()
    text_ref = list(ref.generate(ids[:3], 2 * B + 5, want))
    text = list(fused.generate(ids[:3], 2 * B + 5, got))
    assert text == text_ref, f"{backend} {quant}: greedy generation differs"
    err = max(relative_error(g, w) for g, w in zip(got.logits, want.logits))
    assert err <= TOL_LOGITS, f"{backend} {quant}: generate logits error {err:.2e}"


@pytest.mark.parametrize("quant", [None, ("all", "w8a8")], ids=["float32", "all-w8a8"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hooks_do_not_change_the_path(config_params, backend, quant):
    """trace and capture_attention set on a fused engine: it stays on the fused path (the
    trace sees its stages, and one `decode_step` per token), its logits are those of the
    same engine without hooks bit for bit, and the attention it captures is the model's."""
    config, params = config_params
    ref, fused = engines(config, params, backend, quant)
    plain = engines(config, params, backend, quant)[1]
    ids = np.random.default_rng(2).integers(0, config.vocab_size, size=config.block_size)
    ops = []
    fused.trace, fused.capture_attention = ops.append, True
    np.testing.assert_array_equal(fused.prefill(ids[:5]), plain.prefill(ids[:5]))
    n_prefill = len(ops)
    assert ops[0] == "embedding" and ops[-1] == "head" and "h.0.attn" in ops
    for t in range(5, config.block_size):
        np.testing.assert_array_equal(fused.decode(ids[t]), plain.decode(ids[t]), err_msg=f"step {t}")
    assert ops[n_prefill:] == ["decode_step"] * (config.block_size - 5)  # the fused decode
    att_ref = [np.zeros((config.n_head, 5, 5), np.float32) for _ in range(config.n_layer)]
    ref.prefill(ids[:5], attention_out=att_ref)
    for l, (got, want) in enumerate(zip(fused.last_attention, att_ref)):
        assert np.abs(got - want).max() <= TOL_LOGITS, f"{backend}: layer {l} attention"
    fused.trace, fused.capture_attention = None, False
    for t in range(3):  # hooks off again: the same path, the same numbers
        np.testing.assert_array_equal(fused.prefill(ids[:7]), plain.prefill(ids[:7]))


@pytest.mark.parametrize("quant", [None, ("all", "w8a8")], ids=["float32", "all-w8a8"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_decode_allocates_nothing(config_params, backend, quant):
    config, params = config_params
    _, fused = engines(config, params, backend, quant)
    path = fused.fused
    fused.prefill([1, 2])
    first = path.decode(3, fused.pos)  # warm: compiled, buffers touched
    from numba.core.runtime import _nrt_python as nrt

    was_enabled = nrt.memsys_stats_enabled()
    nrt.memsys_enable_stats()  # numba's own allocator, which tracemalloc does not see
    nrt_before = nrt.memsys_get_stats_alloc(), nrt.memsys_get_stats_free()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for pos in range(3, 3 + 50):  # 50 steps, wrapping round the cache
            logits = path.decode(pos % config.vocab_size, pos % config.block_size)
            assert logits is first  # the same buffer every step
        after = tracemalloc.take_snapshot()
        nrt_allocs = nrt.memsys_get_stats_alloc() - nrt_before[0]
        nrt_frees = nrt.memsys_get_stats_free() - nrt_before[1]
        if backend == "numba":  # the step itself, run from compiled code: 50 steps, then 0
            start = nrt.memsys_get_stats_alloc()
            steps_in_compiled_loop(path.decoder, 50)
            middle = nrt.memsys_get_stats_alloc()
            steps_in_compiled_loop(path.decoder, 0)
            in_kernel = (middle - start) - (nrt.memsys_get_stats_alloc() - middle)
    finally:
        tracemalloc.stop()
        if not was_enabled:
            nrt.memsys_disable_stats()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0
                and "tracemalloc" not in str(s.traceback))
    assert grown < 1024, f"{backend}: {grown} B allocated over 50 decode steps"
    # A call from Python wraps each array argument in a small numba MemInfo, freed on return
    assert nrt_allocs == nrt_frees, f"{backend}: {nrt_allocs - nrt_frees} numba allocations kept"
    if backend == "numba":
        assert in_kernel == 0, f"numba's decode step allocated {in_kernel} times in 50 steps"


def steps_in_compiled_loop(decoder, n):
    """n decode steps of row 0 from one call of a compiled loop."""
    _compiled_loop(decoder._arrays, n, decoder.eps, decoder.exact)


def _loop(arrays, n, eps, exact):
    ctl = arrays[-1]
    for pos in range(n):
        ctl[layout.CTL_ROW, 0], ctl[layout.CTL_TOKEN, 0] = 0, pos % 5
        ctl[layout.CTL_POS, 0] = pos % arrays[3].shape[2]
        numba_fused.decode_rows(*arrays, 1, eps, exact, 1)


try:
    from numba import njit

    _compiled_loop = njit(_loop)
except ImportError:  # pragma: no cover - numba is a dependency
    _compiled_loop = None


@pytest.mark.parametrize("quant", [None, ("all", "w8a8")], ids=["float32", "all-w8a8"])
def test_scratch_buffers_hold_every_region_apart(config_params, quant):
    """The scratch row of the index table: regions in order, inside a row of the buffers,
    the float64 scores 8-byte aligned, the int8 row and every row 64-byte aligned."""
    config, params = config_params
    e = engines(config, params, "numba", quant)[1]
    e.reserve(3)
    tab, b = e.fused.weights.tab, e.fused.buffers
    C, FF, NH, Bp = config.d_model, config.d_ff, config.n_head, int(tab[layout.ROW_DIMS, layout.DIM_BP])
    sc = tab[layout.ROW_SCRATCH]
    assert b.sf.shape[0] == b.si.shape[0] == b.logits.shape[0] == b.kvT.shape[0] == 3
    sf_sizes = [(layout.SF_X, C), (layout.SF_H, C), (layout.SF_A, C), (layout.SF_QKV, 3 * C),
                (layout.SF_F, FF), (layout.SF_G, FF), (layout.SF_ATT, NH * Bp),
                (layout.SF_S64, 2 * Bp), (layout.SF_SX, 1)]
    for (col, n), (next_col, _) in zip(sf_sizes, sf_sizes[1:] + [(None, 0)]):
        end = sc[next_col] if next_col is not None else b.sf.shape[1]
        assert sc[col] + n <= end, (col, sc[col], n, end)
    assert (sc[layout.SF_S64] * 4) % 8 == 0 and (sc[layout.SI_XQ] * 4) % 64 == 0
    assert b.sf.shape[1] % layout.ROW_ALIGN == 0 and b.si.shape[1] % layout.ROW_ALIGN == 0
    Mp, Kp = tab[layout.ROW_DIMS, layout.DIM_MP], tab[layout.ROW_DIMS, layout.DIM_KP]
    assert layout.SI_ACC + Mp <= sc[layout.SI_XQ] and sc[layout.SI_XQ] * 4 + Kp <= sc[layout.SI_EX] * 4
    assert b.si.shape[1] - sc[layout.SI_EX] >= 2 * max(FF, Bp)


def test_pack_vnni_holds_every_weight_once_in_tile_order():
    rng = np.random.default_rng(0)
    for K, M in ((240, 720), (26, 78), (3, 1), (960, 240), (24, 1100)):
        w = rng.integers(-127, 128, (K, M), dtype=np.int8)
        tiles, colsum = pack_vnni(w)
        Kp, Mp = -(-K // 4) * 4, -(-M // 64) * 64
        assert tiles.shape == (Kp * Mp,) and colsum.shape == (Mp,)
        back = tiles.reshape(Mp // 64, Kp // 4, 64, 4).transpose(1, 3, 0, 2).reshape(Kp, Mp)
        np.testing.assert_array_equal(back[:K, :M], w)
        assert not back[K:].any() and not back[:, M:].any()
        np.testing.assert_array_equal(colsum[:M], w.astype(np.int32).sum(axis=0))
        assert not colsum[M:].any()
        np.testing.assert_array_equal(unpack_vnni(tiles, K, M), w)
        # columns as rows (the W8A8 head's embedding rows of wte.T): some, then all
        cols = rng.integers(0, M, 5)
        np.testing.assert_array_equal(unpack_vnni_columns(tiles, K, M, cols), w.T[cols])
        np.testing.assert_array_equal(unpack_vnni_columns(tiles, K, M), w.T)
        # in place, from a transposed view (the int8 head's wte.T), into dirty buffers
        out, sums = np.full(Kp * Mp, 7, np.int8), np.full(Mp, 7, np.int32)
        got = pack_vnni(np.ascontiguousarray(w.T).T, out, sums)
        assert got[0] is out and got[1] is sums
        np.testing.assert_array_equal(out, tiles)
        np.testing.assert_array_equal(sums, colsum)
    with pytest.raises(ValueError, match=r"columns must be in \[0, 1100\), got \[3, 1100\]"):
        unpack_vnni_columns(tiles, K, M, [3, 1100])


def test_w8a8_prefill_rows_equal_the_unfused_kernel():
    """The W8A8 prefill rows of both fused modules (the int8 tile variant chosen at import,
    then the epilogue) give the unfused kernel's output bit for bit; every tile variant is
    checked on its own in tests/test_int8_tile.py."""
    rng = np.random.default_rng(3)
    for N, K, M in ((1, 240, 720), (6, 26, 78), (4, 960, 240)):
        x = rng.standard_normal((N, K)).astype(np.float32)
        wq = rng.integers(-127, 128, (K, M), dtype=np.int8)
        scale = rng.uniform(0.001, 0.01, M).astype(np.float32)
        bias = rng.standard_normal(M).astype(np.float32)
        want = get_backend("numba").matmul_int8(x, wq, scale, bias, mode="w8a8")
        tiles, colsum = pack_vnni(wq)
        Kp, Mp = -(-K // 4) * 4, colsum.size
        for fk in (numba_fused, fused_kernels("cython")):
            y = np.zeros((N, M), np.float32)
            fk.linear_w8a8_rows(y, np.zeros((N, Kp), np.int8), np.zeros(N, np.float32),
                                np.zeros((N, Mp), np.int32), x, tiles, colsum, scale, bias, 1)
            np.testing.assert_array_equal(y, want, err_msg=f"{fk.__name__} N={N} K={K} M={M}")


def test_w8a8_stages_are_the_unfused_kernels():
    """A W8A8 model's stages before a quantization must round as the unfused path: numba's
    fused path calls numba_kernels' loops themselves (the Cython one includes the same
    _cython_loops.pxi as _cython_kernels; the logits of both are compared bit for bit in
    test_fused_equals_unfused_at_every_step). The quantizer both share gives numpy_ref's
    bits on the edge cases."""
    for name in ("_layernorm", "_attention", "_gelu", "_matmul_row", "_matmul_int8_row",
                 "_matmul_nt_row", "_quantize_row", "_w8a8_epilogue"):
        assert getattr(numba_fused, name) is getattr(numba_kernels, name), name
    rng = np.random.default_rng(5)
    x = rng.standard_normal(960).astype(np.float32)
    rows = [x, 0 * x, np.full(960, 1e-40, np.float32), np.where(np.arange(960) == 5, np.nan, x),
            np.where(np.arange(960) == 7, -np.inf, x), x * np.float32(1e30), np.round(x * 10) / 20]
    for row in rows:
        row = row.astype(np.float32)[None]
        want_q, want_s = numpy_ref.quantize_rows(row)
        for backend in FUSED_BACKENDS:
            got_q, got_s = get_backend(backend).quantize_rows(row)
            np.testing.assert_array_equal(got_q, want_q, err_msg=backend)
            np.testing.assert_array_equal(got_s, want_s, err_msg=backend)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_weights_are_stored_once(config_params, backend):
    config, params = config_params
    qparams, _ = quantize_model(params, config, "ffn")
    for p, mode in ((params, "weight-only"), (qparams, "w8a8")):
        e = Engine(config, p, backend, int8_mode=mode)
        w = e.fused.weights
        assert np.shares_memory(e.wte, w.pf) and np.shares_memory(e.wpe, w.pf)
        for l, blk in enumerate(e.blocks):
            for name, layer in blk.items():
                if isinstance(layer, Linear):
                    assert np.shares_memory(layer.weight, w.pf), name
                elif isinstance(layer, Int8Linear):
                    # weight-only: the (K, M) array; W8A8: the tiles alone, all the fused path
                    # reads, visible to memory accounting; weight_q rebuilt from them
                    assert (layer.stored_q is None) == (layer.packed is not None) == (mode == "w8a8"), name
                    kept = layer.packed if mode == "w8a8" else layer.stored_q
                    assert np.shares_memory(kept, w.pq), name
                    np.testing.assert_array_equal(layer.weight_q, p[f"h.{l}.{name}.weight"])
        sizes = e.fused.nbytes()
        assert sizes["weights"] == w.pf.nbytes + w.pq.nbytes + w.pi.nbytes + w.tab.nbytes


def test_fused_option():
    config = CONFIGS[0]
    params = init_params(config)
    assert Engine(config, params, "numpy").fused is None  # numpy: the reference path
    assert isinstance(Engine(config, params, "numba").fused, FusedPath)
    assert Engine(config, params, "cython", fused=False).fused is None
    with pytest.raises(ValueError, match="backend 'numpy' has no fused path"):
        Engine(config, params, "numpy", fused=True)
    with pytest.raises(ValueError, match="fused='yes'"):
        Engine(config, params, "numba", fused="yes")
    e = Engine(config, params, "numba")
    e.prefill([1])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 37\)"):
        e.decode(37)
