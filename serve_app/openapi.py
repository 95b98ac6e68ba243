"""The API's OpenAPI 3.1 document, served at /openapi.json and used by the schema-driven fuzz tests."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}


def _error(description: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_MODEL_PARAMETER = {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                    "description": "a model the service serves (GET /models); none: the default"}
_UNKNOWN_MODEL = _error("No model of that name: the message lists the names served (code unknown_model)")
_MODEL_UNAVAILABLE = _error("That model is configured but cannot answer now (it failed to load: code "
                            "model_unavailable); the others still answer")


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Waterbird recognition", "version": "1.0.0",
             "description": "Upload a photo of a waterbird; get the species and a confidence."},
    "paths": {
        "/classify": {
            "post": {
                "summary": "Name the waterbird in a photo",
                "description": "Answered by the model named (`model` in the query, or the form's `model` field), "
                               "or by the default; where the operator gave that model a candidate, a share of its "
                               "uploads is answered by the candidate instead. The answer's `model` says which "
                               "answered.",
                "parameters": [{"name": "top_k", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5}},
                               _MODEL_PARAMETER],
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                           "properties": {"file": {"type": "string",
                                                                                   "format": "binary"},
                                                                          "model": {"type": "string"}}}},
                        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        "image/webp": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": {"description": "The ranked species",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}}},
                    "400": _error("Not a usable image: empty, truncated, not an image, or no 'file' field"),
                    "404": _UNKNOWN_MODEL,
                    "408": _error("The upload did not arrive in time"),
                    "413": _error("Body over the size limit, or image over the pixel limit"),
                    "415": _error("A format outside JPEG, PNG, WebP, GIF, BMP, TIFF"),
                    "429": _error("This client (its address, as the service's proxies saw it) holds its share of the "
                                  "service while others wait; Retry-After is when its uploads should be answered"),
                    "503": _error("At capacity: the upload would wait longer than the service admits; "
                                  "Retry-After is the wait it expects, in seconds. Or the model named cannot answer "
                                  "now (code model_unavailable)"),
                    "504": _error("The request took longer than the request timeout"),
                },
            }
        },
        "/healthz": {"get": {"summary": "Every stage has a live replica with its model loaded",
                             "responses": {"200": {"description": "Healthy"},
                                           "503": {"description": "A stage is not serving"}}}},
        "/labels": {"get": {"summary": "The model's classes", "parameters": [_MODEL_PARAMETER],
                            "responses": {"200": {"description": "Model and labels",
                                                  "content": {"application/json": {"schema": {
                                                      "$ref": "#/components/schemas/Labels"}}}},
                                          "404": _UNKNOWN_MODEL, "503": _error("No model loaded")}}},
        "/models": {"get": {"summary": "Every model served, the default first, with its candidate and their "
                                       "agreement so far (in the replica that answers)",
                            "responses": {"200": {"description": "The models",
                                                  "content": {"application/json": {"schema": {
                                                      "$ref": "#/components/schemas/Models"}}}},
                                          "503": _error("No model loaded")}}},
        "/offline.json": {"get": {
            "summary": "What the page saves for offline use: ONNX Runtime Web's files and the phone's model",
            "parameters": [_MODEL_PARAMETER],
            "responses": {"200": {"description": "Files with their sizes, or why none are offered",
                                  "content": {"application/json": {"schema": {
                                      "$ref": "#/components/schemas/OfflineFiles"}}}},
                          "503": _error("No model loaded")}}},
        "/model/{sha256}.onnx": {"get": {
            "summary": "The phone's model (docs/offline.md): an ONNX file named by its SHA-256, never changing",
            "parameters": [{"name": "sha256", "in": "path", "required": True, "schema": {"type": "string"}},
                           _MODEL_PARAMETER],
            "responses": {"200": {"description": "The ONNX file",
                                  "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}},
                          "404": _error("The service now offers another model"),
                          "503": _error("No model loaded")}}},
        "/": {"get": {"summary": "The upload page", "responses": {"200": {"description": "HTML",
                                                                          "content": {"text/html": {}}}}}},
    },
    "components": {
        "schemas": {
            "Error": _ERROR,
            "OfflineFiles": {
                "type": "object", "required": ["available"],
                "properties": {
                    "available": {"type": "boolean"},
                    "reason": {"type": "string", "description": "why nothing is offered (available: false)"},
                    "bytes": {"type": "integer", "description": "the download, all files together"},
                    "runtime": {"type": "object", "additionalProperties": {
                        "type": "object", "required": ["path", "bytes"],
                        "properties": {"path": {"type": "string"}, "bytes": {"type": "integer"}}}},
                    "model": {"type": "object",
                              "required": ["path", "sha256", "bytes", "name", "version", "species", "same_as_service"],
                              "properties": {"path": {"type": "string"}, "sha256": {"type": "string"},
                                             "bytes": {"type": "integer"}, "name": {"type": "string"},
                                             "version": {"type": "string"}, "species": {"type": "integer"},
                                             "same_as_service": {"type": "boolean"}}}}},
            "Model": {"type": "object", "required": ["name", "version"],
                      "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                     "device": {"type": "string", "description": "cpu, cuda:0 ... (/labels only)"},
                                     "backend": {"type": "string", "enum": ["torch", "onnxruntime"],
                                                 "description": "where the forward pass runs (/labels only)"}}},
            "Answer": {
                "type": "object",
                "required": ["request_id", "model", "level", "is_bird", "is_waterbird", "species_known",
                             "species_confidence", "predictions", "timing_ms"],
                "properties": {
                    "request_id": {"type": "string"},
                    "model": {"$ref": "#/components/schemas/Model"},
                    "level": {"type": "string", "enum": ["species", "waterbird", "bird", "not_a_bird"],
                              "description": "how far the answer goes, the most the model can support: a species "
                                             "it knows (species_known); a waterbird whose species it cannot tell; "
                                             "a bird, which it cannot tell is a waterbird; probably not a bird"},
                    "is_bird": {"type": "boolean", "description": "a waterbird, or bird_score is at least the "
                                                                  "service's waterbird threshold"},
                    "bird_score": {"type": "number", "minimum": 0, "maximum": 1,
                                   "description": "the probability the model's full softmax puts on bird classes "
                                                  "(for the embedded default ImageNet's 59, the waterbirds among "
                                                  "them; for a model of birds only, waterbird_score)"},
                    "is_waterbird": {"type": "boolean",
                                     "description": "waterbird_score is at least the service's waterbird threshold"},
                    "waterbird_score": {"type": "number", "minimum": 0, "maximum": 1,
                                        "description": "the probability the model's full softmax puts on the "
                                                       "species it answers with (all waterbird species it knows)"},
                    "species_known": {"type": "boolean",
                                      "description": "the model can tell which species this waterbird is; "
                                                     "false where it cannot (a species it was not taught, or one "
                                                     "it knows seen badly: predictions[0] is then only the "
                                                     "closest species it knows) and for a photo that is not a "
                                                     "waterbird"},
                    "species_confidence": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                                           "description": "where species_known: the probability, calibrated on "
                                                          "answers judged known to labelled photos of species the "
                                                          "model knows, that predictions[0] is the species in the "
                                                          "photo; null where species_known is false"},
                    "predictions": {"type": "array", "description": "the closest species the model knows, best "
                                    "first", "items": {
                        "type": "object", "required": ["label", "name", "score"],
                        "properties": {"label": {"type": "string", "description": "the model's class name"},
                                       "name": {"type": "string", "description": "the name a birder writes for "
                                                "it (an ImageNet class name may be a group's or a bird's sex)"},
                                       "score": {"type": "number", "minimum": 0, "maximum": 1,
                                                 "description": "this species' share of the probability among the "
                                                                "species the model knows: how it ranks them, not "
                                                                "how likely the photo is of it"}}}},
                    "timing_ms": {"type": "object", "required": ["preprocess", "inference", "total"],
                                  "properties": {k: {"type": "number"} for k in ("preprocess", "inference", "total")}},
                },
            },
            "Models": {
                "type": "object", "required": ["default", "models"],
                "properties": {
                    "default": {"type": "string", "description": "the model answering uploads that name none"},
                    "models": {"type": "array", "items": {
                        "type": "object", "required": ["name", "ready", "default"],
                        "properties": {
                            "name": {"type": "string"}, "version": {"type": "string"}, "default": {"type": "boolean"},
                            "ready": {"type": "boolean", "description": "false: configured, failed to load (error)"},
                            "error": {"type": "string"},
                            "species": {"type": "integer", "description": "classes it answers with"},
                            "input_size": {"type": "integer", "description": "pixels a side"},
                            "backend": {"type": "string"}, "device": {"type": "string"},
                            "phone": {"type": "boolean", "description": "a phone can save it for offline use (else "
                                      "the offline page stands in with the embedded default)"},
                            "candidate": {"type": "object", "description": "a model answering for this one on a "
                                          "share of its uploads, or beside it in the background (shadow)",
                                          "properties": {
                                              "model": {"type": "string"}, "share": {"type": "number"},
                                              "shadow": {"type": "number"}, "served": {"type": "boolean"},
                                              "compared": {"type": "integer"}, "dropped": {"type": "integer"},
                                              "agreement": {"type": "object", "description": "shares of the shadow "
                                                            "answers compared that agreed with the shown ones",
                                                            "additionalProperties": {"type": ["number", "null"]}},
                                              "candidate_latency_ms_p50": {"type": ["number", "null"]}}}}}}}},
            "Labels": {"type": "object", "required": ["model", "labels"],
                       "properties": {"model": {"$ref": "#/components/schemas/Model"},
                                      "labels": {"type": "array", "items": {"type": "string"}}}},
        }
    },
}
