"""Datasets: readers of the published layouts, the decoded-image cache, episode sampling, augmentation."""
