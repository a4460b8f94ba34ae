"""Datasets in COCO format (``instances_*.json`` + image folders) and a synthetic one."""

from .coco import CocoDataset, DatasetError, collate, dataset_num_classes, find_split

__all__ = ["CocoDataset", "DatasetError", "collate", "dataset_num_classes", "find_split"]
