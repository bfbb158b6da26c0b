"""Suite-wide setup: run Triton kernels in the interpreter when there is no GPU.

The variable must be set before triton is first imported, so it lives here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
