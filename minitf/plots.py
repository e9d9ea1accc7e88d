"""Every picture minitf draws: the training loss curve, the memory log and attention of a
generation, the int8 round-trip error. matplotlib runs headless (Agg) and is imported only
when a plot is asked for (`_pyplot`), so runs without plots never pay for its import.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .fileio import atomic_target
from .tensors import HEAD, LINEARS


def _pyplot():
    # imported here, not at the top: matplotlib takes ~0.5 s to import and most runs draw nothing
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write a figure to PNG atomically (a reader never sees half a file), then close it."""
    path = Path(path)
    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def plot_loss_curve(history: dict, schedule, path, title: str = "minitf training") -> Path:
    """loss_curve.png: train loss (raw and smoothed) and validation loss (nats/token) against
    step, validation points marked, the learning rate on a second axis.

    Args:
        history: {"train": [[step, loss], ...], "val": [[step, loss], ...]}.
        schedule: callable update index (0-based) -> learning rate; history step s is the
            s-th update, made with schedule(s - 1).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = np.asarray(history.get("train") or np.zeros((0, 2)), dtype=float)
    val = np.asarray(history.get("val") or np.zeros((0, 2)), dtype=float)
    if len(train):
        ax.plot(train[:, 0], train[:, 1], color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        k = max(1, min(50, len(train) // 20))
        smooth = np.convolve(train[:, 1], np.ones(k) / k, mode="valid")
        # centred window, so the smoothed curve does not lag behind the raw one
        ax.plot(train[k // 2:k // 2 + len(smooth), 0], smooth, color="tab:blue", lw=1.6,
                label=f"train ({k}-step mean)")
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o-", color="tab:orange", lw=1.6, ms=5, label="validation")
        ax.annotate(f"{val[-1, 1]:.3f}", (val[-1, 0], val[-1, 1]), xytext=(-6, 8),
                    textcoords="offset points", ha="right", color="tab:orange", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    # history step s is logged after the s-th update, which used the rate schedule(s - 1)
    last = int(max(train[-1, 0] if len(train) else 1, val[-1, 0] if len(val) else 1, 1))
    steps = np.arange(1, last + 1)
    ax2 = ax.twinx()
    ax2.plot(steps, [schedule(int(s) - 1) for s in steps], color="tab:gray", ls="--", lw=1,
             label="learning rate (right axis)")
    ax2.set_ylabel("learning rate")
    ax2.set_ylim(bottom=0)
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    # below the axes: a legend inside would cover the curves somewhere on some run
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center",
              bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=9, frameon=False)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# generation: memory after every operation, attention of the prefill (minitf.viz records them)


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
    if len(again):  # re-prefills past the context: one per step (exact) or now and then (shift)
        n_again = len(set(steps[again].tolist()))
        later = len(set(steps[steps >= steps[again[0]]].tolist()))
        how = ("every step re-prefills the last block_size tokens (context mode exact)"
               if n_again == later else
               f"{n_again} re-prefills of the kept tokens (context shift), decode between them")
        ax0.text(again[0], 0.80, f"context full: from here {how}", transform=xt,
                 ha="left" if again[0] < 0.5 * xmax else "right", va="top", fontsize=8.5,
                 color="0.2")
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
    ends = np.flatnonzero(np.isin(ops, ("head", "decode_step")) & dec)
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
    return save_figure(fig, path)


def plot_attention(attention: list[np.ndarray], labels: list[str], path, title: str,
                   prompt: str = "") -> Path:
    """attn_prefill.png: a grid of heatmaps, layers x heads, of the prefill attention weights.

    Args:
        attention: n_layer arrays (n_head, T, T); row i = query token i, column j = key j.
        labels: T token labels.
    """
    from matplotlib.colors import PowerNorm  # lazily, as _pyplot: only when a plot is drawn

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
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# quantization


def plot_quant_error(errors: dict[str, np.ndarray], path, title: str) -> Path:
    """quant_error.png: one histogram per quantized tensor (a row per block, and a last row
    for an int8 head, wte, whose channels are its rows) of the round-trip error divided by
    its channel's scale, which must lie in [-0.5, 0.5] (dashed lines)."""
    plt = _pyplot()
    blocks = sorted({int(n.split(".")[1]) for n in errors if n.startswith("h.")})
    linears = [lin for lin in LINEARS if any(n.endswith(lin + ".weight") for n in errors)]
    rows = [[f"h.{blk}.{lin}.weight" for lin in linears] for blk in blocks]
    if HEAD in errors:
        rows.append([HEAD] + [None] * (len(linears) - 1))
    fig, axes = plt.subplots(len(rows), len(linears), squeeze=False, sharex=True,
                             figsize=(3.2 * len(linears) + 0.6, min(2.4 * len(rows), 24) + 0.8))
    for r, names in enumerate(rows):
        for c, name in enumerate(names):
            ax = axes[r][c]
            if name is None:
                ax.axis("off")
                continue
            e = errors[name].ravel()
            ax.hist(e, bins=np.linspace(-0.55, 0.55, 45), color="tab:blue")
            for x in (-0.5, 0.5):
                ax.axvline(x, color="tab:red", ls="--", lw=1)
            ax.set_title(f"{name}\nmax |err|/scale = {np.abs(e).max():.4f}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("weights", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("round-trip error / channel scale", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
