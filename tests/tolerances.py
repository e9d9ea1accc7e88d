"""Every numerical tolerance of the test suite, in one table keyed by (check, dtype).

Each entry is (rtol, atol) unless noted. A test looks its tolerance up here so a reader sees
in one place how close "equal" means for each comparison.
"""

import numpy as np

TOL = {
    # hand-written backward vs central finite differences, float64: relative error
    ("finite_difference", np.float64): 1e-6,
    # whole-model gradients vs PyTorch autograd: max |diff| / max |grad| of the tensor
    ("torch_grad", np.float64): 1e-8,
    ("torch_grad", np.float32): 1e-4,
    # losses of 10 AdamW steps vs torch.optim.AdamW, relative
    ("torch_adamw_loss", np.float64): 1e-6,
    # KV-cache decode logits vs full forward, absolute
    ("kv_cache_logits", np.float32): 1e-5,
    # the same for W8A8, relative to the largest logit: float stages that round 1 ulp apart
    # (a 1-row and a T-row product) can put an activation in the next int8 step
    ("kv_cache_logits_w8a8", np.float32): 5e-2,
    # kernel backends vs the numpy reference: (rtol, atol)
    ("kernel", np.float32): (1e-5, 1e-6),
    ("kernel", np.float64): (1e-12, 1e-14),
    # kernel backends vs the numpy reference for sums of products (matmul, matmul_nt,
    # weight-only int8), where summation order differs: per output,
    # |y - y_ref| <= tol * (sum_k |x[n, k] * w[k, m]| + |bias[m]|)   (measured ~4 ulp)
    ("kernel_dot", np.float32): 2e-6,
    ("kernel_dot", np.float64): 1e-14,
    # attention output vs the numpy reference: a score's rounding error grows with
    # S = max_j scale * sum_c |q[i, c] * k[j, c]| and moves the weights by a relative amount,
    # so per output |out - ref| <= tol * (1 + S) * sum_j p[i, j] * |v[j, c]|
    ("kernel_attention", np.float32): 2e-6,
    ("kernel_attention", np.float64): 1e-14,
    # training ops and a whole training step on a compiled backend vs the numpy reference:
    # for each tensor (every gradient, every op output), max |diff| / max |reference|
    ("train_grad", np.float32): 1e-5,
    ("train_grad", np.float64): 1e-10,
    # parameters after an AdamW step vs the numpy reference: max |diff| / max |the step's
    # change of the reference| (float32 parameters round the change to their own ulp)
    ("train_params", np.float32): 1e-4,
    ("train_params", np.float64): 1e-10,
    # the losses of the golden training run on every backend vs the numpy backend, relative
    ("train_losses", np.float32): 1e-5,
    # data-parallel training (mpiexec -n 2) vs one process on the same global batch, 10
    # steps: the losses, relative; the checkpoint's parameters (and each optimizer moment),
    # max |diff| / max |one process's| over all tensors. Not per tensor: the attention key
    # bias has a zero gradient (softmax ignores a constant per row), so its gradient is
    # rounding, which differs with the order the ranks' parts are summed in and which AdamW
    # scales up to steps of order lr in float32 (measured 1.6e-6 on a bias of max 0.006)
    ("mpi_losses", np.float64): 1e-10,
    ("mpi_losses", np.float32): 1e-5,
    ("mpi_params", np.float64): 1e-10,
    ("mpi_params", np.float32): 1e-5,
    # logits of a whole model across backends, absolute
    ("backend_logits", np.float32): 1e-5,
    # logits of minitf vs HF transformers on the same GPT-2 weights, absolute
    ("hf_logits", np.float32): 1e-4,
    # sampling probabilities vs HF transformers' warpers, absolute
    ("sampling", np.float32): 1e-6,
    # the same, with HF's warpers run in float64 on the same (float64) logits, absolute
    ("sampling", np.float64): 1e-12,
}
