"""Generation past the context and several sequences at once (minitf/engine.py).

- context_mode "shift" against an independent reference built from full forward passes
  over the same windows (the window is the prompt's last block_size tokens; a token joins
  it while there is room, and when it is full the window becomes the last `keep` tokens);
- context_mode "exact" against a full forward over the last block_size tokens of
  everything so far, at every step (nanoGPT's crop);
- `generate_batch`: every row gives the tokens, and bit for bit the logits, that batch-1
  generation gives with the same prompt and sampler, on every backend, float32 and int8;
  rows that finish early (their own max_new_tokens, or `stop`) finish alone.

The full forward passes: minitf.model.GPT in float64 (an independent code path through
minitf.layers) for float32 and weight-only int8 models (with the dequantized weights); for
W8A8, whose activations are quantized at run time, the same backend's unfused engine over
the whole window (numpy_ref's ops for the numpy backend)."""

import numpy as np
import pytest

from minitf.config import GPTConfig
from minitf.engine import CONTEXT_MODES, Engine, GenerationStats
from minitf.model import GPT, init_params
from minitf.quantization import dequantize, quantize_model
from minitf.sampling import Sampler
from tolerances import TOL

BACKENDS = ["numpy", "numba", "cython"]
CONFIG = GPTConfig(vocab_size=37, block_size=12, n_layer=2, n_head=3, d_model=24)
B = CONFIG.block_size
MODELS = {"float32": None, "int8-weight-only": ("ffn", "weight-only"), "int8-w8a8": ("all", "w8a8"),
          "int8-w8a8-ffn": ("ffn", "w8a8"),  # float attention layers before int8
          # with the int8 tied head (quantize --int8-head)
          "int8-weight-only-head": ("ffn", "weight-only", True), "int8-w8a8-head": ("all", "w8a8", True)}
PROMPTS = {"shorter": 3, "equal": B, "longer": B + 5}  # prompt lengths against the context
N_NEW = 2 * B + 5  # past the context more than once
TOL_LOGITS = TOL[("kv_cache_logits", np.float32)]


@pytest.fixture(scope="module")
def params():
    p = init_params(CONFIG, seed=4)
    rng = np.random.default_rng(9)
    for name in p:  # larger weights than at init, so the logits differ clearly by token
        p[name] = (p[name] + rng.normal(scale=0.2, size=p[name].shape)).astype(np.float32)
    return p


def model(params, name):
    """(engine params, int8 mode, full_forward(backend) -> (window -> last logits (V,)))."""
    quant = MODELS[name]
    if quant is None:
        gpt = GPT(CONFIG, {k: v.astype(np.float64) for k, v in params.items()})
        return params, "weight-only", lambda backend: lambda w: gpt.forward(np.array([w]))[0][0][-1].copy()
    q, _ = quantize_model(params, CONFIG, quant[0], head=quant[2:] == (True,))
    if quant[1] == "weight-only":  # the same float math on the dequantized weights
        deq = {k: v.astype(np.float64) for k, v in q.items() if not k.endswith("_scale")}
        for k in deq:
            if q[k].dtype == np.int8 and k == "wte":  # the int8 head: a scale per row
                deq[k] = q[k].astype(np.float64) * q[k + "_scale"].astype(np.float64)[:, None]
            elif q[k].dtype == np.int8:
                deq[k] = dequantize(q[k], q[k + "_scale"]).astype(np.float64)
        gpt = GPT(CONFIG, deq)
        return q, "weight-only", lambda backend: lambda w: gpt.forward(np.array([w]))[0][0][-1].copy()

    def w8a8_forward(backend):
        ref = Engine(CONFIG, q, backend, int8_mode="w8a8", fused=False)
        return lambda w: ref.forward(w)[-1]

    return q, "w8a8", w8a8_forward


def engine_and_forward(params, backend, name):
    """(engine, its reference full forward, whether the model is W8A8) for MODELS[name]."""
    p, mode, forward = model(params, name)
    return Engine(CONFIG, p, backend, int8_mode=mode), forward(backend), mode == "w8a8"


def prompt_of(length, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=length)]


class Keep:
    """Wraps a sampler, keeping a copy of every logits vector it is given."""

    def __init__(self, sample):
        self.sample, self.logits = sample, []

    def __call__(self, logits):
        self.logits.append(np.array(logits, dtype=np.float64))
        return self.sample(logits)


def greedy(logits):
    return int(np.argmax(logits))


def samplers(kind, seed=0):
    """A fresh sampler: greedy, or nucleus sampling with its own seeded generator."""
    return greedy if kind == "greedy" else Sampler(temperature=1.0, top_p=0.9, seed=seed)


def shift_reference(forward, prompt, n, sample, keep):
    """Tokens and logits from full forward passes over the windows of context_mode shift."""
    window, tokens, logits = list(prompt[-B:]), [], []
    for _ in range(n):
        lg = forward(window)
        tokens.append(sample(lg))
        logits.append(lg)
        window = (window + [tokens[-1]])[-keep:] if len(window) == B else window + [tokens[-1]]
    return tokens, logits


def crop_reference(forward, prompt, n, sample):
    """Tokens and logits of nanoGPT's generate: each step sees the last B tokens of all."""
    ids, logits = list(prompt), []
    for _ in range(n):
        logits.append(forward(ids[-B:]))
        ids.append(sample(logits[-1]))
    return ids[len(prompt):], logits


def max_error(got, want) -> float:
    """Largest max |got - want| / max(1, max |want|) over the steps (float32 logits of
    magnitude ~10 are a few ulp apart at 1e-5)."""
    return max(float(np.abs(g - w).max() / max(1.0, np.abs(w).max())) for g, w in zip(got, want))


def check_against(engine_run, ref, label, w8a8):
    """Tokens identical; logits within 1e-5 at every step, or for W8A8 within one int8
    step of an activation: a float stage before a quantization that rounds 1 ulp apart in
    the cached decode and in the full forward (a 1-row and a T-row product of a float
    layer) can put an activation in the next int8 step (measured here: 6.6e-3 on numpy
    with float attention layers; 0 on the compiled backends, whose int8 sums are exact)."""
    (tokens, logits), (ref_tokens, ref_logits) = engine_run, ref
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
    assert tokens == ref_tokens, f"{label}: tokens differ from step {first}"
    err = max_error(logits, ref_logits)
    tol = TOL[("kv_cache_logits_w8a8", np.float32)] if w8a8 else TOL_LOGITS
    assert err <= tol, f"{label}: logits error {err:.2e} > {tol}"


@pytest.mark.parametrize("prompt_len", list(PROMPTS.values()), ids=list(PROMPTS))
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_equals_full_forwards_over_the_same_windows(params, backend, name, prompt_len):
    engine, forward, w8a8 = engine_and_forward(params, backend, name)
    prompt = prompt_of(prompt_len)
    for keep, kind in ((None, "greedy"), (1, "sampled"), (B - 1, "greedy"), (B // 2, "sampled")):
        got = Keep(samplers(kind, seed=7))
        tokens = list(engine.generate(prompt, N_NEW, got, keep=keep))
        ref = shift_reference(forward, prompt, N_NEW, samplers(kind, seed=7), keep or B // 2)
        check_against((tokens, got.logits), ref, f"{backend} {name} keep={keep} {kind}", w8a8)


@pytest.mark.parametrize("prompt_len", list(PROMPTS.values()), ids=list(PROMPTS))
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_equals_a_full_forward_over_the_last_block_size_tokens(params, backend, name, prompt_len):
    engine, forward, w8a8 = engine_and_forward(params, backend, name)
    prompt = prompt_of(prompt_len, seed=1)
    for kind in ("greedy", "sampled"):
        got = Keep(samplers(kind, seed=3))
        tokens = list(engine.generate(prompt, N_NEW, got, context_mode="exact"))
        ref = crop_reference(forward, prompt, N_NEW, samplers(kind, seed=3))
        check_against((tokens, got.logits), ref, f"{backend} {name} exact {kind}", w8a8)


ROW_PROMPTS = [1, 5, B, B + 7, 3, 8]  # rows of different lengths, around the context
ROW_BUDGETS = [N_NEW, 4, 0, N_NEW, 9, 2 * B]  # rows finish at different steps


def batch_1(engine, prompt, n, kind, seed, **kw):
    keep = Keep(samplers(kind, seed))
    return list(engine.generate(prompt, n, keep, **kw)), keep.logits


@pytest.mark.parametrize("context_mode", CONTEXT_MODES)
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_rows_equal_batch_1_bit_for_bit(params, backend, name, context_mode):
    """Each row of generate_batch gives the tokens and the logits (bit for bit: W8A8
    quantizes each row with its own scale) of generate() alone, greedy and sampled rows
    mixed; a row stops at its own max_new_tokens (0: it never starts); the rest go on."""
    p, mode, _ = model(params, name)
    engine = Engine(CONFIG, p, backend, int8_mode=mode)
    prompts = [prompt_of(n, seed=10 + i) for i, n in enumerate(ROW_PROMPTS)]
    kinds = ["greedy", "sampled", "greedy", "sampled", "sampled", "greedy"]
    rows = [Keep(samplers(k, seed=i)) for i, k in enumerate(kinds)]
    got = [[] for _ in prompts]
    steps = list(engine.generate_batch(prompts, ROW_BUDGETS, rows, context_mode=context_mode))
    for step in steps:
        assert len(step) == len(prompts)
        for r, token in enumerate(step):
            if token is not None:
                got[r].append(token)
    assert len(steps) == max(ROW_BUDGETS)
    for r, (prompt, n, kind) in enumerate(zip(prompts, ROW_BUDGETS, kinds)):
        tokens, logits = batch_1(engine, prompt, n, kind, r, context_mode=context_mode)
        assert got[r] == tokens, f"{backend} {name} row {r}: tokens differ from batch 1"
        assert len(rows[r].logits) == n
        for t, (a, b) in enumerate(zip(rows[r].logits, logits)):
            assert np.array_equal(a, b), f"{backend} {name} row {r} step {t}: logits differ by {np.abs(a - b).max():.2e}"
        # a finished row yields None from its next step on
        assert all(step[r] is None for step in steps[n:])


@pytest.mark.parametrize("name", ["float32", "int8-w8a8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_of_samplers_equals_batch_1(params, backend, name):
    """Rows given bare Samplers (drawn together, a numpy pass per group of equal settings:
    minitf.sampling.sample_rows) give the tokens generate() gives alone with the same seed,
    past the context too; two groups of settings and a greedy row."""
    p, mode, _ = model(params, name)
    engine = Engine(CONFIG, p, backend, int8_mode=mode)
    settings = [(1.0, None, 0.9), (0.8, 5, None), (1.0, None, 0.9), (0.0, None, None), (0.8, 5, None)]
    prompts = [prompt_of(n, seed=20 + i) for i, n in enumerate((1, 4, B, 7, B + 3))]
    rows = [Sampler(t, k, q, seed=i) for i, (t, k, q) in enumerate(settings)]
    got = [[] for _ in prompts]
    for step in engine.generate_batch(prompts, N_NEW, rows):
        for r, token in enumerate(step):
            got[r].append(token)
    for r, (prompt, (t, k, q)) in enumerate(zip(prompts, settings)):
        alone = list(engine.generate(prompt, N_NEW, Sampler(t, k, q, seed=r)))
        assert got[r] == alone, f"{backend} {name} row {r}: tokens differ from batch 1"


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_batch_decodes_all_rows_in_one_compiled_call_per_step(params, backend):
    engine = Engine(CONFIG, params, backend)
    ops = []
    engine.trace = ops.append
    prompts = [prompt_of(n, seed=i) for i, n in enumerate((2, 4, 6, 3))]
    steps = list(engine.generate_batch(prompts, 5, [greedy] * 4))
    assert len(steps) == 5
    # 4 prefills, then 4 steps that forward a token (the last token is never forwarded)
    assert ops.count("decode_step") == 4 and ops.count("sample") == 20
    assert ops.count("embedding") == 4  # the prompts' prefills, nothing per row after


def test_a_row_stopped_by_stop_finishes_alone(params):
    engine = Engine(CONFIG, params, "numba")
    prompts = [prompt_of(4, seed=i) for i in range(3)]
    calls = []

    def stop(row, token):
        calls.append((row, token))
        return row == 1 and sum(r == 1 for r, _ in calls) == 3  # row 1 after its 3rd token

    steps = list(engine.generate_batch(prompts, 10, [greedy] * 3, stop=stop))
    assert [s[1] is not None for s in steps] == [True] * 3 + [False] * 7
    for r in (0, 2):
        assert [s[r] for s in steps] == list(engine.generate(prompts[r], 10, greedy))
    assert [s[1] for s in steps[:3]] == list(engine.generate(prompts[1], 3, greedy))


def test_stats_account_for_every_token(params):
    engine = Engine(CONFIG, params, "numba")
    prompt, n, keep = prompt_of(5), 40, 4
    stats = GenerationStats()
    list(engine.generate(prompt, n, greedy, keep=keep, stats=stats))
    # the reference's windows: a token is decoded while there is room, else re-prefilled
    filled, decodes, reprefills = len(prompt), 0, 0
    for _ in range(n - 1):  # the last token is sampled, never forwarded
        if filled < B:
            filled, decodes = filled + 1, decodes + 1
        else:
            filled, reprefills = keep, reprefills + 1
    assert (stats.rows, stats.new_tokens, stats.prefill_tokens) == (1, n, len(prompt))
    assert (stats.decode_tokens, stats.decode_steps, stats.reprefills) == (decodes, decodes, reprefills)
    assert stats.reprefill_tokens == reprefills * keep
    assert min(stats.prefill_s, stats.decode_s, stats.reprefill_s, stats.sample_s) > 0
    exact = GenerationStats()
    list(engine.generate(prompt, n, greedy, context_mode="exact", stats=exact))
    assert exact.decode_tokens == B - len(prompt) and exact.reprefills == n - 1 - (B - len(prompt))
    one = GenerationStats()
    assert len(list(engine.generate(prompt, 1, greedy, stats=one))) == 1
    assert (one.decode_steps, one.reprefills, one.new_tokens) == (0, 0, 1)


def test_bad_arguments(params):
    engine = Engine(CONFIG, params, "numpy")
    with pytest.raises(ValueError, match="context_mode='sliding' is not one of"):
        engine.generate([1], 3, greedy, context_mode="sliding")
    with pytest.raises(ValueError, match=r"keep=0 must be an integer in \[1, 12\]"):
        engine.generate([1], 3, greedy, keep=0)
    with pytest.raises(ValueError, match=r"keep=13 must be an integer in \[1, 12\]"):
        engine.generate([1], 3, greedy, keep=13)
    with pytest.raises(ValueError, match="keep=4 applies to context_mode 'shift' only"):
        engine.generate([1], 3, greedy, context_mode="exact", keep=4)
    with pytest.raises(ValueError, match="at least one prompt"):
        engine.generate_batch([], 3, [])
    with pytest.raises(ValueError, match="a list of 2 samplers"):
        engine.generate_batch([[1], [2]], 3, [greedy])
    with pytest.raises(ValueError, match="a list of 2 samplers"):
        engine.generate_batch([[1], [2]], 3, greedy)
    with pytest.raises(ValueError, match="max_new_tokens has 3 entries for 2 prompts"):
        engine.generate_batch([[1], [2]], [3, 3, 3], [greedy, greedy])
    with pytest.raises(ValueError, match="max_new_tokens=-1 must be an integer >= 0"):
        engine.generate_batch([[1], [2]], [3, -1], [greedy, greedy])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate_batch([[1], []], 3, [greedy, greedy])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 37\)"):
        engine.generate_batch([[1], [37]], 3, [greedy, greedy])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 37\), got 99"):
        list(engine.generate([1], 3, lambda logits: 99))


@pytest.mark.parametrize("prompt, fragment", [
    ([1.7, 2.2], "prompt_ids: token ids must be integers in [0, 37), in a flat list, got [1.7, 2.2]"),
    ([[1, 2]], "prompt_ids: token ids must be integers"),
    ([[1], [2, 3]], "prompt_ids: token ids must be integers"),
    ([True, False], "prompt_ids: token ids must be integers"),
    (["a"], "prompt_ids: token ids must be integers"),
    ([10**30], "prompt_ids: token ids must be integers"),
    ([-1], "prompt_ids: token ids must be in [0, 37), got [-1, -1]"),
])
def test_prompt_ids_that_are_not_token_ids_are_refused(params, prompt, fragment):
    engine = Engine(CONFIG, params, "numpy")
    with pytest.raises(ValueError) as e:
        engine.generate(prompt, 3, greedy)
    assert fragment in str(e.value), e.value
    with pytest.raises(ValueError, match=r"prompts\[1\]: token ids must be"):
        engine.generate_batch([[1], prompt], 3, [greedy, greedy])


@pytest.mark.parametrize("name, value", [
    ("max_new_tokens", float("nan")), ("max_new_tokens", 2.5), ("max_new_tokens", 3.0),
    ("max_new_tokens", True), ("max_new_tokens", float("inf")),
    ("keep", float("nan")), ("keep", float("inf")), ("keep", 2.0), ("keep", True),
])
def test_counts_that_are_not_integers_are_refused_naming_them(params, name, value):
    engine = Engine(CONFIG, params, "numpy")
    kwargs = {"max_new_tokens": 3, name: value}
    with pytest.raises(ValueError, match=rf"^{name}={value!r} must be an integer"):
        engine.generate([1], sample=greedy, **kwargs)


def test_a_sampler_that_returns_nan_is_one_clear_error(params):
    engine = Engine(CONFIG, params, "numpy")
    with pytest.raises(ValueError, match="got nan, which is not an integer"):
        list(engine.generate([1], 3, lambda logits: float("nan")))


def test_a_later_generation_supersedes_an_unfinished_one(params):
    """Both would use the same caches: the older one raises at its next step instead of
    giving tokens computed from the newer one's cache."""
    engine = Engine(CONFIG, params, "numpy")
    alone = list(Engine(CONFIG, params, "numpy").generate([1, 2, 3], 6, greedy))
    first = engine.generate([1, 2, 3], 6, greedy)
    assert next(first) == alone[0]
    second = engine.generate([4, 5], 6, greedy)
    with pytest.raises(RuntimeError, match="superseded by a later generate\\(\\), prefill\\(\\) "
                                           "or decode\\(\\) on the same Engine.*use one Engine "
                                           "per concurrent generation"):
        next(first)
    assert len(list(second)) == 6
    assert list(engine.generate([1, 2, 3], 6, greedy)) == alone  # a new one runs as alone


@pytest.mark.parametrize("call", ["prefill", "decode"])
def test_prefill_or_decode_supersedes_an_unfinished_generation(params, call):
    """prefill() and decode() write row 0's cache too: the generator raises rather than
    going on from a cache they changed."""
    engine = Engine(CONFIG, params, "numpy")
    gen = engine.generate([1, 2, 3], 6, greedy)
    next(gen)
    if call == "prefill":
        engine.prefill([4, 5])
    else:
        engine.decode(4)
    with pytest.raises(RuntimeError, match=f"superseded by a later .*{call}"):
        next(gen)


def test_rows_beyond_memory_are_refused_before_allocation(params, monkeypatch):
    from minitf import config as config_module

    engine = Engine(CONFIG, params, "numpy")
    monkeypatch.setattr(config_module, "memory_limit", lambda: 10**8)
    with pytest.raises(ValueError, match=r"generating 100,000 sequences together needs at least "
                                         r".*lower the number of prompts"):
        engine.generate_batch([[1]] * 100_000, 3, [greedy] * 100_000)
    assert engine.rows == 1  # nothing was reserved
