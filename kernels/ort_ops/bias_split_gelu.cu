// BiasSplitGelu for the CUDA provider: y[r, j] = (x[r, j] + b[j]) * gelu(x[r, H + j] + b[H + j]), j < H, with
// gelu(v) = v / 2 * (1 + erf(v / sqrt 2)) (exact erf, as the GEGLU of diffusers' FeedForward and ONNX Runtime's
// com.microsoft.BiasSplitGelu), arithmetic in fp32, one rounding to T at the end.
//
// ONNX Runtime's kernel reads and writes one 2-byte element per thread and iteration, a block per row; SDXL's GEGLU
// outputs (2 x 4096 x 5120 and 2 x 1024 x 10240 fp16 at 1024²) are 42-84 MB each, 70 of them per UNet step, so the
// op is bound by memory traffic: here every thread moves 16 bytes per load and store (8 halves or 4 floats), with a
// scalar kernel for the widths or addresses that do not allow it. The input is read once, with evict-first loads
// (__ldcs); the output is stored normally, since the next GEMM reads it. Alone on the H200: 3.55 / 3.44 TB/s at the
// two shapes against ONNX Runtime's 2.20 / 2.06 (1.45 instead of 2.41 ms of GEGLU per 1024² step; plain loads 3.29 /
// 3.13 TB/s); the UNet step 32.08 instead of 32.93 ms (benchmarks/results/h200-bias-split-gelu*.json,
// h200-unet-custom-ops.json). No allocation, no synchronisation: safe inside a captured CUDA graph.

#include <cuda_fp16.h>
#include <cstdint>

namespace {

__device__ __forceinline__ float gelu_erf(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752440f)); }

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
union Pack {  // 16 bytes: one vector load or store
  uint4 raw;
  T v[sizeof(uint4) / sizeof(T)];
};

// one thread: N = 16 / sizeof(T) consecutive outputs of one row; `Index` 32-bit where the tensor allows (a 64-bit
// division is a long software sequence, a 32-bit one a few instructions)
template <typename T, typename Index>
__global__ void bias_split_gelu_vec(const uint4* __restrict__ x, const uint4* __restrict__ bias, uint4* __restrict__ y,
                                    Index total, Index half_vecs) {
  constexpr int N = sizeof(uint4) / sizeof(T);
  const Index i = Index(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const Index row = i / half_vecs, col = i - row * half_vecs;
  const uint4* in = x + size_t(row) * 2 * half_vecs;
  Pack<T> left, right, bias_left, bias_right, out;
  left.raw = __ldcs(in + col);
  right.raw = __ldcs(in + col + half_vecs);
  bias_left.raw = __ldg(bias + col);
  bias_right.raw = __ldg(bias + col + half_vecs);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float a = to_float(left.v[k]) + to_float(bias_left.v[k]);
    const float g = to_float(right.v[k]) + to_float(bias_right.v[k]);
    out.v[k] = from_float<T>(a * gelu_erf(g));
  }
  y[i] = out.raw;
}

template <typename T>
__global__ void bias_split_gelu_scalar(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                       int64_t total, int64_t half) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t row = i / half, col = i - row * half;
  const float a = to_float(x[row * 2 * half + col]) + to_float(bias[col]);
  const float g = to_float(x[row * 2 * half + half + col]) + to_float(bias[half + col]);
  y[i] = from_float<T>(a * gelu_erf(g));
}

constexpr int kBlock = 256;

template <typename T>
int launch(const void* x, const void* bias, void* y, int64_t rows, int64_t half, cudaStream_t stream) {
  constexpr int N = sizeof(uint4) / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(bias) |
                        reinterpret_cast<uintptr_t>(y)) % sizeof(uint4) == 0;
  if (half % N == 0 && aligned) {
    const int64_t total = rows * (half / N);
    const int64_t blocks = (total + kBlock - 1) / kBlock;
    const auto in = static_cast<const uint4*>(x);
    const auto b = static_cast<const uint4*>(bias);
    const auto out = static_cast<uint4*>(y);
    if (2 * total + kBlock < (int64_t(1) << 32))  // every index (the input's: 2 x total) fits 32 bits
      bias_split_gelu_vec<T, uint32_t><<<unsigned(blocks), kBlock, 0, stream>>>(in, b, out, uint32_t(total),
                                                                                 uint32_t(half / N));
    else
      bias_split_gelu_vec<T, int64_t><<<unsigned(blocks), kBlock, 0, stream>>>(in, b, out, total, half / N);
  } else {
    const int64_t total = rows * half;
    const int64_t blocks = (total + kBlock - 1) / kBlock;
    bias_split_gelu_scalar<T><<<unsigned(blocks), kBlock, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), total, half);
  }
  return int(cudaGetLastError());
}

}  // namespace

// `x`: [rows, 2 * half], `bias`: [2 * half], `y`: [rows, half], all on the device; `fp16`: __half, else float.
// Returns a cudaError_t (0: launched).
extern "C" int sdxl_trt_bias_split_gelu_cuda(int fp16, const void* x, const void* bias, void* y, int64_t rows,
                                              int64_t half, void* stream) {
  if (rows == 0 || half == 0) return 0;
  if ((rows * half + kBlock - 1) / kBlock > 0x7fffffff) return int(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  return fp16 ? launch<__half>(x, bias, y, rows, half, s) : launch<float>(x, bias, y, rows, half, s);
}

extern "C" const char* sdxl_trt_cuda_error_string(int error) { return cudaGetErrorString(cudaError_t(error)); }
