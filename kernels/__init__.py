"""CUDA C kernels for the denoising loop, compiled at run time with NVRTC (nvrtc.py) from step.cu.

Each kernel's reference is the numpy code the CPU runtime already runs (samplers.py, the pipeline's guidance and
decode, images.py); tests/test_kernels.py holds them to it on a GPU. So far: input scaling, classifier-free
guidance, the Euler step with the step counter on the device, latent unscaling and the uint8 image conversion.
Not yet: the other samplers' updates, device-side noise, and the loop that uses them (issue 7).
"""
