// Per-step math of the denoising loop, on the device. Compiled at run time with NVRTC (kernels/nvrtc.py).
//
// Each kernel mirrors a numpy function of sdxl_trt.runtime (its "twin", named above it) operation by operation,
// in fp32 with the same rounding points: the GPU tests compare them bit for bit or within a few ulp. It is
// compiled without FMA contraction and with IEEE division and square roots, as numpy computes.
// Every step's scalars (a coefficient table computed by samplers.coefficient_table, rounded to fp32 as numpy
// rounds a Python float meeting a float32 array) and the step counter live in device memory, so that a CUDA graph
// of the loop replays without host updates: `advance_step` moves the counter on.
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

#define NCOEF 10  // samplers.KERNEL_COEFFICIENTS

// Twin: Sampler.scale_model_input, with the pipeline's np.concatenate([x] * copies) (the CFG halves):
// x / coef[0] (k-diffusion samplers: sqrt(sigma² + 1); the others: 1, which leaves x as it is).
template <typename T>
__device__ void scale_input(const float* x, T* out, const float* coef, const int* step, size64 n, int copies) {
    const float scale = coef[*step * NCOEF];
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

// widen_f16 / widen_f32 (below): the model output as fp32 without guidance. Twin: `.astype(np.float32)`.

// Twin: samplers._vp_denoised (x = alpha * x0 + sigma * eps): (x0, eps) from the model output.
__device__ __forceinline__ void vp_denoised(float o, float x, float alpha, float sigma, int prediction, float* x0, float* eps) {
    if (prediction == 0) { *x0 = (x - sigma * o) / alpha; *eps = o; }
    else { *x0 = alpha * x - sigma * o; *eps = alpha * o + sigma * x; }
}

// Twin: each sampler's Sampler._update (samplers.py), the scalars of step *step taken from the coefficient table
// that samplers.coefficient_table computes (NCOEF per step, laid out as each kernel_coefficients says).
// x is updated in place; `prev` is dpmpp_2m's previous x0 (state); `noise` is [steps, n] drawn in advance by the
// host from each image's own generator (the streams the CPU runtime draws), or null where the sampler needs none.
__device__ void sampler_step(int kind, float* x, const float* out, float* prev, const float* noise, const float* coef_all,
                             const int* step_ptr, int prediction, size64 n) {
    const int step = *step_ptr;
    const float* c = coef_all + step * NCOEF;
    const float* z = noise ? noise + step * n : 0;
    FOR_EACH(i, n) {
        const float xi = x[i], o = out[i];
        float x0, eps, r;
        switch (kind) {
        case 0: case 1: {  // euler, euler_a: d = (x - x0) / sigma, x + d * step (+ noise * sigma_up)
            x0 = prediction == 0 ? xi - c[1] * o : xi / c[2] - o * c[3];
            const float d = (xi - x0) / c[1];
            r = xi + d * c[4];
            if (kind == 1) r = r + z[i] * c[5];
            break;
        }
        case 2: {  // dpmpp_2m: second order from the run's second step, scale * x + alpha_next * (1 - e) * d
            vp_denoised(o, xi, c[1], c[2], prediction, &x0, &eps);
            const float d = c[4] != 0.0f ? x0 + (x0 - prev[i]) / c[3] : x0;
            prev[i] = x0;
            r = c[5] * xi + c[6] * d;
            break;
        }
        case 3: {  // ddim: sqrt(a_prev) * x0 + sqrt(1 - a_prev - std²) * eps (+ std * noise)
            vp_denoised(o, xi, c[1], c[2], prediction, &x0, &eps);
            if (c[3] != 0.0f) x0 = fminf(fmaxf(x0, -c[4]), c[4]);
            r = c[5] * x0 + c[6] * eps;
            if (z) r = r + c[7] * z[i];
            break;
        }
        default: {  // lcm: c_out * x0 + c_skip * x, re-noised to the next timestep unless it is the last
            vp_denoised(o, xi, c[1], c[2], prediction, &x0, &eps);
            if (c[3] != 0.0f) x0 = fminf(fmaxf(x0, -c[4]), c[4]);
            r = c[5] * x0 + c[6] * xi;
            if (c[9] == 0.0f) r = c[7] * r + c[8] * z[i];
        }
        }
        x[i] = r;
    }
}

// Twin: Pipeline.decode's first line: latents / scaling_factor + shift, as the VAE decoder's input.
template <typename T>
__device__ void unscale_latents(const float* x, T* out, float scaling_factor, float shift, size64 n) {
    FOR_EACH(i, n) store(out, i, x[i] / scaling_factor + shift);
}

// Twin: Pipeline.decode + images.to_uint8: NCHW in [-1, 1] → NHWC uint8, clip(x / 2 + 0.5, 0, 1) * 255
// rounded half to even (numpy's round). Any NaN/Inf in the image sets *nonfinite to 1 (the caller zeroes it).
template <typename T>
__device__ void to_uint8(const T* image, unsigned char* out, int* nonfinite, int channels, size64 pixels, size64 n) {
    FOR_EACH(i, n) {  // i indexes the output: ((image * pixels) + p) * channels + c
        const size64 c = i % channels, p = (i / channels) % pixels, b = i / (channels * pixels);
        const float x = load(image, (b * channels + c) * pixels + p);
        if ((__float_as_uint(x) & 0x7f800000u) == 0x7f800000u) *nonfinite = 1;  // exponent all ones: Inf or NaN
        float v = fminf(fmaxf(x / 2.0f + 0.5f, 0.0f), 1.0f);
        out[i] = (unsigned char)rintf(v * 255.0f);
    }
}

extern "C" {
__global__ void scale_input_f16(const float* x, half_t* out, const float* coef, const int* step, size64 n, int copies) { scale_input(x, out, coef, step, n, copies); }
__global__ void scale_input_f32(const float* x, float* out, const float* coef, const int* step, size64 n, int copies) { scale_input(x, out, coef, step, n, copies); }
__global__ void cfg_combine_f16(const half_t* pred, float* out, float guidance, size64 n) { cfg_combine(pred, out, guidance, n); }
__global__ void cfg_combine_f32(const float* pred, float* out, float guidance, size64 n) { cfg_combine(pred, out, guidance, n); }
__global__ void step_kernel(int kind, float* x, const float* out, float* prev, const float* noise, const float* coef, const int* step, int prediction, size64 n) { sampler_step(kind, x, out, prev, noise, coef, step, prediction, n); }
__global__ void widen_f16(const half_t* in, float* out, size64 n) { FOR_EACH(i, n) out[i] = load(in, i); }
__global__ void widen_f32(const float* in, float* out, size64 n) { FOR_EACH(i, n) out[i] = in[i]; }
// Twin: the numpy loop's `timestep` input, np.full(batch, sampler.timesteps[i]): row *step of a [steps, batch]
// table, copied into the one buffer the UNet reads (a CUDA graph needs its input at a fixed address).
__global__ void select_timestep(const float* table, float* out, const int* step, int batch) { FOR_EACH(i, (size64)batch) out[i] = table[(size64)*step * batch + i]; }
// Twin: the sum of several ControlNets' residuals (diffusers' MultiControlNetModel adds them in the model's dtype):
// dst += src, computed in fp32 and stored in the residuals' dtype.
__global__ void accumulate_f16(half_t* dst, const half_t* src, size64 n) { FOR_EACH(i, n) store(dst, i, load(dst, i) + load(src, i)); }
__global__ void accumulate_f32(float* dst, const float* src, size64 n) { FOR_EACH(i, n) dst[i] = dst[i] + src[i]; }
// Twin: zero residuals (the pipeline's np.zeros for a step where the first ControlNet is outside its window).
__global__ void zero_f16(half_t* dst, size64 n) { FOR_EACH(i, n) dst[i] = 0; }
__global__ void zero_f32(float* dst, size64 n) { FOR_EACH(i, n) dst[i] = 0.0f; }
__global__ void advance_step(int* step) { if (blockIdx.x == 0 && threadIdx.x == 0) *step += 1; }
__global__ void unscale_latents_f16(const float* x, half_t* out, float scaling_factor, float shift, size64 n) { unscale_latents(x, out, scaling_factor, shift, n); }
__global__ void unscale_latents_f32(const float* x, float* out, float scaling_factor, float shift, size64 n) { unscale_latents(x, out, scaling_factor, shift, n); }
__global__ void to_uint8_f16(const half_t* image, unsigned char* out, int* nonfinite, int channels, size64 pixels, size64 n) { to_uint8(image, out, nonfinite, channels, pixels, n); }
__global__ void to_uint8_f32(const float* image, unsigned char* out, int* nonfinite, int channels, size64 pixels, size64 n) { to_uint8(image, out, nonfinite, channels, pixels, n); }
}
