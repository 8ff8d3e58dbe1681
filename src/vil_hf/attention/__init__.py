"""One module per attention type of ViL; the heavy part lives in ``vil_kernels``."""

from .base import ViLAttentionBase
from .full import ViLFullAttention
from .longformer import ViLLongformerAttention

ATTENTION_CLASSES = {
    "longformer": ViLLongformerAttention,
    "full": ViLFullAttention,
}

__all__ = ["ATTENTION_CLASSES", "ViLAttentionBase", "ViLFullAttention", "ViLLongformerAttention"]
