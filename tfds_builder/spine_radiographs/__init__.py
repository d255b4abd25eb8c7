"""spine_radiographs dataset: importing this package registers the TFDS builder."""

from tfds_builder.spine_radiographs.spine_radiographs_dataset_builder import Builder

__all__ = ["Builder"]
