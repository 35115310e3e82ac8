"""semcache: a local LLM server for agents that remembers every agent's KV cache."""

from semcache.engine.blas import BLAS_INFO

__version__ = "0.1.0"
__all__ = ["BLAS_INFO", "__version__"]
