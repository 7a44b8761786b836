"""The Hydra configs (train.yaml, sample.yaml, evaluate.yaml and their groups), shipped inside the package
so an installed copy (`pip install .`) finds them: `training.config.CONFIG_DIR` is this folder."""
