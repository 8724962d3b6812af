"""Offline training: data preparation (`training.prepare`), the image model (`training.train`,
`training.export`), the text heads (`training.text`) and the hyper-parameter search
(`training.search`). What crosses into serving is declared in `common.prepared_data` and
`common.artifact`."""
