"""Bilinear CNN waterbird recognition: models, weights, preprocessing. Knows nothing of Ray or HTTP."""

from bcnn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bcnn.models import BCNN, ImageClassifier, bcnn, build_model, efficientnet_lite0, prepare_for_inference
from bcnn.predict import DEFAULT_WATERBIRD_THRESHOLD, Answer, Prediction, Predictor
from bcnn.preprocess import (
    DEFAULT_MAX_PIXELS,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    InvalidImage,
    Preprocess,
    UnsupportedFormat,
    decode_image,
    preprocess_image,
)
from bcnn.weights import DEFAULT, WEIGHTS, Weights, get_weights

__all__ = [
    "BCNN", "DEFAULT", "DEFAULT_MAX_PIXELS", "DEFAULT_WATERBIRD_THRESHOLD", "WEIGHTS", "Answer", "CheckpointError",
    "EmptyImage", "ImageClassifier", "ImageError", "ImageTooLarge", "InvalidImage", "Prediction", "Predictor",
    "Preprocess", "UnsupportedFormat", "Weights", "bcnn", "build_model", "decode_image", "efficientnet_lite0",
    "get_weights", "load_checkpoint", "prepare_for_inference", "preprocess_image", "save_checkpoint",
]
