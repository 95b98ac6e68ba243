"""The 2019 design, rebuilt only to be measured against: Flask, `/upload/` taking form field `file`, served by
`gunicorn -w N`, one model copy per worker kept in memory. Same model and preprocessing as the new service.

    gunicorn -w 2 -b 127.0.0.1:8001 load.seed_baseline.service:app
"""

from __future__ import annotations

import os

import torch
from flask import Flask, jsonify, request

from bcnn.images import ImageError
from bcnn.models import get_weights
from bcnn.predict import Predictor
from bcnn.preprocess import preprocess_image

# Like the original, each Gunicorn worker builds its own model when it imports this module. One thread per
# worker is this design's best case on a small machine (workers, not threads, share the cores).
torch.set_num_threads(int(os.environ.get("SEED_TORCH_THREADS", "1")))
weights = get_weights(os.environ.get("SEED_CHECKPOINT", "default"))  # the same model as the service measured
model = Predictor(weights)
# Measuring the serving path alone (`python -m load cost`): answer from zero logits, as the service with its
# forward pass skipped does (load/devices.py), so what remains is what a GPU's speed would leave.
skip_forward = os.environ.get("SEED_SKIP_FORWARD") == "1"

app = Flask(__name__)


@app.route("/upload/", methods=["POST"])
def upload():  # noqa: ANN201
    file = request.files.get("file")
    if file is None:
        return jsonify({"error": "no file"}), 400
    try:
        image = preprocess_image(file.read(), weights.preprocess)
    except ImageError as e:
        return jsonify({"error": str(e)}), 400
    logits = torch.zeros(1, len(weights.categories)) if skip_forward else model.logits(image[None])
    answer = model.answers(logits)[0]
    return jsonify({"is_waterbird": answer.is_waterbird,
                    "predictions": [{"label": p.label, "score": p.score} for p in answer.predictions]})
