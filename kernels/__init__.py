"""CUDA C kernels for the denoising loop, compiled at run time with NVRTC (nvrtc.py) from step.cu.

Each kernel's reference is the numpy code the CPU runtime already runs (samplers.py, the pipeline's guidance and
decode, images.py); tests/test_kernels.py holds them to it on a GPU, bit for bit. So far: input scaling,
classifier-free guidance, the updates of euler, euler_a, dpmpp_2m(_karras), ddim and lcm driven by a per-step
coefficient table and a step counter in device memory (noise is drawn in advance on the host from each image's
own generator, so the streams stay those of the CPU runtime), latent unscaling and the uint8 image conversion.
Not yet: heun, dpmpp_sde_karras, tcd, guidance rescale, and the device-resident loop that uses them (issue 7).

ort_ops.py and ort_ops/: an ONNX Runtime custom-op library (C API, compiled with nvcc) whose operators
`sdxl-trt optimize --custom-ops` puts into the UNets' GPU files: BiasSplitGelu, the GEGLU, faster than ONNX Runtime's.
"""
