"""Fidelity datasets: reference runs downsampled to the coarse grid, stored as HDF5
(installed as ``zosol.datasets``)."""
from .hdf5 import SCHEMA_VERSION, DatasetError, FidelityDataset, Simulation, load_dataset
from .generate import dataset_path, generate

__all__ = ["SCHEMA_VERSION", "DatasetError", "FidelityDataset", "Simulation", "dataset_path", "generate",
           "load_dataset"]
