"""Training and measuring, on top of every model package: the Lightning modules of each stage
(tokenizer_module, generator_module, eagle_module, posttrain_module), data modules that resume exactly
(data.py), checkpoints and callbacks, input validation before compute (validation.py), and the metrics
(FID and friends through torch-fidelity, the photos-net feature network)."""
