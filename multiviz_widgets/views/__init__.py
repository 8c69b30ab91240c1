"""The Explorer's views: thin widgets that render engine results and turn clicks into
Selection changes. InputView (anywidget, js/input_view.js), HeatmapView, NeuronView, PathView
(bqplot), EmbeddingView (ipyvolume), and the control panel, progress bar, error banner and notices banner (the kernels' caveats)."""
from .controls import Controls, ErrorBanner, NoticeBanner, ProgressPanel
from .embedding_view import EmbeddingView
from .heatmap_view import HeatmapView
from .neuron_view import NeuronView
from .path_view import PathView

__all__ = ["Controls", "EmbeddingView", "ErrorBanner", "HeatmapView", "NeuronView",
           "NoticeBanner", "PathView", "ProgressPanel"]
