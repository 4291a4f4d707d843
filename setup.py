"""megatron-dsv3: DeepSeek-V3's training system as a Megatron-Core plugin."""

from setuptools import find_packages, setup

setup(
    name="megatron-dsv3",
    version="0.1.0",
    description="DeepSeek-V3 layers, MoE, MTP, FP8, DualPipe and expert dispatch for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_dsv3", "megatron_dsv3.*"]),
    install_requires=[
        # The CPU build is what `pip install torch==2.13.0` takes on our machines; any torch >= 2.4
        # with float8_e4m3fn works. Never leave torch unpinned on a CPU-only machine.
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "packaging",
        "psutil",  # megatron-core's distributed-checkpoint writer needs it and does not declare it
    ],
    extras_require={
        # Transformer Engine is GPU-only; it is used when it imports and CUDA is present.
        "te": ["transformer-engine[pytorch]>=2.4"],
        "hf": ["transformers>=4.57", "safetensors>=0.4"],
        "plot": ["matplotlib>=3.7"],
        # post-training quantisation and export (python -m megatron_dsv3.export); 0.47.0 is the
        # release tested here (pure Python, installs on CPU machines); it imports requests and
        # huggingface_hub without declaring them
        "deploy": ["nvidia-modelopt==0.47.0", "requests", "huggingface_hub", "safetensors>=0.4"],
        "dev": ["pytest>=8", "pytest-timeout", "transformers>=4.57", "safetensors>=0.4", "matplotlib>=3.7",
                "nvidia-modelopt==0.47.0", "requests", "huggingface_hub",
                # transformers reads DeepSeek's FP8 layout (the fp8-block export) only with it
                "accelerate"],
    },
)
