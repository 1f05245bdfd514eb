"""The selective scan where mamba_triton.py's Triton kernels do not run, and the shape checks
that every implementation of the scan shares.

`selective_scan_cpu` computes what `mamba_triton.selective_scan_ref` computes (same arguments,
same results) with its backward written out by hand, fast enough to train on a CPU;
`kernel_refusal` says which CUDA cards the kernels do not run on. mamba_triton.selective_scan
dispatches to both; the equations and the glossary of dimension letters are in mamba_triton.py.

Test: pytest tests/test_mamba_triton.py -k "cpu or cards"
"""
import torch
import torch.nn.functional as F


def check_inputs(u, delta, A, B, C, D, z, delta_bias):
    """Raise a ValueError naming the argument whose shape disagrees with u (b, d, l), A (d, n)."""
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"selective_scan: u must be (batch, channels, L) and A (channels, N); "
                         f"got u {tuple(u.shape)}, A {tuple(A.shape)}")
    b, d, l = u.shape
    n = A.shape[1]
    expected = {"delta": (b, d, l), "A": (d, n), "B": (b, n, l), "C": (b, n, l),
                "D": (d,), "z": (b, d, l), "delta_bias": (d,)}
    given = {"delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, tensor in given.items():
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{expected[name]} for u of shape (batch, channels, L) = {(b, d, l)} "
                             f"and N = {n}")
    if l == 0:
        raise ValueError("selective_scan: the sequence is empty (L = 0)")


# ------------------------------------------------------------------------------------------------
# The scan on a CPU: autograd through the reference's per-step ops is slow, so the adjoint is written out


class _ScanCPU(torch.autograd.Function):
    """h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = <h_t, C_t>, all fp32:
    delta, u (b, l, d); A (d, n); B, C (b, l, n) -> y (b, l, d), last state (b, d, n).

    The forward keeps every state (b, l, d, n); the backward runs the adjoint recurrence by hand,
    each step one fused in-place op on a contiguous (b, d, n) slice. With a_t = exp(delta_t A)
    and x_t = delta_t u_t B_t, the gradient of the state is a scan backwards in time,
        dh_t = C_t dy_t + a_{t+1} dh_{t+1}            (dh_{L-1} also receives d last state)
    and every other gradient is a sum over n or over (b, l) of dh_t times one factor:
        dC_t = sum_d h_t dy_t,  dB_t = sum_d dh_t delta_t u_t,  d(delta_t u_t) = sum_n dh_t B_t,
        d(delta_t A) = dh_t h_{t-1} a_t  ->  d delta_t (sum_n with A), dA (sum over b, l with delta).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)  # fp32 under autocast too
    def forward(ctx, delta, u, A, B, C):
        decay = torch.exp(delta[..., None] * A)                      # (b, l, d, n)  a_t
        h = (delta * u)[..., None] * B[:, :, None, :]                # (b, l, d, n)  x_t, then h_t
        for t in range(1, h.shape[1]):
            h[:, t].addcmul_(decay[:, t], h[:, t - 1])               # h_t = a_t h_{t-1} + x_t
        ctx.save_for_backward(delta, u, A, B, C, decay, h)
        return (h @ C[..., None]).squeeze(-1), h[:, -1].clone()      # (b, l, d), (b, d, n)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy, dlast):
        delta, u, A, B, C, decay, h = ctx.saved_tensors
        dy = dy.contiguous()  # (b, l, d): it arrives with the strides of the caller's (b, d, l)
        dh = dy[..., None] * C[:, :, None, :]                        # (b, l, d, n)  C_t dy_t
        dh[:, -1] += dlast
        for t in range(dh.shape[1] - 2, -1, -1):
            dh[:, t].addcmul_(decay[:, t + 1], dh[:, t + 1])         # + a_{t+1} dh_{t+1}
        d_drive = (dh @ B[..., None]).squeeze(-1)                    # (b, l, d)  d(delta_t u_t)
        d_exponent = dh[:, 1:] * h[:, :-1] * decay[:, 1:]            # (b, l-1, d, n); h_{-1} = 0
        ddelta = d_drive * u
        ddelta[:, 1:] += (d_exponent * A).sum(-1)
        dA = (d_exponent * delta[:, 1:, :, None]).sum((0, 1))        # (d, n)
        dB = ((delta * u)[:, :, None, :] @ dh).squeeze(2)            # (b, l, n)
        dC = (dy[:, :, None, :] @ h).squeeze(2)                      # (b, l, n)
        return ddelta, d_drive * delta, dA, dB, dC


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The selective scan on a CPU (_ScanCPU); same arguments and results as the reference."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype_in = u.dtype
    u, delta, z = (t.float() if t is not None else None for t in (u, delta, z))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]                  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    time_major = lambda t: t.float().transpose(1, 2).contiguous()   # noqa: E731  (b, l, .)
    y, last = _ScanCPU.apply(time_major(delta), time_major(u), A.float(), time_major(B), time_major(C))
    y = y.transpose(1, 2)                                            # (b, d, l)
    if D is not None:
        y = y + D.float()[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    out = y.to(dtype_in)
    return (out, last) if return_last_state else out


# ------------------------------------------------------------------------------------------------
# The cards the kernels run on

def kernel_refusal(device, dtype):
    """Why the Triton kernels cannot run on this CUDA device for inputs of `dtype`; "" if they
    can. Triton compiles for compute capability 7.5 and up; the bf16 kernels compile for sm_75
    too (tools/mamba_compile.py) but are run only where the card has bf16 (8.0 and up): no card
    below that has run them."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 5):
        return f"compute capability {major}.{minor} is below Triton's 7.5"
    if dtype == torch.bfloat16 and major < 8:
        return f"bf16 kernels need compute capability 8.0 (this card: {major}.{minor}); --amp fp16 does not"
    return ""
