"""Session-wide test setup, loaded before any test module imports triton.

Without a GPU, Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET must be
set before `triton.jit` decorates them. On a GPU machine the same tests run the kernels natively.
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent / "tests"))  # the tests import `helpers`
