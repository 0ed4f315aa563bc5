"""Voxel-wise segmentation of 6D dMRI with SE(3)-equivariant pq-networks, and lesion phantoms."""

from esdmri.segmentation.network import PRESETS, CNN3DBaseline, PQSegmentationNetwork
from esdmri.segmentation.phantom import LesionPhantom, make_lesion_dataset, make_lesion_phantom
from esdmri.segmentation.training import (
    load_network,
    predict_segmentation,
    save_network,
    segmentation_loss,
    signal_to_input,
    train_segmentation,
)

__all__ = [
    "PRESETS",
    "CNN3DBaseline",
    "LesionPhantom",
    "PQSegmentationNetwork",
    "make_lesion_dataset",
    "make_lesion_phantom",
    "load_network",
    "predict_segmentation",
    "save_network",
    "segmentation_loss",
    "signal_to_input",
    "train_segmentation",
]
