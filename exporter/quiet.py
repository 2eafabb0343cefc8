"""Keep the libraries we drive off the terminal: the CLI's process and `build --jobs` workers."""

from __future__ import annotations


def quiet_libraries() -> None:
    """The CLI owns the terminal: progress bars and advisory warnings of the libraries we
    drive (transformers, torchao, torch.export, ExecuTorch) would bury our own progress lines."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree", "torch._export", "executorch", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
