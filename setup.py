"""Distributed training launcher for language models on Slurm, with its own Triton kernels.

Development install (this machine pins the CPU build of torch that lies on disk):
    pip install torch==2.13.0 -e ".[test]"
On a cluster, install into an environment that already has the site's CUDA torch:
    pip install -e .
"""
from setuptools import find_packages, setup

setup(
    name="slurm-lm",
    version="0.1.0",
    description="Pre-sharded data, fused kernels and DeepSpeed ZeRO training of Hugging Face "
                "language models, launched on Slurm",
    packages=find_packages(include=["launcher", "launcher.*", "lm_kernels", "lm_kernels.*",
                                    "train", "train.*"]),
    python_requires=">=3.10",
    # torch is a range, not a pin: a cluster keeps the CUDA build it already has.
    install_requires=[
        "torch>=2.4",
        # no upper bound: 5.25.0 passes the fast loop and a 2-rank train/export/generate run with
        # Hugging Face's `kernels` package installed beside it (it requires it; our kernels are
        # `lm_kernels`, renamed from `kernels` for that clash: tests/test_packaging.py)
        "transformers>=4.56",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "deepspeed>=0.16",
        "triton>=3.0; platform_system == 'Linux'",
        "submitit>=1.5",
        "numpy>=1.24",
        "pyarrow>=14",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "psutil>=5.9",
        # prepare's fast engine for byte-level BPE; where tiktoken has no wheel, prepare uses
        # the Hugging Face tokenizer alone (`--tokenizer-engine auto` notes it)
        "tiktoken>=0.9; (platform_system == 'Linux' and (platform_machine == 'x86_64'"
        " or platform_machine == 'aarch64'))"
        " or platform_system == 'Darwin'"
        " or (platform_system == 'Windows' and platform_machine == 'AMD64')",
    ],
    extras_require={# the tests run all of it: seqeval checks train/ner_metrics.py, the trackers
                    # are read back with their own libraries, lm-eval checks eval_harness;
                    # pytest-xdist runs pytest.ini's two workers, which share the session's
                    # prepared data through filelock
                    "test": ["pytest>=8", "pytest-xdist>=3.5", "filelock>=3.12", "seqeval>=1.2",
                             "tensorboard>=2.14", "wandb>=0.19", "mlflow>=3.0", "lm-eval>=0.4.5",
                             "peft>=0.17"],
                    # report_to trackers (tensorboard: torch.utils.tensorboard writes through it)
                    "tensorboard": ["tensorboard>=2.14"],
                    "wandb": ["wandb>=0.19"],
                    "mlflow": ["mlflow>=3.0"],
                    # eval_harness: downstream evals of each checkpoint
                    "eval": ["lm-eval>=0.4.5"],
                    # the peft section: LoRA adapters
                    "lora": ["peft>=0.17"],
                    # baselines the benchmarks compare against
                    "bench": ["accelerate>=1.1", "liger-kernel>=0.5"]},
)
