"""Detection: box geometry (:mod:`~sparkvision.detect.boxes`) and synthetic scenes with boxes
(:mod:`~sparkvision.detect.scenes`), the first steps of the detect -> crop -> embed pipeline.

Submodules are imported where used, so importing box geometry does not load the compositor.
"""
