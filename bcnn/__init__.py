"""Bilinear CNN waterbird recognition: models, weights, preprocessing. Knows nothing of Ray or HTTP.

Import what you use from its modules (`bcnn.predict`, `bcnn.weights`, ...): the package itself imports nothing, so
that the torch-free ones (`bcnn.images`, `bcnn.answers`) load without torch.
"""
