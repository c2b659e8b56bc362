// Per-step math of the denoising loop, on the device. Compiled at run time with NVRTC (kernels/nvrtc.py).
//
// Each kernel mirrors a numpy function of sdxl_trt.runtime (its "twin", named above it) operation by operation,
// in fp32 with the same rounding points: the GPU tests compare them bit for bit or within a few ulp. It is
// compiled without FMA contraction and with IEEE division and square roots, as numpy computes.
// Schedules (sigmas) and the step counter live in device memory, so that a CUDA graph of the loop replays
// without host updates: `advance_step` moves the counter on.
// fp16 tensors are raw 16-bit values converted with PTX cvt instructions (no CUDA headers needed).

typedef unsigned short half_t;
typedef unsigned long long size64;

__device__ __forceinline__ float h2f(half_t h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ half_t f2h(float f) { half_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float load(const float* p, size64 i) { return p[i]; }
__device__ __forceinline__ float load(const half_t* p, size64 i) { return h2f(p[i]); }
__device__ __forceinline__ void store(float* p, size64 i, float v) { p[i] = v; }
__device__ __forceinline__ void store(half_t* p, size64 i, float v) { p[i] = f2h(v); }

#define FOR_EACH(i, n) for (size64 i = blockIdx.x * (size64)blockDim.x + threadIdx.x; i < (n); i += (size64)blockDim.x * gridDim.x)

// numpy's `array_f32 <op> python_float` rounds the Python float (a double) to fp32 first (NEP 50).
__device__ __forceinline__ float as_f32(double v) { return (float)v; }

// Twin: samplers._KDiffusion.scale_model_input, with the pipeline's np.concatenate([x] * copies) (CFG halves):
// x / sqrt(sigma² + 1), the square root taken in double as Python's math.sqrt does.
template <typename T>
__device__ void scale_input(const float* x, T* out, const float* sigmas, const int* step, size64 n, int copies) {
    const double sigma = sigmas[*step];
    const float scale = as_f32(sqrt(sigma * sigma + 1.0));
    FOR_EACH(i, n) {
        const float v = x[i] / scale;
        for (int c = 0; c < copies; ++c) store(out, c * n + i, v);
    }
}

// Twin: Pipeline._denoise's classifier-free guidance, negatives stacked first:
// uncond + g * (text - uncond), in fp32 after the model output is cast to fp32.
template <typename T>
__device__ void cfg_combine(const T* pred, float* out, float guidance, size64 n) {
    FOR_EACH(i, n) {
        const float uncond = load(pred, i), text = load(pred, n + i);
        out[i] = uncond + guidance * (text - uncond);
    }
}

// Twin: samplers._KDiffusion._update for "euler": d = (x - x0) / sigma with x0 from _ve_denoised, then
// x + d * (sigma_next - sigma). prediction: 0 epsilon, 1 v_prediction. In place on x.
__device__ void euler(float* x, const float* out, const float* sigmas, const int* step, int prediction, size64 n) {
    const double sigma = sigmas[*step], sigma_next = sigmas[*step + 1];
    const float s = as_f32(sigma), dt = as_f32(sigma_next - sigma);
    const float v_scale = as_f32(sigma * sigma + 1.0), v_mix = as_f32(sigma / sqrt(sigma * sigma + 1.0));
    FOR_EACH(i, n) {
        const float xi = x[i], o = out[i];
        const float x0 = prediction == 0 ? xi - s * o : xi / v_scale - o * v_mix;
        const float d = (xi - x0) / s;
        x[i] = xi + d * dt;
    }
}

// Twin: Pipeline.decode's first line: latents / scaling_factor + shift, as the VAE decoder's input.
template <typename T>
__device__ void unscale_latents(const float* x, T* out, float scaling_factor, float shift, size64 n) {
    FOR_EACH(i, n) store(out, i, x[i] / scaling_factor + shift);
}

// Twin: Pipeline.decode + images.to_uint8: NCHW in [-1, 1] → NHWC uint8, clip(x / 2 + 0.5, 0, 1) * 255
// rounded half to even (numpy's round).
template <typename T>
__device__ void to_uint8(const T* image, unsigned char* out, int channels, size64 pixels, size64 n) {
    FOR_EACH(i, n) {  // i indexes the output: ((image * pixels) + p) * channels + c
        const size64 c = i % channels, p = (i / channels) % pixels, b = i / (channels * pixels);
        float v = load(image, (b * channels + c) * pixels + p) / 2.0f + 0.5f;
        v = fminf(fmaxf(v, 0.0f), 1.0f);
        out[i] = (unsigned char)rintf(v * 255.0f);
    }
}

extern "C" {
__global__ void scale_input_f16(const float* x, half_t* out, const float* sigmas, const int* step, size64 n, int copies) { scale_input(x, out, sigmas, step, n, copies); }
__global__ void scale_input_f32(const float* x, float* out, const float* sigmas, const int* step, size64 n, int copies) { scale_input(x, out, sigmas, step, n, copies); }
__global__ void cfg_combine_f16(const half_t* pred, float* out, float guidance, size64 n) { cfg_combine(pred, out, guidance, n); }
__global__ void cfg_combine_f32(const float* pred, float* out, float guidance, size64 n) { cfg_combine(pred, out, guidance, n); }
__global__ void euler_step(float* x, const float* out, const float* sigmas, const int* step, int prediction, size64 n) { euler(x, out, sigmas, step, prediction, n); }
__global__ void advance_step(int* step) { if (blockIdx.x == 0 && threadIdx.x == 0) *step += 1; }
__global__ void unscale_latents_f16(const float* x, half_t* out, float scaling_factor, float shift, size64 n) { unscale_latents(x, out, scaling_factor, shift, n); }
__global__ void unscale_latents_f32(const float* x, float* out, float scaling_factor, float shift, size64 n) { unscale_latents(x, out, scaling_factor, shift, n); }
__global__ void to_uint8_f16(const half_t* image, unsigned char* out, int channels, size64 pixels, size64 n) { to_uint8(image, out, channels, pixels, n); }
__global__ void to_uint8_f32(const float* image, unsigned char* out, int channels, size64 pixels, size64 n) { to_uint8(image, out, channels, pixels, n); }
}
