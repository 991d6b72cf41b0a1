"""Image loading and validation, data set layouts, and the generated demo data set."""

from defectlens.data.datasets import Dataset, Sample, load_dataset
from defectlens.data.images import ImageInput, iter_batches, load_rgb

__all__ = ["Dataset", "ImageInput", "Sample", "iter_batches", "load_dataset", "load_rgb"]
