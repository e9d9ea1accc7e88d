"""See inside a generation: attention over the prompt and memory after every operation.

    python -m minitf.generate --prompt "ROMEO:" --max-new-tokens 100 --viz out/

writes to out/:

- `attn_prefill.png`: the attention weights of the prefill, one heatmap per head (rows:
  layers, columns: heads), prompt tokens on the axes, one colour scale [0, 1];
- `memory_log.png` and `memory_log.csv`: memory in use after each operation of the
  generation (embedding, each block's ln_1 / attn / residual_1 / ln_2 / mlp / residual_2,
  ln_f, head, sample), prefill and every decode step, split into weights, KV cache and
  activations.

Both show the path that ran (the engine's `path`: "fused" for numba and cython, "unfused"
for numpy or fused=False; titles and the CSV's `path` column say which): the hooks do not
change it. On the fused path the prefill reports every operation as the unfused one does,
and a decode step, one compiled call, is one operation, `decode_step`.

How it is measured. `Recorder` only sets the engine's two hooks (`engine.trace`, called
after every operation, and `engine.capture_attention`) and starts `tracemalloc`, which sees
every numpy array allocation. Nothing else in the engine changes, and a run without `--viz`
never imports this module (nor matplotlib). For each operation it records:

- weights: the summed `nbytes` of the arrays the engine holds (wte, wpe, LayerNorms, every
  Linear / Int8Linear, the fused path's tiled W8A8 copies included); for a float model on
  the unfused path, the model's parameter bytes;
- KV cache: the rows written so far, counted per layer as the forward pass writes them
  (layer l's keys and values are written in its `attn` operation, every layer's in a
  `decode_step`), times the row size; the preallocated cache size is logged too
  (`kv_cache_allocated_bytes`);
- activations: memory allocated since the recorder started and still alive after the
  operation (tracemalloc's current traced bytes minus the baseline at start), plus the
  buffers the path allocated once for its activations (`buffers_bytes`: on the fused path
  its scratch, the transposed KV cache and the index table; 0 on the unfused path, which
  allocates per operation). Weights and cache were allocated before and are not in it. The
  recorder's own log and the attention copy kept for the picture
  (`attention_capture_bytes`) are excluded. `activations_peak_bytes` is the highest value
  reached *during* the operation (tracemalloc's peak, plus the buffers), which includes
  temporaries freed before it returned.
"""

from __future__ import annotations

import csv
import gc
import os
import tracemalloc
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("index", "phase", "step", "op", "weights_bytes", "kv_cache_bytes",
               "kv_cache_allocated_bytes", "activations_bytes", "traced_bytes",
               "activations_peak_bytes", "attention_capture_bytes", "buffers_bytes", "path")
_LOGGED = len(CSV_COLUMNS) - 2  # columns kept in the int64 log: all but index and path
PHASES = ("prefill", "decode")
BLOCK_OPS = ("ln_1", "attn", "residual_1", "ln_2", "mlp", "residual_2")
_CHUNK = 4096  # log rows per chunk
# Recorder._state slots: rows logged, traced bytes at start, forward-pass index, phase,
# first position of the pass, its tokens, traced now, traced peak, rows in full chunks,
# bytes of log chunks allocated after the start
_N, _BASE, _STEP, _PHASE, _START, _T, _CUR, _PEAK, _DONE, _OWN = range(10)


def engine_weight_arrays(engine) -> list[np.ndarray]:
    """Every weight array the engine holds (wte, wpe, LayerNorms, Linear / Int8Linear arrays)."""
    arrays = [engine.wte, engine.wpe, *engine.ln_f]
    for blk in engine.blocks:
        for value in blk.values():
            if isinstance(value, tuple):  # a LayerNorm (weight, bias)
                arrays.extend(value)
            else:  # Linear (weight, bias) or Int8Linear (weight_q, scale, bias)
                arrays.extend(v for v in vars(value).values() if isinstance(v, np.ndarray))
    return arrays


def token_label(tokenizer, token_id: int) -> str:
    """A visible label for a token: newline as '\\n', tab as '\\t', space as '␣'."""
    text = tokenizer.token_bytes(int(token_id)).decode("utf-8", errors="replace")
    return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
            .replace(" ", "\u2423")) or "\u2205"


class Recorder:
    """Records one generation of `engine` for the pictures; `finish()` writes them.

    Args:
        engine: a minitf.engine.Engine; construct the recorder before generating.
        tokenizer: for the prompt's token labels.
        prompt_ids: the prompt as the model sees it (its last block_size tokens).
        out_dir: directory for the files (created if missing).
        model_name: shown in the titles.

    After generation: `rows` is the memory log (one tuple per operation, CSV_COLUMNS order)
    and `attention` the prompt prefill's weights, n_layer arrays (n_head, T, T).
    """

    def __init__(self, engine, tokenizer, prompt_ids, out_dir, model_name: str = "minitf"):
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.out_dir = Path(out_dir)
        self.model_name = model_name
        cfg = engine.config
        self.n_layer, self.d_model = cfg.n_layer, cfg.d_model
        self.weights_bytes = int(sum(a.nbytes for a in engine_weight_arrays(engine)))
        self.kv_row_bytes = engine.k_cache.itemsize * self.d_model  # one position of one layer, K or V
        self.kv_allocated_bytes = int(engine.k_cache.nbytes + engine.v_cache.nbytes)
        self.path = engine.path.NAME  # "fused" or "unfused": what the pictures show
        self.buffers_bytes = int(engine.path.buffer_bytes())  # allocated once, always in use
        self._chunks = [np.zeros((_CHUNK, _LOGGED), dtype=np.int64)]  # the log
        self._state = np.zeros(10, dtype=np.int64)  # see the _N, ... slots
        self._state[_STEP] = -1
        names = ["embedding"] + [f"h.{l}.{op}" for l in range(self.n_layer) for op in BLOCK_OPS]
        names += ["ln_f", "head", "decode_step", "sample"]
        self._op_codes = {name: i for i, name in enumerate(names)}
        self._filled = np.zeros(self.n_layer, dtype=np.int64)  # cache rows written, per layer
        self.attention: list[np.ndarray] | None = None  # the prompt's prefill
        self._old_hooks = (engine.trace, engine.capture_attention)
        self._finished = False

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._started_tracemalloc = not tracemalloc.is_tracing()
        if self._started_tracemalloc:
            tracemalloc.start()
        engine.capture_attention = True
        engine.trace = self._trace
        self._state[_BASE] = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()

    # ------------------------------------------------------------------------------------
    def _attention_capture_bytes(self) -> int:
        held = self.engine.last_attention
        n = sum(a.nbytes for a in self.attention) if self.attention is not None else 0
        if held is not None and held is not self.attention:
            n += sum(a.nbytes for a in held)
        return n

    def _trace(self, op: str) -> None:
        """Called by the engine after every operation.

        The recorder keeps no Python object per operation: the log is written into int64
        arrays allocated in chunks, whose bytes are subtracted from the activations, and the
        op names are interned at construction, so what tracemalloc sees growing is the
        engine's memory, not the recorder's."""
        st = self._state
        st[_CUR:_PEAK + 1] = tracemalloc.get_traced_memory()
        # no garbage collection in here: what it frees belongs to the engine's timeline
        gc_enabled = gc.isenabled()
        gc.disable()
        self._record(op)
        tracemalloc.reset_peak()
        if gc_enabled:
            gc.enable()

    def _record(self, op: str) -> None:
        eng, st = self.engine, self._state
        code = self._op_codes.get(op)
        if code is None:  # a name not known in advance: keep our own copy
            code = self._op_codes.setdefault(op.encode().decode(), len(self._op_codes))
        if op == "embedding":  # the first operation of a forward pass: which one is it?
            st[_STEP] += 1
            if eng.pos == 0:  # prefill (pos is reset to 0 first; a decode always has pos >= 1)
                att = eng.last_attention  # (n_head, T, T) per layer, made by this prefill
                st[_PHASE], st[_START] = 0, 0
                st[_T] = att[0].shape[1] if att is not None else len(self.prompt_ids)
                if self.attention is None and att is not None:
                    self.attention = att  # the prompt's; a sliding window re-prefills later
                self._filled[:] = 0  # the cache is rewritten from row 0
            else:  # decode: one token at position pos (pos is advanced after the pass)
                st[_PHASE], st[_START], st[_T] = 1, eng.pos, 1
        elif op == "decode_step":  # a fused decode step: one token, every layer, one call
            st[_STEP] += 1
            st[_PHASE], st[_START], st[_T] = 1, eng.pos, 1
            self._filled[:] = eng.pos + 1
        elif op.startswith("h.") and op.endswith(".attn"):  # layer l wrote its K, V rows
            self._filled[int(op[2:op.index(".", 2)])] = st[_START] + st[_T]
        own = st[_BASE] + st[_OWN] + self._attention_capture_bytes()  # not the engine's
        n = st[_N] - st[_DONE]
        if n == _CHUNK:  # the current chunk is full: a new one, the recorder's from now on
            self._chunks.append(np.zeros((_CHUNK, _LOGGED), dtype=np.int64))
            st[_DONE] += _CHUNK
            st[_OWN] += self._chunks[-1].nbytes
            n = 0
        row = self._chunks[-1][n]
        row[0], row[1], row[2], row[3] = st[_PHASE], st[_STEP], code, self.weights_bytes
        row[4] = 2 * self._filled.sum() * self.kv_row_bytes
        row[5] = self.kv_allocated_bytes
        row[6] = st[_CUR] - own + self.buffers_bytes
        row[7] = st[_CUR]
        row[8] = st[_PEAK] - own + self.buffers_bytes
        row[9] = own - st[_BASE] - st[_OWN]
        row[10] = self.buffers_bytes
        st[_N] += 1

    # ------------------------------------------------------------------------------------
    @property
    def rows(self) -> list[tuple]:
        """The memory log, one tuple per operation in CSV_COLUMNS order."""
        names = {code: name for name, code in self._op_codes.items()}
        buf = np.concatenate(self._chunks)[:self._state[_N]]
        return [(i, PHASES[r[0]], int(r[1]), names[int(r[2])], *(int(v) for v in r[3:]), self.path)
                for i, r in enumerate(buf)]

    def log(self) -> dict[str, np.ndarray]:
        """The memory log as {column: array}."""
        rows = self.rows
        cols = list(zip(*rows)) if rows else [()] * len(CSV_COLUMNS)
        return {name: np.asarray(c) for name, c in zip(CSV_COLUMNS, cols)}

    def finish(self) -> list[Path]:
        """Stop recording, restore the engine's hooks and write the files; their paths."""
        if not self._finished:
            self._finished = True
            self.engine.trace, self.engine.capture_attention = self._old_hooks
            if self._started_tracemalloc:
                tracemalloc.stop()
        paths = [self.write_csv(self.out_dir / "memory_log.csv")]
        title = self._title()
        if self._state[_N]:
            paths.append(plot_memory_log(self.log(), self.out_dir / "memory_log.png", title,
                                         prompt_tokens=len(self.prompt_ids),
                                         n_layer=self.n_layer, d_model=self.d_model))
        if self.attention is not None:
            T = self.attention[0].shape[1]
            labels = [token_label(self.tokenizer, t) for t in self.prompt_ids[-T:]]
            prompt = self.tokenizer.decode(self.prompt_ids[-T:])
            paths.append(plot_attention(self.attention, labels, self.out_dir / "attn_prefill.png",
                                        f"{self.model_name}: attention weights of the prefill "
                                        f"({self._where()})", prompt))
        return paths

    def _title(self) -> str:
        log = self.log()
        n_prompt = len(self.prompt_ids)
        n_new = int(np.sum(log["op"] == "sample")) if len(log["op"]) else 0
        return (f"{self.model_name} ({self._where()}): memory after each operation, "
                f"{n_prompt} prompt tokens + {n_new} generated")

    def _where(self) -> str:
        """Which backend and path the pictures show."""
        return f"{self.engine.backend} backend, {self.path} path"

    def write_csv(self, path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            w.writerows(self.rows)
        os.replace(tmp, path)
        return path


# ----------------------------------------------------------------------------------------
# Pictures (matplotlib is imported only here, lazily)


def _unit(max_bytes: float) -> tuple[float, str]:
    if max_bytes >= 2 ** 20:
        return 2.0 ** 20, "MiB"
    return 2.0 ** 10, "KiB"


def _spans(phase: np.ndarray, value: str) -> list[tuple[int, int]]:
    """[(first, last)] index ranges where phase == value."""
    spans, start = [], None
    for i, p in enumerate(list(phase) + [None]):
        if p == value and start is None:
            start = i
        elif p != value and start is not None:
            spans.append((start, i - 1))
            start = None
    return spans


def plot_memory_log(log: dict, path, title: str, prompt_tokens: int | None = None,
                    n_layer: int | None = None, d_model: int | None = None) -> Path:
    """memory_log.png: weights + KV cache + activations stacked, then the KV cache and the
    activations each on their own scale, against operation index; prefill shaded, peak marked.

    Args:
        log: {column: array} as `Recorder.log()` returns it.
        prompt_tokens, n_layer, d_model: optional, for the labels.
    """
    from .plots import _pyplot, save_figure_atomic

    plt = _pyplot()
    x = np.asarray(log["index"])
    w = np.asarray(log["weights_bytes"], dtype=float)
    kv = np.asarray(log["kv_cache_bytes"], dtype=float)
    kv_alloc = float(log["kv_cache_allocated_bytes"][0])
    act = np.asarray(log["activations_bytes"], dtype=float)
    act_peak = np.maximum(np.asarray(log["activations_peak_bytes"], dtype=float), act)
    phase, ops, steps = np.asarray(log["phase"]), np.asarray(log["op"]), np.asarray(log["step"])
    total = w + kv + act
    dec = phase == "decode"

    fig = plt.figure(figsize=(11, 12.5), layout="constrained")
    gs = fig.add_gridspec(4, 2, height_ratios=[1.5, 1, 1, 1.3])
    ax0 = fig.add_subplot(gs[0, :])
    ax1 = fig.add_subplot(gs[1, :], sharex=ax0)
    ax2 = fig.add_subplot(gs[2, :], sharex=ax0)
    zk, za = fig.add_subplot(gs[3, 0]), fig.add_subplot(gs[3, 1])
    axes = (ax0, ax1, ax2)
    ax0.tick_params(labelbottom=False)
    ax1.tick_params(labelbottom=False)
    c_w, c_kv, c_act = "#4C72B0", "#DD8452", "#55A868"
    xmax = x[-1] + 1
    for ax in axes:
        ax.set_xlim(0, xmax)
        ax.grid(alpha=0.25)
        for a, b in _spans(phase, "prefill"):
            ax.axvspan(a, b + 1, color="0.5", alpha=0.16, lw=0)

    # 1. everything, stacked
    u, uname = _unit(total.max())
    top = total.max() / u
    ax0.fill_between(x, 0, w / u, step="post", color=c_w, alpha=0.85, lw=0,
                     label=f"weights ({w[0] / u:.2f} {uname}, constant)")
    ax0.fill_between(x, w / u, (w + kv) / u, step="post", color=c_kv, alpha=0.95, lw=0,
                     label="KV cache (rows in use)")
    ax0.fill_between(x, (w + kv) / u, total / u, step="post", color=c_act, alpha=0.95, lw=0,
                     label="activations (alive after the op)")
    ax0.set_ylim(0, top * 1.32)
    ax0.set_ylabel(f"memory in use ({uname})")
    k = int(np.argmax(total))
    ax0.plot([x[k] + 0.5], [total[k] / u], "v", color="crimson", ms=9, zorder=5)
    where = f"decode step {steps[k]}" if dec[k] else "prefill"
    ax0.annotate(f"peak {total[k] / u:.3f} {uname} after op {x[k]} ({ops[k]}, {where})",
                 (x[k] + 0.5, total[k] / u), xytext=(float(np.clip(x[k], 0.25 * xmax, 0.75 * xmax)), top * 1.1),
                 ha="center", va="bottom", fontsize=9, color="crimson",
                 arrowprops=dict(arrowstyle="->", color="crimson", lw=1))
    ax0.legend(loc="lower right", fontsize=8.5, framealpha=0.9)
    xt = ax0.get_xaxis_transform()  # x in data, y in axes fraction
    pre = _spans(phase, "prefill")
    if pre:
        label = "prefill" + (f" ({prompt_tokens} tokens)" if prompt_tokens else "")
        ax0.text(pre[0][0], 0.985, label, transform=xt, ha="left", va="top", fontsize=8.5, color="0.2")
    again = np.flatnonzero((phase == "prefill") & (steps > 0))
    if len(again):
        ax0.text(again[0], 0.92 if again[0] < 0.5 * xmax else 0.985,
                 "context full: from here every step re-prefills the last block_size tokens "
                 "(sliding window)", transform=xt, ha="left" if again[0] < 0.5 * xmax else "right",
                 va="top", fontsize=8.5, color="0.2")
    dspans = _spans(phase, "decode")
    if dspans:
        n_dec = len(set(steps[dec].tolist()))
        per = len(x[dec]) / max(n_dec, 1)
        ax0.text(dspans[0][0] + 0.03 * xmax, 0.92, f"decode: {n_dec} steps of one token, "
                 f"{per:.0f} ops each (sample included)", transform=xt, ha="left", va="top",
                 fontsize=8.5, color="0.2")

    # 2. KV cache on its own scale: one row per layer per token
    uk, ukname = _unit(max(kv_alloc, 1.0))
    ax1.plot(x, kv / uk, drawstyle="steps-post", color=c_kv, lw=1.4,
             label="KV cache in use: K and V rows written so far, all layers")
    ax1.axhline(kv_alloc / uk, color=c_kv, ls="--", lw=1,
                label=f"KV cache allocated ({kv_alloc / uk:.1f} {ukname}: block_size rows)")
    ends = np.flatnonzero((ops == "head") & dec)
    if len(ends) >= 2:
        per_token = float(np.median(np.diff(kv[ends])))
        how = ""
        if n_layer and d_model:
            how = f" = 2 (K, V) x {n_layer} layers x {d_model} floats x 4 B"
        ax1.text(0.99, 0.05, f"+{per_token:,.0f} B per generated token{how}",
                 transform=ax1.transAxes, ha="right", va="bottom", fontsize=9,
                 bbox=dict(boxstyle="round", fc="white", ec="0.8"))
    ax1.set_ylim(0, kv_alloc / uk * 1.15)
    ax1.set_ylabel(f"KV cache ({ukname})")
    ax1.legend(loc="upper left", fontsize=8.5, framealpha=0.9)

    # 3. activations on their own scale
    ua, uaname = _unit(max(act_peak.max(), 1.0))
    ax2.fill_between(x, 0, act_peak / ua, step="post", color=c_act, alpha=0.25, lw=0,
                     label="highest during the op (temporaries included)")
    ax2.plot(x, act / ua, drawstyle="steps-post", color=c_act, lw=1, label="alive after the op (everything allocated since the start and still held)")
    ax2.set_ylim(min(0.0, act.min() / ua * 1.1), act_peak.max() / ua * 1.2 + 1e-9)
    ax2.set_ylabel(f"activations ({uaname})")
    ax2.set_xlabel("operation index (per forward pass: embedding; per layer ln_1, attn, residual_1, "
                   "ln_2, mlp, residual_2; ln_f, head; then sample)")
    ax2.legend(loc="upper right", fontsize=8.5, framealpha=0.9)

    # 4. zoom on two forward passes, every operation named
    first = int(np.flatnonzero(dec)[0]) if dec.any() else 0
    sel = np.flatnonzero(np.isin(steps, np.unique(steps[first:])[:2]))
    names = [f"{ops[i]}" for i in sel]
    for ax, ys, color, name, scale, uname_ in ((zk, kv, c_kv, "KV cache in use", uk, ukname),
                                             (za, act, c_act, "activations alive", ua, uaname)):
        ax.bar(np.arange(len(sel)), ys[sel] / scale, width=0.85, color=color, alpha=0.9)
        if ax is za:
            ax.step(np.arange(len(sel)), act_peak[sel] / scale, where="mid", color=color, lw=0.8,
                    alpha=0.6, label="highest during the op")
            ax.legend(loc="upper right", fontsize=7.5)
        ax.set_xticks(np.arange(len(sel)))
        ax.set_xticklabels(names, rotation=90, fontsize=6.5, family="monospace")
        ax.set_xlim(-0.6, len(sel) - 0.4)
        ax.set_ylabel(uname_, fontsize=9)
        ax.grid(alpha=0.25, axis="y")
        kinds = "/".join(dict.fromkeys(phase[sel].tolist()))
        where = f"forward passes {steps[sel[0]]}-{steps[sel[-1]]} ({kinds}), ops {sel[0]}-{sel[-1]}"
        ax.set_title(f"zoom: {name}, {where}", fontsize=9)
        for j in range(1, len(sel)):
            if steps[sel[j]] != steps[sel[j - 1]]:
                ax.axvline(j - 0.5, color="0.3", lw=0.8, ls=":")
    if len(sel) and dec[sel[-1]]:
        lo = kv[sel].min() / uk
        zk.set_ylim(lo * 0.98, kv[sel].max() / uk * 1.01 + 1e-9)  # make the small steps visible

    fig.suptitle(title, fontsize=11)
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)


def plot_attention(attention: list[np.ndarray], labels: list[str], path, title: str,
                   prompt: str = "") -> Path:
    """attn_prefill.png: a grid of heatmaps, layers x heads, of the prefill attention weights.

    Args:
        attention: n_layer arrays (n_head, T, T); row i = query token i, column j = key j.
        labels: T token labels.
    """
    from matplotlib.colors import PowerNorm

    from .plots import _pyplot, save_figure_atomic

    plt = _pyplot()
    L = len(attention)
    NH, T, _ = attention[0].shape
    cell = float(np.clip(2.2 + 0.02 * T, 2.4, 4.6))  # inches per heatmap
    fig, axes = plt.subplots(L, NH, figsize=(cell * NH + 1.4, cell * L + 1.3), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.92")  # grey: masked by causality
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    hidden = np.triu(np.ones((T, T), dtype=bool), k=1)
    max_labels = int(cell * 7)  # about 7 readable labels per inch
    every = max(1, int(np.ceil(T / max_labels)))
    ticks = np.arange(0, T, every)
    fs = 8 if T <= 24 else 7
    short = max(len(lab) for lab in labels) <= 2 and len(ticks) <= 24  # fits unrotated
    im = None
    for l in range(L):
        for h in range(NH):
            ax = axes[l, h]
            im = ax.imshow(np.ma.masked_array(attention[l][h], hidden), cmap=cmap, norm=norm,
                           interpolation="nearest", aspect="equal")
            ax.set_title(f"layer {l}, head {h}", fontsize=9)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.set_xticklabels([labels[i] for i in ticks], rotation=0 if short else 90, fontsize=fs,
                               family="monospace")
            ax.set_yticklabels([labels[i] for i in ticks], fontsize=fs, family="monospace")
            ax.tick_params(length=2, pad=1, labelbottom=(l == L - 1), labelleft=(h == 0))
            if l == L - 1:
                ax.set_xlabel("key (attended-to token)", fontsize=8)
            if h == 0:
                ax.set_ylabel("query (attending token)", fontsize=8)
    cbar = fig.colorbar(im, ax=axes, shrink=min(1.0, 0.5 + 0.25 * L), aspect=30, pad=0.01)
    cbar.set_label("attention weight (each row sums to 1; square-root colour scale)", fontsize=8)
    cbar.set_ticks([0, 0.02, 0.1, 0.25, 0.5, 0.75, 1.0])
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    note = f"; every {every}th token labelled" if every > 1 else ""
    fig.suptitle(f"{title}\nprompt ({T} tokens{note}): {shown!r}", fontsize=10)
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
