"""One module per attention type of ViL; the heavy longformer part lives in ``vil_kernels``."""

from .base import ViLAttentionBase
from .full import ViLFullAttention
from .global_only import ViLGlobalOnlyAttention
from .linformer import ViLLinformerAttention
from .longformer import ViLLongformerAttention
from .performer import ViLPerformerAttention
from .srformer import ViLSRAttention

ATTENTION_CLASSES = {
    "longformer": ViLLongformerAttention,
    "global": ViLGlobalOnlyAttention,
    "srformer": ViLSRAttention,
    "performer": ViLPerformerAttention,
    "linformer": ViLLinformerAttention,
    "full": ViLFullAttention,
}

__all__ = [
    "ATTENTION_CLASSES",
    "ViLAttentionBase",
    "ViLFullAttention",
    "ViLGlobalOnlyAttention",
    "ViLLinformerAttention",
    "ViLLongformerAttention",
    "ViLPerformerAttention",
    "ViLSRAttention",
]
