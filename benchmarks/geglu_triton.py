"""Issue 26's experiment: the GEGLU GEMM with the split-GELU in its epilogue, written in Triton, against cuBLAS.

SDXL's GEGLU is x·W + b ([M, 2N]) split in halves h, g and h · gelu(g): today cuBLAS's GEMM (through ONNX Runtime)
writes the [M, 2N] product and our BiasSplitGelu kernel (kernels/ort_ops/bias_split_gelu.cu) reads it back. One
kernel doing both would save that pass (1.45 ms of a 1024² step: h200-bias-split-gelu.json) if its GEMM were as fast
as cuBLAS's. Three Triton kernels, each computing y = h · gelu_erf(g) from x [M, K] and W [K, 2N] in one pass:
  plain            two accumulators (the h and g halves of W) over pointer loads (cp.async pipelining)
  tma              the same over TMA tensor descriptors made on the device (tl.make_tensor_descriptor), with and
                   without Triton's warp specialization
  tma_interleaved  one accumulator over W with its columns interleaved (h0, g0, h1, g1, …), split in the epilogue
each tried at a few tile shapes, against torch.addmm (cuBLAS, bias in its epilogue) at SDXL's two GEGLU shapes at
1024² with CFG (M = 2·4096, K = 640, 2N = 5120: 10 a step; M = 2·1024, K = 1280, 2N = 10240: 60 a step). Times are
triton.testing.do_bench_cudagraph medians (a CUDA graph of the kernel, as the UNet runs); accuracy: rel-L2 against
float64. The fused kernel pays only if its time is under cuBLAS's GEMM plus the split pass (35.4 / 18.3 µs for the two
shapes, h200-bias-split-gelu.json).

    python benchmarks/geglu_triton.py OUT.json      # torch with Triton ≥ 3.4, a Hopper GPU
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import datetime, timezone

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph


@triton.jit
def geglu_mm(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wk, stride_ym,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    offs_m = (pid_m * BM + tl.arange(0, BM)) % M
    offs_n = (pid_n * BN + tl.arange(0, BN)) % N
    offs_k = tl.arange(0, BK)
    xp = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    hp = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :]
    gp = hp + N
    acc_h = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BK)):
        a = tl.load(xp)
        acc_h = tl.dot(a, tl.load(hp), acc_h)
        acc_g = tl.dot(a, tl.load(gp), acc_g)
        xp += BK
        hp += BK * stride_wk
        gp += BK * stride_wk
    cols = pid_n * BN + tl.arange(0, BN)
    h = acc_h + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    g = acc_g + tl.load(b_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = h * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
    rows = pid_m * BM + tl.arange(0, BM)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(tl.float16),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


@triton.jit
def _gelu_gate(h, g):
    return h * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))


@triton.jit
def geglu_tma(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, WS: tl.constexpr):
    """Two accumulators; W [K, 2N] row-major read as two [BK, BN] boxes; TMA descriptors made on the device."""
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    wd = tl.make_tensor_descriptor(w_ptr, shape=[K, 2 * N], strides=[2 * N, 1], block_shape=[BK, BN])
    yd = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    om = pid_m * BM
    on = pid_n * BN
    acc_h = tl.zeros((BM, BN), dtype=tl.float32)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
        a = xd.load([om, k * BK])
        acc_h = tl.dot(a, wd.load([k * BK, on]), acc_h)
        acc_g = tl.dot(a, wd.load([k * BK, N + on]), acc_g)
    cols = on + tl.arange(0, BN)
    h = acc_h + tl.load(b_ptr + cols).to(tl.float32)[None, :]
    g = acc_g + tl.load(b_ptr + N + cols).to(tl.float32)[None, :]
    yd.store([om, on], _gelu_gate(h, g).to(tl.float16))


@triton.jit
def geglu_tma_interleaved(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                          WS: tl.constexpr):
    """One accumulator of width BN over W' [K, 2N] with columns (h0, g0, h1, g1, …); bias interleaved too."""
    xd = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    wd = tl.make_tensor_descriptor(w_ptr, shape=[K, 2 * N], strides=[2 * N, 1], block_shape=[BK, BN])
    yd = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN // 2])
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(2 * N, BN)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    om = pid_m * BM
    on = pid_n * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), warp_specialize=WS):
        acc = tl.dot(xd.load([om, k * BK]), wd.load([k * BK, on]), acc)
    acc = acc + tl.load(b_ptr + on + tl.arange(0, BN)).to(tl.float32)[None, :]
    h, g = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
    yd.store([om, on // 2], _gelu_gate(h, g).to(tl.float16))


def launch(kernel, x, w, b, N, cfg):
    M, K = x.shape
    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
    BM, BN, BK, G, nw, ns, ws = cfg
    width = 2 * N if kernel is geglu_tma_interleaved else N
    grid = (triton.cdiv(M, BM) * triton.cdiv(width, BN),)
    kernel[grid](x, w, b, y, M, N, K, BM=BM, BN=BN, BK=BK, GROUP_M=G, WS=ws, num_warps=nw, num_stages=ns)
    return y


def plain(x, w, b, N, cfg):
    M, K = x.shape
    y = torch.empty(M, N, device="cuda", dtype=torch.float16)
    BM, BN, BK, G, nw, ns, _ = cfg
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    geglu_mm[grid](x, w, b, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BM=BM, BN=BN, BK=BK, GROUP_M=G,
                   num_warps=nw, num_stages=ns)
    return y


variants = {
    "plain": (plain, [(128, 128, 64, g, 8, 3, False) for g in (4, 16)] + [(128, 128, 32, 8, 8, 5, False),
                                                                        (128, 64, 64, 8, 4, 3, False)]),
    "tma": (lambda *a: launch(geglu_tma, *a),
            [(128, BN, 64, 8, nw, 3, ws) for BN in (64, 128) for nw in (4, 8) for ws in (False, True)]),
    "tma_interleaved": (lambda *a: launch(geglu_tma_interleaved, *a),
                        [(128, BN, 64, 8, nw, 3, ws) for BN in (128, 256) for nw in (4, 8) for ws in (False, True)]),
}
results = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(), "shapes": []}
for M, K, N2 in ((8192, 640, 5120), (2048, 1280, 10240)):
    N = N2 // 2
    torch.manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    w = (torch.randn(K, N2, device="cuda") / K ** 0.5).half()
    b = (torch.randn(N2, device="cuda") * 0.1).half()
    wi = torch.stack([w[:, :N], w[:, N:]], dim=2).reshape(K, N2).contiguous()
    bi = torch.stack([b[:N], b[N:]], dim=1).reshape(N2).contiguous()
    ref = x.double() @ w.double() + b.double()
    h, g = ref.chunk(2, dim=-1)
    ref = h * torch.nn.functional.gelu(g)
    shape = {"M": M, "K": K, "N2": N2, "cublas_addmm_ms": do_bench_cudagraph(lambda: torch.addmm(b, x, w), rep=200)}
    for name, (fn, cfgs) in variants.items():
        ww, bb = (wi, bi) if name == "tma_interleaved" else (w, b)
        rows = []
        for cfg in cfgs:
            try:
                y = fn(x, ww, bb, N, cfg)
                torch.cuda.synchronize()
                err = ((y.double() - ref).norm() / ref.norm()).item()
                t = do_bench_cudagraph(lambda: fn(x, ww, bb, N, cfg), rep=100)
                rows.append({"cfg": cfg, "ms": round(t, 4), "rel_l2": err})
            except Exception as e:
                rows.append({"cfg": cfg, "error": "".join(traceback.format_exception_only(e))[-300:]})
        ok = sorted([r for r in rows if "ms" in r], key=lambda r: r["ms"])
        shape[name] = {"best": ok[:3], "errors": [r for r in rows if "error" in r][:2], "n_ok": len(ok)}
        print(M, K, N2, name, "cublas", round(shape["cublas_addmm_ms"], 4), ok[:2], shape[name]["errors"][:1], flush=True)
    results["shapes"].append(shape)
results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
results["command"] = "python benchmarks/geglu_triton.py " + " ".join(sys.argv[1:])
with open(sys.argv[1], "w") as f:
    json.dump(results, f, indent=1)
