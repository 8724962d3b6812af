"""Offline training-side code: data preparation (`training.prepare`) and its reader (`training.dataset`)."""
