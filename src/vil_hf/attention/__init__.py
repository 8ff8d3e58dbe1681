"""One module per attention type of ViL; the heavy part lives in ``vil_kernels``."""

from .full import ViLFullAttention
from .longformer import ViLLongformerAttention

ATTENTION_CLASSES = {
    "longformer": ViLLongformerAttention,
    "full": ViLFullAttention,
}

__all__ = ["ATTENTION_CLASSES", "ViLFullAttention", "ViLLongformerAttention"]
