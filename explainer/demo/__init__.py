"""The embedded demo world (issue #4): a seeded synthetic image world with ground-truth concept
masks and a planted background shortcut, plus a small CNN trained on it.

Import the submodules directly: :mod:`explainer.demo.world` (generator, numpy + pillow only) and
:mod:`explainer.demo.model` (the CNN, needs torch).
"""
