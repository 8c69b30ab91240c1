"""multiviz_widgets: see inside multimodal PyTorch models, in linked notebook views.

The core (modalities, adapter, doctor, kernels) imports only torch and numpy; the widgets
(Explorer, Selection, demo) are imported on first use, so kernel-only code stays light.
"""
from .adapter import AdapterError, Class, ModelAdapter, Neuron, Prepared, Target
from .annotations import AnnotationError, Annotations
from .data import MultimodalDataset
from .doctor import check
from .modalities import Image, Modality, Tabular, Text, TimeSeries
from .results import Attribution, Interaction, Result

__version__ = "0.1.0"

_LAZY = {"Explorer": "explorer", "demo": "explorer", "Selection": "selection"}

__all__ = [
    "AdapterError", "AnnotationError", "Annotations", "Attribution", "Class", "Explorer", "Image",
    "Interaction", "ModelAdapter", "Modality", "MultimodalDataset", "Neuron", "Prepared", "Result", "Selection", "Tabular",
    "Target", "Text", "TimeSeries", "check", "demo",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'multiviz_widgets' has no attribute {name!r}")
