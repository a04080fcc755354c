"""The embedded demo world: a seeded synthetic image world with ground-truth concept masks and a
planted background shortcut (``world``), the training script of its CNN (``train``; the CNN
itself is :mod:`explorer_core.demo_cnn`), the ground-truth checks of explanations
(``groundtruth``) and the ``demo`` workspace that builds itself on first use (``workspace``).

Import the submodules directly; ``world`` needs only numpy and pillow.
"""
