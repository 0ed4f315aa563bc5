"""Voxel-wise segmentation of 6D dMRI with SE(3)-equivariant pq-networks."""

from esdmri.segmentation.network import CNN3DBaseline, PQSegmentationNetwork
from esdmri.segmentation.training import (
    load_model,
    predict_segmentation,
    save_model,
    segmentation_loss,
    signal_to_input,
    train_segmentation,
)

__all__ = [
    "CNN3DBaseline",
    "PQSegmentationNetwork",
    "load_model",
    "predict_segmentation",
    "save_model",
    "segmentation_loss",
    "signal_to_input",
    "train_segmentation",
]
