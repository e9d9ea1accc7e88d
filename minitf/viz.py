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
import io
import tracemalloc
from pathlib import Path

import numpy as np

from .fileio import write_bytes_atomic
from .plots import plot_attention, plot_memory_log

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
    """Every weight array the engine holds (wte, wpe, LayerNorms, Linear / Int8Linear arrays,
    an int8 head's scales and tiles)."""
    arrays = [engine.wpe, *engine.ln_f]
    arrays += [a for a in (engine.stored_wte, engine.wte_scale, engine.head_packed,
                           engine.head_colsum) if a is not None]
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
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(CSV_COLUMNS)
        w.writerows(self.rows)
        write_bytes_atomic(path, text.getvalue().encode("utf-8"))
        return path
