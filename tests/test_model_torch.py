"""The whole model against PyTorch autograd: loss, every parameter's gradient, and 10 AdamW
steps with global-norm clipping and the warmup + cosine schedule.

The PyTorch twin below is written independently with torch's own ops (F.layer_norm,
F.gelu(approximate="tanh"), F.scaled_dot_product_attention, F.cross_entropy) on the same
weights; with dropout, the test draws the masks itself and hands the same masks to both
(torch's own dropout draws its own, which could never match). PyTorch is a test-only dependency; these tests import it directly so that a missing
torch fails the run instead of skipping the proof.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minitf.config import GPTConfig
from minitf.model import GPT, BlockMasks, DropoutMasks, init_params
from minitf.optim import AdamW, CosineSchedule, clip_grad_norm
from tolerances import TOL


def torch_gpt_loss(tp: dict, config: GPTConfig, idx: torch.Tensor, targets: torch.Tensor,
                   masks: DropoutMasks | None = None):
    """GPT-2 forward in PyTorch on a {name: tensor} dict with minitf's names and layouts;
    with `masks`, dropout where GPT-2 has it, each mask multiplied in as given."""
    B, T = idx.shape
    C, NH = config.d_model, config.n_head
    def drop(a, mask):
        return a if mask is None else a * torch.as_tensor(mask)

    x = drop(tp["wte"][idx] + tp["wpe"][:T], None if masks is None else masks.embedding)
    for i in range(config.n_layer):
        p = f"h.{i}."
        m = None if masks is None else masks.blocks[i]
        att_mask, attn_mask, mlp_mask = (None, None, None) if m is None else (m.att, m.attn, m.mlp)
        h = F.layer_norm(x, (C,), tp[p + "ln_1.weight"], tp[p + "ln_1.bias"], config.layer_norm_eps)
        q, k, v = (h @ tp[p + "attn.c_attn.weight"] + tp[p + "attn.c_attn.bias"]).split(C, dim=2)
        q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
        if att_mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # the weights themselves, to drop them: softmax(q k^T / sqrt(d) + causal mask)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // NH)
            causal = torch.ones(T, T, dtype=torch.bool).triu(1)
            a = drop(scores.masked_fill(causal, float("-inf")).softmax(-1), att_mask) @ v
        a = a.transpose(1, 2).reshape(B, T, C)
        x = x + drop(a @ tp[p + "attn.c_proj.weight"] + tp[p + "attn.c_proj.bias"], attn_mask)
        h = F.layer_norm(x, (C,), tp[p + "ln_2.weight"], tp[p + "ln_2.bias"], config.layer_norm_eps)
        h = F.gelu(h @ tp[p + "mlp.c_fc.weight"] + tp[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + drop(h @ tp[p + "mlp.c_proj.weight"] + tp[p + "mlp.c_proj.bias"], mlp_mask)
    x = F.layer_norm(x, (C,), tp["ln_f.weight"], tp["ln_f.bias"], config.layer_norm_eps)
    logits = x @ tp["wte"].T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_case(dtype, config=None, seed=0):
    config = config or GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, d_model=48)
    params = init_params(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for name in params:  # LayerNorm weights and biases away from 1 and 0: every path counts
        params[name] += rng.normal(scale=0.05, size=params[name].shape).astype(dtype)
    idx = rng.integers(0, config.vocab_size, size=(3, config.block_size))
    targets = rng.integers(0, config.vocab_size, size=(3, config.block_size))
    return config, params, idx, targets


def to_torch(params, dtype):
    return {n: torch.tensor(p, dtype=dtype, requires_grad=True) for n, p in params.items()}


def make_masks(config, B, T, dtype, p=0.3, seed=9) -> DropoutMasks:
    """Dropout masks built here, independently of minitf: 0 with probability p, else
    1 / (1 - p)."""
    rng = np.random.default_rng(seed)
    mask = lambda *shape: np.where(rng.random(shape) >= p, 1.0 / (1.0 - p), 0.0).astype(dtype)
    C, NH = config.d_model, config.n_head
    return DropoutMasks(mask(B, T, C), [BlockMasks(mask(B, NH, T, T), mask(B, T, C), mask(B, T, C))
                                        for _ in range(config.n_layer)])


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("np_dtype,torch_dtype", [(np.float64, torch.float64), (np.float32, torch.float32)])
def test_loss_and_every_gradient_match_autograd(np_dtype, torch_dtype, dropout):
    config, params, idx, targets = make_case(np_dtype)
    masks = make_masks(config, *idx.shape, np_dtype) if dropout else None
    loss, grads = GPT(config, params).loss_and_grads(idx, targets, masks)

    tp = to_torch(params, torch_dtype)
    tloss = torch_gpt_loss(tp, config, torch.tensor(idx), torch.tensor(targets), masks)
    tloss.backward()

    tol = TOL[("torch_grad", np_dtype)]
    assert abs(loss - tloss.item()) <= tol * abs(tloss.item()), f"loss {loss} vs torch {tloss.item()}"
    for name in params:
        ref = tp[name].grad.numpy()
        err = np.abs(grads[name] - ref).max() / np.abs(ref).max()
        assert err <= tol, f"{name}: max |grad - torch| / max |torch grad| = {err:.3e} > {tol}"


def reference_lr(it, max_lr, min_lr, warmup, decay_steps):
    """Warmup + cosine schedule written out again for the test (nanoGPT's get_lr)."""
    if it < warmup:
        return max_lr * (it + 1) / (warmup + 1)
    if it > decay_steps:
        return min_lr
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup) / (decay_steps - warmup)))
    return min_lr + coeff * (max_lr - min_lr)


def test_ten_adamw_steps_match_torch():
    config, params, _, _ = make_case(np.float64, seed=7)
    rng = np.random.default_rng(11)
    batches = [
        (rng.integers(0, 65, size=(2, 32)), rng.integers(0, 65, size=(2, 32))) for _ in range(10)
    ]
    sched = dict(max_lr=3e-3, min_lr=3e-4, warmup=3, decay_steps=8)  # warmup, cosine and floor

    tp = to_torch(params, torch.float64)
    decay = [t for n, t in tp.items() if t.dim() == 2]
    no_decay = [t for n, t in tp.items() if t.dim() != 2]
    topt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=sched["max_lr"], betas=(0.9, 0.99), eps=1e-8,
    )
    model = GPT(config, params)
    opt = AdamW(params, lr=sched["max_lr"], betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    schedule = CosineSchedule(**sched)

    ours, theirs, norms = [], [], []
    for it, (x, y) in enumerate(batches):
        loss, grads = model.loss_and_grads(x, y)
        norms.append(clip_grad_norm(grads, 1.0))
        opt.step(grads, lr=schedule(it))
        ours.append(loss)

        lr = reference_lr(it, **sched)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.zero_grad()
        tloss = torch_gpt_loss(tp, config, torch.tensor(x), torch.tensor(y))
        tloss.backward()
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        topt.step()
        theirs.append(tloss.item())

    assert max(norms) > 1.0, "the case should exercise clipping"
    tol = TOL[("torch_adamw_loss", np.float64)]
    for it, (a, b) in enumerate(zip(ours, theirs)):
        assert abs(a - b) <= tol * abs(b), f"step {it}: loss {a} vs torch {b}"
    for name, p in params.items():  # and the weights after 10 steps
        np.testing.assert_allclose(p, tp[name].detach().numpy(), rtol=1e-6, atol=1e-9, err_msg=name)
