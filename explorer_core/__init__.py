"""The base layer: what every other package of the explorer builds on.

``errors`` (the user-error type), ``progress`` (one progress report for every long job),
``results`` (typed results shared by the CLI, the app and the tests), ``models`` (model adapters:
a spec string to a model with its preprocessing and layers), ``demo_cnn`` (the demo world's
classifier; ``demo_segnet`` its segmentation network), ``trust`` (where a user's own model
code may run), ``hooks`` (temporary hooks as context managers, model rewrites for attribution)
and ``cache`` (the one on-disk result cache). It imports nothing of the project above it.
"""
