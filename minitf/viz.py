"""See inside a generation: attention over the prompt and memory after every operation.

    python -m minitf.generate --prompt "ROMEO:" --max-new-tokens 100 --viz out/

writes to out/:

- `attn_prefill.png`: the attention weights of the prefill, one heatmap per head (rows:
  layers, columns: heads), prompt tokens on the axes, one colour scale [0, 1];
- `memory_log.png` and `memory_log.csv`: memory in use after each operation of the
  generation (embedding, each block's ln_1 / attn / residual_1 / ln_2 / mlp / residual_2,
  ln_f, head, sample), prefill and every decode step, split into weights, KV cache and
  transient activations.

How it is measured. `Recorder` only sets the engine's two hooks (`engine.trace`, called
after every operation, and `engine.capture_attention`) and starts `tracemalloc`, which sees
every numpy array allocation. Nothing else in the engine changes, and a run without `--viz`
never imports this module (nor matplotlib). For each operation it records:

- weights: the summed `nbytes` of the arrays the engine holds (wte, wpe, LayerNorms, every
  Linear / Int8Linear); equals the model's parameter bytes;
- KV cache: the rows written so far, counted per layer as the forward pass writes them
  (layer l's keys and values are written in its `attn` operation), times the row size;
  the preallocated cache size is logged too (`kv_cache_allocated_bytes`);
- activations: memory allocated since the recorder started and still alive after the
  operation (tracemalloc's current traced bytes minus the baseline at start). Weights and
  cache were allocated before and are not in it. The recorder's own log and the attention
  copy kept for the picture (`attention_capture_bytes`) are excluded. `activations_peak_bytes`
  is the highest value reached *during* the operation (tracemalloc's peak), which includes
  temporaries freed before it returned.
"""

from __future__ import annotations

import csv
import os
import tracemalloc
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("index", "phase", "step", "op", "weights_bytes", "kv_cache_bytes",
               "kv_cache_allocated_bytes", "activations_bytes", "traced_bytes",
               "activations_peak_bytes", "attention_capture_bytes")


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
        self.rows: list[tuple] = []
        self.attention: list[np.ndarray] | None = None  # the prompt's prefill
        self._filled = [0] * self.n_layer  # cache rows written, per layer
        self._phase, self._step, self._start, self._T = "prefill", -1, 0, 0
        self._seen_attention = engine.last_attention
        self._old_hooks = (engine.trace, engine.capture_attention)
        self._finished = False

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._started_tracemalloc = not tracemalloc.is_tracing()
        if self._started_tracemalloc:
            tracemalloc.start()
        engine.capture_attention = True
        engine.trace = self._trace
        self._baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()

    # ------------------------------------------------------------------------------------
    def _attention_capture_bytes(self) -> int:
        held = self.engine.last_attention
        n = sum(a.nbytes for a in self.attention) if self.attention is not None else 0
        if held is not None and held is not self.attention:
            n += sum(a.nbytes for a in held)
        return n

    def _trace(self, op: str) -> None:
        current, peak = tracemalloc.get_traced_memory()
        eng = self.engine
        if op == "embedding":  # the first operation of a forward pass: which one is it?
            self._step += 1
            att = eng.last_attention
            if att is not None and att is not self._seen_attention:  # prefill made a new one
                self._seen_attention = att
                self._phase, self._start, self._T = "prefill", 0, att[0].shape[1]
                if self.attention is None:
                    self.attention = att
            elif eng.pos == 0:  # a prefill without capture (someone passed attention_out)
                self._phase, self._start, self._T = "prefill", 0, len(self.prompt_ids)
            else:  # decode: one token at position pos (pos is advanced after the pass)
                self._phase, self._start, self._T = "decode", eng.pos, 1
            if self._phase == "prefill":  # pos was reset to 0: the cache is rewritten
                self._filled = [0] * self.n_layer
        elif op.startswith("h.") and op.endswith(".attn"):  # layer l wrote its K, V rows
            self._filled[int(op.split(".")[1])] = self._start + self._T
        kv = 2 * sum(self._filled) * self.kv_row_bytes
        capture = self._attention_capture_bytes()
        self.rows.append((len(self.rows), self._phase, self._step, op, self.weights_bytes, kv,
                          self.kv_allocated_bytes, current - self._baseline - capture, current,
                          peak - self._baseline - capture, capture))
        # the recorder's own bookkeeping (the row just appended) is not the engine's memory
        self._baseline += tracemalloc.get_traced_memory()[0] - current
        tracemalloc.reset_peak()

    # ------------------------------------------------------------------------------------
    def log(self) -> dict[str, np.ndarray]:
        """The memory log as {column: array}."""
        cols = list(zip(*self.rows)) if self.rows else [()] * len(CSV_COLUMNS)
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
        if self.rows:
            paths.append(plot_memory_log(self.log(), self.out_dir / "memory_log.png", title,
                                         prompt_tokens=len(self.prompt_ids)))
        if self.attention is not None:
            T = self.attention[0].shape[1]
            labels = [token_label(self.tokenizer, t) for t in self.prompt_ids[-T:]]
            prompt = self.tokenizer.decode(self.prompt_ids[-T:])
            paths.append(plot_attention(self.attention, labels, self.out_dir / "attn_prefill.png",
                                        f"{self.model_name}: attention weights of the prefill",
                                        prompt))
        return paths

    def _title(self) -> str:
        log = self.log()
        n_prompt = len(self.prompt_ids)
        n_new = int(np.sum(log["op"] == "sample")) if self.rows else 0
        return (f"{self.model_name} ({self.engine.backend} backend): memory after each operation, "
                f"{n_prompt} prompt tokens + {n_new} generated")

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


def plot_memory_log(log: dict, path, title: str, prompt_tokens: int | None = None) -> Path:
    """memory_log.png: weights + KV cache + activations (stacked), then the KV cache and the
    activations each on their own scale, against operation index; prefill shaded, peak marked."""
    from .plots import _pyplot, save_figure_atomic

    plt = _pyplot()
    x = np.asarray(log["index"])
    w = np.asarray(log["weights_bytes"], dtype=float)
    kv = np.asarray(log["kv_cache_bytes"], dtype=float)
    kv_alloc = float(log["kv_cache_allocated_bytes"][0])
    act = np.asarray(log["activations_bytes"], dtype=float)
    act_peak = np.asarray(log["activations_peak_bytes"], dtype=float)
    phase, ops, steps = np.asarray(log["phase"]), np.asarray(log["op"]), np.asarray(log["step"])
    total = w + kv + act

    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True,
                             gridspec_kw={"height_ratios": [1.6, 1, 1]})
    ax0, ax1, ax2 = axes
    colors = {"weights": "#4C72B0", "kv": "#DD8452", "act": "#55A868"}

    # 1. everything, stacked
    u, uname = _unit(total.max())
    ax0.fill_between(x, 0, w / u, step="post", color=colors["weights"], alpha=0.85,
                     label=f"weights ({w[0] / u:.2f} {uname}, constant)")
    ax0.fill_between(x, w / u, (w + kv) / u, step="post", color=colors["kv"], alpha=0.9,
                     label="KV cache (rows in use)")
    ax0.fill_between(x, (w + kv) / u, total / u, step="post", color=colors["act"], alpha=0.9,
                     label="activations (alive after the op)")
    ax0.set_ylim(0, total.max() / u * 1.18)
    ax0.set_ylabel(f"memory in use ({uname})")
    k = int(np.argmax(total))
    ax0.plot([x[k]], [total[k] / u], "v", color="crimson", ms=9, zorder=5)
    where = f"{phase[k]} step {steps[k]}" if phase[k] == "decode" else "prefill"
    ax0.annotate(f"peak {total[k] / u:.3f} {uname}\nafter op {x[k]} ({ops[k]}, {where})",
                 (x[k], total[k] / u), xytext=(0.5, 0.93), textcoords="axes fraction",
                 ha="center", va="top", fontsize=9, color="crimson",
                 arrowprops=dict(arrowstyle="->", color="crimson", lw=1))
    ax0.legend(loc="lower right", fontsize=8.5, framealpha=0.9)

    # 2. KV cache on its own scale: one row per layer per token
    uk, ukname = _unit(max(kv_alloc, 1.0))
    ax1.plot(x, kv / uk, drawstyle="steps-post", color=colors["kv"], lw=1.4,
             label="KV cache in use (K and V rows written so far, all layers)")
    ax1.axhline(kv_alloc / uk, color=colors["kv"], ls="--", lw=1,
                label=f"KV cache allocated ({kv_alloc / uk:.1f} {ukname}, block_size rows)")
    dec = phase == "decode"
    if dec.any():
        ends = [i for i in range(len(x)) if ops[i] == "head" and dec[i]]
        if len(ends) >= 2:
            per_token = np.median(np.diff(kv[ends]))
            ax1.text(0.99, 0.06, f"+{per_token / 1024:.2f} KiB per generated token",
                     transform=ax1.transAxes, ha="right", va="bottom", fontsize=9,
                     bbox=dict(boxstyle="round", fc="white", ec="0.8"))
    ax1.set_ylim(0, kv_alloc / uk * 1.12)
    ax1.set_ylabel(f"KV cache ({ukname})")
    ax1.legend(loc="upper left", fontsize=8.5, framealpha=0.9)

    # 3. activations on their own scale
    ua, uaname = _unit(max(act_peak.max(), act.max(), 1.0))
    ax2.fill_between(x, 0, act_peak / ua, step="post", color=colors["act"], alpha=0.25, lw=0,
                     label="highest during the op (temporaries included)")
    ax2.plot(x, act / ua, drawstyle="steps-post", color=colors["act"], lw=1,
             label="alive after the op")
    ax2.set_ylim(0, max(act_peak.max(), act.max()) / ua * 1.15 + 1e-9)
    ax2.set_ylabel(f"activations ({uaname})")
    ax2.set_xlabel("operation index (embedding, ln_1, attn, residual_1, ln_2, mlp, residual_2 per layer, "
                   "ln_f, head, sample)")
    ax2.legend(loc="upper right", fontsize=8.5, framealpha=0.9)

    # prefill / decode regions
    xmax = x[-1] + 1
    for ax in axes:
        ax.set_xlim(0, xmax)
        ax.grid(alpha=0.25)
        for a, b in _spans(phase, "prefill"):
            ax.axvspan(a, b + 1, color="0.55", alpha=0.18, lw=0)
    for n, (a, b) in enumerate(_spans(phase, "prefill")):
        label = "prefill" if n == 0 else "re-prefill\n(window)"
        if n == 0 and prompt_tokens:
            label += f"\n{prompt_tokens} tok"
        ax0.text((a + b + 1) / 2, total.max() / u * 1.16, label, ha="center", va="top",
                 fontsize=8, color="0.25")
    dspans = _spans(phase, "decode")
    if dspans:
        a = dspans[0][0]
        b = dspans[-1][1]
        n_dec = len(set(steps[dec].tolist()))
        ax0.text(a + (b - a) * 0.02, total.max() / u * 1.16,
                 f"decode: {n_dec} steps, one token each, {int(len(x[dec]) / max(n_dec, 1))} ops per step",
                 ha="left", va="top", fontsize=8, color="0.25")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
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
    fig, axes = plt.subplots(L, NH, figsize=(cell * NH + 1.6, cell * L + 1.4), squeeze=False,
                             sharex=True, sharey=True)
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("0.92")  # above the diagonal: masked by causality
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    hidden = np.triu(np.ones((T, T), dtype=bool), k=1)
    max_labels = int(cell * 7)  # about 7 readable labels per inch
    every = max(1, int(np.ceil(T / max_labels)))
    ticks = np.arange(0, T, every)
    fs = 8 if T <= 24 else 7 if T <= 64 else 6
    im = None
    for l in range(L):
        for h in range(NH):
            ax = axes[l, h]
            im = ax.imshow(np.ma.masked_array(attention[l][h], hidden), cmap=cmap, norm=norm,
                           interpolation="nearest", aspect="equal")
            ax.set_title(f"layer {l}, head {h}", fontsize=9)
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=fs, family="monospace")
            ax.set_yticklabels([labels[i] for i in ticks], fontsize=fs, family="monospace")
            ax.tick_params(length=2, pad=1, labelbottom=(l == L - 1), labelleft=(h == 0))
            if l == L - 1:
                ax.set_xlabel("key (attended-to token)", fontsize=8)
            if h == 0:
                ax.set_ylabel("query (attending token)", fontsize=8)
    cbar = fig.colorbar(im, ax=axes, shrink=0.8, fraction=0.04, pad=0.02)
    cbar.set_label("attention weight (each row sums to 1; square-root colour scale)", fontsize=8)
    cbar.set_ticks([0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0])
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    note = f"; every {every}th token labelled" if every > 1 else ""
    fig.suptitle(f"{title}\nprompt ({T} tokens{note}): {shown!r}", fontsize=10)
    try:
        return save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
