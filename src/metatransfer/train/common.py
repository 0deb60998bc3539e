"""Emptied: preprocessing moved to `data.preprocess`, backbone files to `models.model_files`."""
