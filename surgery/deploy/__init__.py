"""A trained run put to use outside training.

predict.py  `surgery predict`: image files classified with the run's own transforms and classes
export.py   `surgery export`: a deployable file (pt2, onnx, torchscript), checked against the run
features.py multi-scale feature maps for detectors and segmenters (`export --format features`)
"""
