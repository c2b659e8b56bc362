"""CUDA C step kernels compiled with NVRTC, each beside its numpy reference (empty until the GPU runtime lands)."""
