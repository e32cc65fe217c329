"""memtrain: self-supervised training of an LLM agent's context memory (MemTrain, arXiv 2606.03197)."""

import logging


__version__ = "0.1.0.dev0"


def _quiet_bitsandbytes_kernel_hub() -> None:
    """Drop bitsandbytes' start-up line about its optional Hub kernel on CPU.

    bitsandbytes 0.50 tries ``kernels.get_kernel`` (a download from the Hub) for a faster CPU 4-bit matmul at import,
    and logs "Failed to load CPU gemm_4bit_forward from kernels-community" when the optional ``kernels`` package is
    absent. Its own CPU kernel is then used, correctly; the line printed at every command (``--help`` too) only
    misleads. Every other record of that logger passes.
    """

    def keep(record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in str(record.msg)

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(keep)


_quiet_bitsandbytes_kernel_hub()
