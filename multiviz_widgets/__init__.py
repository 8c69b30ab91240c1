"""multiviz_widgets: see inside multimodal PyTorch models, in linked notebook views."""
from .adapter import AdapterError, Class, ModelAdapter, Neuron, Prepared, Target
from .data import MultimodalDataset
from .modalities import Image, Modality, Tabular, Text, TimeSeries
from .results import Attribution, Interaction, Result

__version__ = "0.1.0"

__all__ = [
    "AdapterError", "Attribution", "Class", "Image", "Interaction", "ModelAdapter", "Modality",
    "MultimodalDataset", "Neuron", "Prepared", "Result", "Tabular", "Target", "Text", "TimeSeries",
]
